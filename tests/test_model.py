"""The animator modules: official layout, fast form vs published form, QR, base grid."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DESIGN_STATE_DICT, make_lia, random_images, rel_err
from leo_rt import Animator
from leo_rt.kernels.warp import warp_blend
from leo_rt.model import LIA, LIAConfig, base_grid

TOL_FP32 = 1e-4  # relative L2 over the output, fast vs published form


def _design_layout() -> dict[int, dict[str, tuple[int, ...]]]:
    layout, size = {}, None
    for line in DESIGN_STATE_DICT.read_text().splitlines():
        if line.startswith("## size"):
            size = int(line.split()[2].rstrip(":"))
            layout[size] = {}
        elif size and line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            layout[size][key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return layout


@pytest.mark.parametrize("size", [128, 256, 512])
def test_official_presets_match_published_layout(size):
    expected = _design_layout()[size]
    with torch.device("meta"):
        lia = LIA(LIAConfig.from_name(f"lia-{size}"))
    got = {k: tuple(v.shape) for k, v in lia.state_dict().items()}
    assert list(got) == list(expected)  # same keys, same order
    assert got == expected
    counts = {"128": (22_577_812, 22_177_342), "256": (22_696_532, 22_419_785), "512": (22_726_196, 22_513_364)}
    enc = sum(p.numel() for n, p in lia.named_parameters() if n.startswith("enc."))
    dec = sum(p.numel() for n, p in lia.named_parameters() if n.startswith("dec."))
    assert (enc, dec) == counts[str(size)]


def _parity(preset: str, n_drive: int = 3, seed: int = 0):
    lia = make_lia(preset, seed)
    anim = Animator(lia)
    s = lia.cfg.size
    src, drv = random_images(1, s, seed), random_images(n_drive, s, seed + 7)
    with torch.no_grad():
        # motion codes
        alpha_ref = lia.encode_motion(drv)
        alpha = anim.encode_motion(drv)
        assert rel_err(alpha, alpha_ref) < TOL_FP32
        # absolute render: N frames from one source
        state = anim.encode_source(src)
        w_a, feats = lia.encode_app(src)
        ref = lia.decode(w_a.expand(n_drive, -1), alpha_ref, [f.expand(n_drive, -1, -1, -1) for f in feats])
        out = anim.render(state, alpha_ref)
        assert out.shape == (n_drive, 3, s, s)
        assert rel_err(out, ref) < TOL_FP32
        # relative reenactment: the published call (both images encoded, relative to the first driving frame)
        start = lia.encode_motion(drv[:1])
        ref_rel = lia(src.expand(n_drive, -1, -1, -1), drv, start)
        out_rel = anim.render(state, anim.relative_alpha(state, alpha, anim.encode_motion(drv[:1])))
        assert rel_err(out_rel, ref_rel) < TOL_FP32
    return ref, out


@pytest.mark.parametrize("size", [128, 256, 512])
def test_fast_form_matches_published_form(size):
    ref, out = _parity(f"lia-{size}-tiny")
    assert ref.std() > 0.05  # a non-trivial image, so the comparison means something


@pytest.mark.full
def test_fast_form_matches_published_form_full_width_256():
    _parity("lia-256", n_drive=2)


def test_fast_form_is_exact_in_float64():
    """The rewrites are identities: in float64 the two forms agree to rounding, far below the fp32 tolerance."""
    lia = make_lia("lia-64-tiny").double()
    anim = Animator(lia)
    src, drv = random_images(1, 64).double(), random_images(2, 64, 3).double()
    with torch.no_grad():
        ref = lia(src.expand(2, -1, -1, -1), drv, None)
        state = anim.encode_source(src)
        out = anim.render(state, anim.encode_motion(drv))
    assert rel_err(out, ref) < 1e-12


def test_paired_sources_render_one_frame_each():
    lia = make_lia("lia-64-tiny")
    anim = Animator(lia)
    src, alpha = random_images(2, 64), torch.randn(2, 20)
    with torch.no_grad():
        w_a, feats = lia.encode_app(src)
        ref = lia.decode(w_a, alpha, feats)
    out = anim.render(anim.encode_source(src), alpha)
    assert rel_err(out, ref) < TOL_FP32
    with pytest.raises(ValueError, match="cannot render 3 frames"):
        anim.render(anim.encode_source(src), torch.randn(3, 20))


def test_every_parameter_reaches_the_fast_form():
    """Moving any single parameter tensor changes the fast form's relative reenactment (none is dropped/stale)."""
    lia = make_lia("lia-32-tiny")
    src, drv = random_images(1, 32), random_images(3, 32, 5)

    def reenact(anim):
        state = anim.encode_source(src)
        return anim.render(state, anim.relative_alpha(state, anim.encode_motion(drv), anim.encode_motion(drv[:1])))

    base = reenact(Animator(lia))
    unused = ("dec.to_rgb1.", ".noise.weight")  # present in checkpoints, unused by the published forward
    for name, p in lia.named_parameters():
        if name.startswith(unused[0]) or name.endswith(unused[1]):
            continue
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p) + 0.05)
        out = reenact(Animator(lia))
        with torch.no_grad():
            p.copy_(saved)
        assert not torch.allclose(out, base, rtol=0, atol=1e-7), f"{name} does not affect the fast form"


def test_bad_inputs_get_clear_errors():
    anim = Animator(make_lia("lia-32-tiny"))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        anim.encode_source(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(N, 20\)"):
        anim.render(anim.encode_source(random_images(1, 32)), torch.zeros(4, 19))


# ---------------------------------------------------------------------------------------------------- QR


def _householder_q(a: np.ndarray) -> np.ndarray:
    """Reduced Q of a Householder QR written out by hand (LAPACK's convention: v = x + sign(x0)‖x‖e0)."""
    m, n = a.shape
    r = a.astype(np.float64).copy()
    q = np.eye(m)
    for j in range(n):
        x = r[j:, j]
        v = x.copy()
        v[0] += np.copysign(np.linalg.norm(x), x[0])
        v /= np.linalg.norm(v)
        r[j:, :] -= 2.0 * np.outer(v, v @ r[j:, :])
        q[:, j:] -= 2.0 * np.outer(q[:, j:] @ v, v)
    return q[:, :n]


def _gram_schmidt_q(a: np.ndarray) -> np.ndarray:
    q = np.zeros_like(a, dtype=np.float64)
    for j in range(a.shape[1]):
        v = a[:, j].astype(np.float64)
        v = v - q[:, :j] @ (q[:, :j].T @ v)
        q[:, j] = v / np.linalg.norm(v)
    return q


def test_motion_basis_is_householder_qr_not_gram_schmidt():
    lia = make_lia("lia-32-tiny", seed=3)
    weight = lia.dec.direction.weight.detach().double().numpy() + 1e-8
    q_house, q_gs = _householder_q(weight), _gram_schmidt_q(weight)
    flipped = np.sign(np.sum(q_house * q_gs, axis=0)) < 0
    assert flipped.any() and not flipped.all()  # the two conventions really differ on this weight
    q = Animator(lia).renderer.q.double().numpy()
    np.testing.assert_allclose(q, q_house, atol=1e-5)
    assert not np.allclose(q, q_gs, atol=1e-2)
    # the published per-call form uses the same Q
    alpha = torch.randn(3, 20)
    np.testing.assert_allclose(lia.dec.direction(alpha).double().numpy(), alpha.double().numpy() @ q_house.T, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- base grid


@pytest.mark.parametrize("r", [8, 13, 64])
def test_base_grid_follows_linspace_not_pixel_centres(r):
    g = base_grid(r)
    expect = np.linspace(-1, 1, r).astype(np.float32)  # the published values
    np.testing.assert_array_equal(g[0, 0, :, 0].numpy(), expect)  # x along width
    np.testing.assert_array_equal(g[0, :, 0, 1].numpy(), expect)  # y along height
    centres = (2 * np.arange(r) + 1) / r - 1
    assert not np.allclose(expect, centres)


def test_zero_flow_reads_a_quarter_at_the_corners():
    """With align_corners=False, grid value −1 lies half a pixel outside the map: a constant map reads 0.25 at
    the corners and 0.5 along the edges under a zero flow; the published network relies on this."""
    r = 8
    feat = torch.ones(1, 4, r, r)
    logits = torch.zeros(1, 3, r, r)
    logits[:, 2] = 40.0  # mask = sigmoid(40) = 1
    warped, blended = warp_blend(feat, logits, torch.zeros(1, 4, r, r), base_grid(r))
    assert warped[0, 0, 0, 0].item() == pytest.approx(0.25)
    assert warped[0, 0, -1, -1].item() == pytest.approx(0.25)
    assert warped[0, 0, 0, r // 2].item() == pytest.approx(0.5, abs=0.1)
    assert torch.equal(warped, blended)
    # and the same through the published module
    lia = LIA(LIAConfig.from_name("lia-32-tiny"))
    to_flow = lia.dec.to_flows[0]
    with torch.no_grad():
        to_flow.conv.weight.zero_()
        to_flow.bias.copy_(torch.tensor([0.0, 0.0, 40.0]).view(1, 3, 1, 1))
        w, _, _ = to_flow(torch.zeros(1, 32, r, r), torch.zeros(1, 64), torch.ones(1, 32, r, r))
    assert w[0, 0, 0, 0].item() == pytest.approx(0.25)
    ref = F.grid_sample(feat, base_grid(r), align_corners=False)
    assert torch.allclose(warped, ref, atol=1e-6)
