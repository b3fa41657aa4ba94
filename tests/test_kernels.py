"""Triton kernels in the interpreter (CPU tensors), the custom op under compile/export, and ONNX lowering."""

import pytest
import torch
import torch.nn.functional as F

from leo_rt.kernels import base_grid, check_warp_inputs, onnx_custom_op, warp_blend, warp_blend_reference

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'triton==3.7.1')")
from leo_rt.kernels.grid_sample import grid_sample_triton  # noqa: E402
from leo_rt.kernels.warp_blend import warp_blend_triton  # noqa: E402

# (dtype, atol, rtol) against the fp32 reference evaluated on the same (rounded) inputs: the kernel computes in
# fp32 and rounds once at the store, so the bound is one rounding of the storage dtype plus fp32 noise.
TOLS = [(torch.float32, 2e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1e-2)]
SHAPES = [(2, 1, 5, 7), (1, 3, 9, 4), (3, 17, 6, 11), (2, 64, 13, 10)]  # C = 1, 3, 17, 64; H ≠ W; ragged blocks


def _inputs(b, c, h, w, bf, dtype, layout, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(bf, c, h, w, generator=g)
    logits = torch.randn(b, 3, h, w, generator=g) * scale  # |Δ| → 1: many samples leave the map
    logits[:, :2, 0, :] = 12.0  # a row pushed far outside: zeros padding must answer
    hh = torch.randn(b, c, h, w, generator=g)
    conv = lambda t: t.to(dtype).contiguous(memory_format=layout)  # noqa: E731
    return conv(feat), conv(logits), conv(hh)


def _report(got, want, atol, rtol):
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, got[tuple(i)].item(), want[tuple(i)].item()) for i in idx]
        pytest.fail(f"{int(bad.sum())} mismatches (atol={atol}, rtol={rtol}); first: {pairs}")


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared_source", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_warp_blend_kernel_matches_reference(dtype, atol, rtol, shape, shared_source, layout):
    b = shape[0]
    feat, logits, h = _inputs(*shape, 1 if shared_source else b, dtype, layout)
    warped, out = warp_blend_triton(feat, logits, h)
    ref_w, ref_o = warp_blend_reference(feat.float(), logits.float(), h.float())
    assert warped.dtype == dtype and warped.shape == h.shape
    assert out.is_contiguous(memory_format=layout)
    _report(warped.float(), ref_w, atol, rtol)
    _report(out.float(), ref_o, atol, rtol)


def test_shared_source_is_not_copied():
    feat, logits, h = _inputs(4, 3, 6, 6, 1, torch.float32, torch.contiguous_format)
    ref = warp_blend_triton(feat.expand(4, -1, -1, -1).contiguous(), logits, h)
    got = warp_blend_triton(feat, logits, h)  # batch-1 source read through a zero batch stride
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_zero_flow_reads_a_quarter_at_the_corners():
    feat = torch.ones(1, 2, 8, 8)
    logits = torch.zeros(1, 3, 8, 8)
    logits[:, 2] = 40.0
    warped, out = warp_blend_triton(feat, logits, torch.zeros(1, 2, 8, 8))
    assert warped[0, 0, 0, 0].item() == pytest.approx(0.25) and torch.equal(warped, out)


MODES = [(m, p, a) for m in ("bilinear", "nearest") for p in ("zeros", "border") for a in (False, True)]


@pytest.mark.parametrize("mode,padding,align", MODES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_grid_sample_matches_torch(mode, padding, align, layout):
    g = torch.Generator().manual_seed(1)
    inp = torch.randn(2, 5, 7, 9, generator=g).contiguous(memory_format=layout)
    grid = torch.rand(2, 6, 8, 2, generator=g) * 2.6 - 1.3  # includes points outside [-1, 1]
    got = grid_sample_triton(inp, grid, mode, padding, align)
    want = F.grid_sample(inp, grid, mode=mode, padding_mode=padding, align_corners=align)
    _report(got, want, 1e-5, 1e-5)


def test_grid_sample_nearest_rounds_half_to_even():
    inp = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 2, 5).contiguous()
    xs = torch.tensor([-1 + (2 * k + 1) / 4 for k in range(4)])  # exact .5 source positions with align_corners
    grid = torch.stack([xs, torch.zeros(4)], -1).view(1, 1, 4, 2)
    got = grid_sample_triton(inp, grid, "nearest", "zeros", True)
    want = F.grid_sample(inp, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    assert got.flatten().tolist() == want.flatten().tolist() == [0.0, 2.0, 2.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grid_sample_low_precision(dtype):
    g = torch.Generator().manual_seed(2)
    inp, grid = torch.randn(1, 3, 6, 6, generator=g), torch.rand(1, 5, 5, 2, generator=g) * 2 - 1
    got = grid_sample_triton(inp.to(dtype), grid.to(dtype), "bilinear", "zeros", False)
    want = F.grid_sample(inp.to(dtype).float(), grid.to(dtype).float(), align_corners=False)
    _report(got.float(), want, 2e-2, 1e-2)


def test_bad_inputs_get_clear_errors():
    f, lg, h = torch.zeros(1, 4, 6, 6), torch.zeros(2, 3, 6, 6), torch.zeros(2, 4, 6, 6)
    with pytest.raises(ValueError, match="must be 4-D"):
        check_warp_inputs(f[0], lg, h)
    with pytest.raises(ValueError, match=r"logits must be \(2, 3, 6, 6\)"):
        check_warp_inputs(f, lg[:, :2], h)
    with pytest.raises(ValueError, match="feat must be"):
        check_warp_inputs(torch.zeros(3, 4, 6, 6), lg, h)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        check_warp_inputs(f.double(), lg, h)
    with pytest.raises(ValueError, match="share a dtype"):
        check_warp_inputs(f.half(), lg, h)
    with pytest.raises(ValueError, match="at least 2×2"):
        check_warp_inputs(torch.zeros(1, 4, 1, 6), torch.zeros(2, 3, 1, 6), torch.zeros(2, 4, 1, 6))
    with pytest.raises(ValueError, match="reflection is not supported"):
        grid_sample_triton(f, torch.zeros(1, 2, 2, 2), padding_mode="reflection")
    with pytest.raises(ValueError, match="grid batch 2"):
        grid_sample_triton(f, torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="int32|float32"):
        grid_sample_triton(f.int(), torch.zeros(1, 2, 2, 2))


# ---------------------------------------------------------------------------------------------------- the op


class _Warp(torch.nn.Module):
    def forward(self, feat, logits, h):
        return torch.ops.leo_rt.warp_blend(feat, logits, h)


def test_custom_op_eager_compile_export():
    feat, logits, h = _inputs(3, 8, 7, 9, 1, torch.float32, torch.contiguous_format, seed=4)
    want = warp_blend_reference(feat, logits, h)
    eager = torch.ops.leo_rt.warp_blend(feat, logits, h)
    compiled = torch.compile(_Warp(), fullgraph=True)(feat, logits, h)
    ep = torch.export.export(_Warp(), (feat, logits, h))
    assert any(n.target is torch.ops.leo_rt.warp_blend.default for n in ep.graph.nodes)  # one opaque node
    exported = ep.module()(feat, logits, h)
    for got in (eager, compiled, exported):
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    torch.library.opcheck(torch.ops.leo_rt.warp_blend.default, (feat, logits, h))


def test_dispatcher_uses_the_reference_on_cpu():
    feat, logits, h = _inputs(2, 4, 6, 6, 1, torch.float32, torch.contiguous_format)
    got = warp_blend(feat, logits, h, base_grid(6))
    want = warp_blend_reference(feat, logits, h)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


class _Blend(torch.nn.Module):
    def forward(self, feat, logits, h):
        warped, out = warp_blend(feat, logits, h)
        return warped, out


def test_onnx_export_decomposes_by_default_and_can_emit_one_custom_node(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    feat, logits, h = _inputs(2, 5, 6, 7, 1, torch.float32, torch.contiguous_format, seed=5)
    path = tmp_path / "warp.onnx"
    torch.onnx.export(_Blend().eval(), (feat, logits, h), str(path), dynamo=True, opset_version=18, external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops and all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (feat.numpy(), logits.numpy(), h.numpy()), strict=True)))
    want = warp_blend_reference(feat, logits, h)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(torch.from_numpy(a), b, atol=1e-5)

    custom = tmp_path / "warp_custom.onnx"
    with onnx_custom_op():
        torch.onnx.export(
            _Blend().eval(), (feat, logits, h), str(custom), dynamo=True, opset_version=18, external_data=False
        )
    nodes = onnx.load(str(custom)).graph.node
    assert [(n.domain, n.op_type) for n in nodes] == [("leo_rt", "WarpBlend")]


def test_renderer_with_the_triton_warp(monkeypatch):
    """The fast renderer routed through the custom op and the Triton kernel (interpreted here, on CPU tensors)
    gives the frames of the reference path."""
    from conftest import make_lia, random_images, rel_err
    from leo_rt import Animator

    anim = Animator(make_lia("lia-32-tiny", seed=9))
    state = anim.encode_source(random_images(1, 32))
    alpha = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    want = anim.render(state, alpha)
    calls = []
    real = warp_blend_triton

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr("leo_rt.kernels.warp._use_triton", lambda t: True)
    monkeypatch.setattr("leo_rt.kernels.warp_blend.warp_blend_triton", counting)
    got = anim.render(state, alpha)
    assert len(calls) == len(anim.config.resolutions)  # every decoder block went through the kernel
    assert rel_err(got, want) < 1e-5
