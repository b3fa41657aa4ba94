"""The Triton kernels (interpreted on CPU tensors, compiled on a GPU machine), the leo_rt::warp_blend op under
compile/export, multi-source rendering, and the ONNX lowering.

Accuracy is judged against a float64 evaluation of the same warp on the same (rounded) inputs. fp32: within twice
the fp32 reference's own error or 1e-5 relative, whichever is larger (CLARIFICATIONS §2), so the bound scales with
the map size the way coordinate rounding does. fp16/bf16: the kernel computes in fp32 and rounds once at the
store, so each element is within one rounding (unit roundoff u) of the float64 value, plus the fp32 allowance.
"""

import importlib
import pkgutil

import pytest
import torch
import torch.nn.functional as F

import leo_rt.kernels
from conftest import FP32_FLOOR, KERNEL_DEVICE, TRITON_INTERPRETED, make_lia, random_images, rel_err
from leo_rt.errors import InputError
from leo_rt.kernels import base_grid, check_warp_inputs, onnx_custom_op, warp_blend, warp_blend_reference

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'triton==3.7.1')")
from leo_rt.kernels.sample_triton import grid_sample_triton  # noqa: E402
from leo_rt.kernels.warp_triton import CONFIGS, warp_blend_triton  # noqa: E402

DEV = KERNEL_DEVICE  # "cpu" (the interpreter) without a GPU, "cuda" (compiled kernels) with one
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # 0: fp32 is judged apart
# The interpreter converts fp32 → bf16 by truncation (numpy has no bf16; a GPU rounds to nearest): one ulp, 2u.
STORE_ROUNDING = {**UNIT_ROUNDOFF, torch.bfloat16: 2.0**-7 if TRITON_INTERPRETED else 2.0**-8}
SHAPES = [(2, 1, 5, 7), (1, 3, 9, 4), (3, 17, 6, 11), (2, 64, 13, 10)]  # C = 1, 3, 17, 64; H ≠ W; ragged blocks
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _inputs(b, c, h, w, k, dtype, layout, seed=0, scale=3.0):
    """k sources (k = 1: shared), logits pushing many samples off the map, h; on the kernel device."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(k, c, h, w, generator=g)
    logits = torch.randn(b, 3, h, w, generator=g) * scale  # |Δ| → 1: many samples leave the map
    logits[:, :2, 0, :] = 12.0  # a row pushed far outside: zeros padding must answer
    hh = torch.randn(b, c, h, w, generator=g)
    conv = lambda t: t.to(dtype).contiguous(memory_format=layout).to(DEV)  # noqa: E731
    return conv(feat), conv(logits), conv(hh)


def _reference64(feat, logits, h, src_index=None):
    """float64 warp of the same (already rounded) inputs, on the CPU."""
    idx = None if src_index is None else src_index.cpu()
    return warp_blend_reference(feat.cpu().double(), logits.cpu().double(), h.cpu().double(), None, idx)


def _reference32(feat, logits, h, src_index=None):
    idx = None if src_index is None else src_index.cpu()
    return warp_blend_reference(feat.cpu().float(), logits.cpu().float(), h.cpu().float(), None, idx)


def assert_warp_close(got, feat, logits, h, src_index=None, what=""):
    """Both outputs of a kernel call within the bounds of the module docstring (elementwise, with the first
    offenders listed)."""
    ref64 = _reference64(feat, logits, h, src_index)
    ref32 = _reference32(feat, logits, h, src_index)
    u = STORE_ROUNDING[h.dtype]
    for name, a, want, pub in zip(("warped", "out"), got, ref64, ref32, strict=True):
        assert a.dtype == h.dtype and a.shape == h.shape, (what, name, a.dtype, a.shape)
        a = a.cpu().double()
        allowance = max(2.0 * (pub.double() - want).abs().max().item(), FP32_FLOOR * want.abs().max().item())
        bound = u * want.abs() + (1.0 + u) * allowance
        bad = (a - want).abs() > bound
        if bad.any():
            idx = bad.nonzero()[:5].tolist()
            pairs = [(i, a[tuple(i)].item(), want[tuple(i)].item()) for i in idx]
            pytest.fail(f"{what} {name}: {int(bad.sum())} elements off the float64 warp beyond the bound; {pairs}")
        if u == 0.0:  # fp32: also the whole-output relative error, against the published fp32 error
            assert rel_err(a, want) <= max(2.0 * rel_err(pub, want), FP32_FLOOR), (what, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sources", ["shared", "per_frame", "indexed"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_warp_blend_kernel_matches_float64(dtype, shape, sources, layout):
    b = shape[0]
    k = {"shared": 1, "per_frame": b, "indexed": 3}[sources]
    feat, logits, h = _inputs(*shape, k, dtype, LAYOUTS[layout])
    src_index = torch.tensor([2, 0, 1][:b] if b < 3 else [2, 0, 2], device=DEV) if sources == "indexed" else None
    warped, out = warp_blend_triton(feat, logits, h, src_index)
    assert out.is_contiguous(memory_format=LAYOUTS[layout]) and warped.is_contiguous(memory_format=LAYOUTS[layout])
    assert_warp_close((warped, out), feat, logits, h, src_index, f"{dtype} {shape} {sources} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_warp_at_a_real_map_size(layout):
    """8 frames of 64×64 maps (where a fixed fp32 tolerance failed from coordinate rounding): the size-aware bound
    holds, and is tight (the kernel's error is of the order of the fp32 reference's own)."""
    feat, logits, h = _inputs(8, 16, 64, 64, 1, torch.float32, LAYOUTS[layout], seed=3, scale=1.0)
    got = warp_blend_triton(feat, logits, h)
    assert_warp_close(got, feat, logits, h, None, f"8x16x64x64 {layout}")


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_every_configuration_is_exact_to_the_others(cl):
    """Each (BLOCK_P, BLOCK_C, num_warps) of the autotune set, forced, on a shape ragged in pixels and channels:
    the same per-element arithmetic, so bit-identical results, and within bounds."""
    layout = torch.channels_last if cl else torch.contiguous_format
    feat, logits, h = _inputs(2, 37, 9, 11, 3, torch.float32, layout, seed=6)
    src_index = torch.tensor([1, 2], device=DEV)
    results = [warp_blend_triton(feat, logits, h, src_index, config=cfg) for cfg in CONFIGS[cl]]
    assert_warp_close(results[0], feat, logits, h, src_index, f"config {CONFIGS[cl][0]}")
    default = warp_blend_triton(feat, logits, h, src_index)  # autotuned (compiled) or the interpreter's tile
    for cfg, res in zip((*CONFIGS[cl][1:], "default"), (*results[1:], default), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(res, results[0], strict=True)), cfg


def test_shared_source_is_not_copied():
    feat, logits, h = _inputs(4, 3, 6, 6, 1, torch.float32, torch.contiguous_format)
    ref = warp_blend_triton(feat.expand(4, -1, -1, -1).contiguous(), logits, h)
    got = warp_blend_triton(feat, logits, h)  # batch-1 source read through a zero batch stride
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_indexed_sources_are_read_in_place(layout):
    """Frame n with src_index reads feat[src_index[n]]: exactly what a per-frame copy of the sources gives."""
    feat, logits, h = _inputs(5, 8, 7, 6, 3, torch.float32, LAYOUTS[layout], seed=2)
    src_index = torch.tensor([2, 0, 0, 1, 2], device=DEV)
    got = warp_blend_triton(feat, logits, h, src_index)
    want = warp_blend_triton(feat.index_select(0, src_index).contiguous(memory_format=LAYOUTS[layout]), logits, h)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_zero_flow_reads_a_quarter_at_the_corners():
    feat = torch.ones(1, 2, 8, 8, device=DEV)
    logits = torch.zeros(1, 3, 8, 8, device=DEV)
    logits[:, 2] = 40.0
    warped, out = warp_blend_triton(feat, logits, torch.zeros(1, 2, 8, 8, device=DEV))
    assert warped[0, 0, 0, 0].item() == pytest.approx(0.25) and torch.equal(warped, out)


def test_non_finite_logits_saturate_like_the_reference():
    """±inf flow saturates (tanh = ±1, the sample lands on the map's edge or off it); NaN propagates."""
    feat, logits, h = _inputs(1, 4, 6, 6, 1, torch.float32, torch.contiguous_format, seed=8)
    logits[0, 0, 1, :] = float("inf")
    logits[0, 1, 2, :] = float("-inf")
    logits[0, 2, 3, :] = float("inf")  # mask 1
    logits[0, 2, 4, :] = float("-inf")  # mask 0: h' = h
    got = warp_blend_triton(feat, logits, h)
    assert all(torch.isfinite(t).all() for t in got)
    assert_warp_close(got, feat, logits, h, None, "inf logits")
    logits[0, 0, 5, 0] = float("nan")
    warped, out = warp_blend_triton(feat, logits, h)
    ref_w, ref_o = _reference32(feat, logits, h)
    assert torch.equal(warped.isnan().cpu(), ref_w.isnan()) and torch.equal(out.isnan().cpu(), ref_o.isnan())


# ---------------------------------------------------------------------------------------------------- grid_sample

MODES = [(m, p, a) for m in ("bilinear", "nearest") for p in ("zeros", "border") for a in (False, True)]


@pytest.mark.parametrize("mode,padding,align", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grid_sample_matches_torch(mode, padding, align, layout):
    g = torch.Generator().manual_seed(1)
    inp = torch.randn(2, 5, 7, 9, generator=g).contiguous(memory_format=LAYOUTS[layout])
    grid = torch.rand(2, 6, 8, 2, generator=g) * 2.6 - 1.3  # includes points outside [-1, 1]
    got = grid_sample_triton(inp.to(DEV), grid.to(DEV), mode, padding, align).cpu()
    want = F.grid_sample(inp, grid, mode=mode, padding_mode=padding, align_corners=align)
    want64 = F.grid_sample(inp.double(), grid.double(), mode=mode, padding_mode=padding, align_corners=align)
    bound = max(2.0 * (want.double() - want64).abs().max().item(), FP32_FLOOR * want64.abs().max().item())
    if mode == "nearest":  # a rounded coordinate picks one pixel: the fp32 result is the torch fp32 one
        assert torch.equal(got, want)
    else:
        assert (got.double() - want64).abs().max().item() <= bound


def test_grid_sample_nearest_rounds_half_to_even():
    inp = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 2, 5).contiguous()
    xs = torch.tensor([-1 + (2 * k + 1) / 4 for k in range(4)])  # exact .5 source positions with align_corners
    grid = torch.stack([xs, torch.zeros(4)], -1).view(1, 1, 4, 2)
    got = grid_sample_triton(inp.to(DEV), grid.to(DEV), "nearest", "zeros", True).cpu()
    want = F.grid_sample(inp, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    assert got.flatten().tolist() == want.flatten().tolist() == [0.0, 2.0, 2.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grid_sample_low_precision(dtype):
    g = torch.Generator().manual_seed(2)
    inp, grid = torch.randn(1, 3, 6, 6, generator=g).to(dtype), (torch.rand(1, 5, 5, 2, generator=g) * 2 - 1).to(dtype)
    got = grid_sample_triton(inp.to(DEV), grid.to(DEV), "bilinear", "zeros", False).cpu().double()
    want = F.grid_sample(inp.double(), grid.double(), align_corners=False)
    assert ((got - want).abs() <= STORE_ROUNDING[dtype] * want.abs() + 1e-5).all()


def test_bad_inputs_get_clear_errors():
    f, lg, h = torch.zeros(1, 4, 6, 6), torch.zeros(2, 3, 6, 6), torch.zeros(2, 4, 6, 6)
    with pytest.raises(InputError, match="must be 4-D"):
        check_warp_inputs(f[0], lg, h)
    with pytest.raises(InputError, match=r"logits must be \(2, 3, 6, 6\)"):
        check_warp_inputs(f, lg[:, :2], h)
    with pytest.raises(InputError, match="feat must be"):
        check_warp_inputs(torch.zeros(3, 4, 6, 6), lg, h)
    with pytest.raises(InputError, match="dtype torch.float64"):
        check_warp_inputs(f.double(), lg, h)
    with pytest.raises(InputError, match="share a dtype"):
        check_warp_inputs(f.half(), lg, h)
    with pytest.raises(InputError, match="at least 2×2"):
        check_warp_inputs(torch.zeros(1, 4, 1, 6), torch.zeros(2, 3, 1, 6), torch.zeros(2, 4, 1, 6))
    with pytest.raises(InputError, match=r"src_index must be \(2,\)"):
        check_warp_inputs(torch.zeros(3, 4, 6, 6), lg, h, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(InputError, match="src_index has dtype torch.float32"):
        check_warp_inputs(torch.zeros(3, 4, 6, 6), lg, h, torch.zeros(2))
    with pytest.raises(InputError, match=r"feat must be \(K, 4, 6, 6\)"):
        check_warp_inputs(torch.zeros(3, 5, 6, 6), lg, h, torch.zeros(2, dtype=torch.int64))
    check_warp_inputs(torch.zeros(7, 4, 6, 6), lg, h, torch.zeros(2, dtype=torch.int64))  # K sources: any K
    with pytest.raises(InputError, match="reflection is not supported"):
        grid_sample_triton(f, torch.zeros(1, 2, 2, 2), padding_mode="reflection")
    with pytest.raises(InputError, match="grid batch 2"):
        grid_sample_triton(f, torch.zeros(2, 2, 2, 2))
    with pytest.raises(InputError, match="int32|float32"):
        grid_sample_triton(f.int(), torch.zeros(1, 2, 2, 2))


# ---------------------------------------------------------------------------------------------------- names


def test_no_module_shares_a_name_with_a_function():
    """A submodule named like a function replaces the package attribute when it is first imported (Python sets
    package.<submodule> on import): leo_rt.kernels.warp_blend was a module after the first Triton call."""
    modules = {m.name for m in pkgutil.iter_modules(leo_rt.kernels.__path__)}
    assert not modules & set(leo_rt.kernels.__all__)
    for name in modules:
        importlib.import_module(f"leo_rt.kernels.{name}")
    feat, logits, h = _inputs(1, 2, 4, 4, 1, torch.float32, torch.contiguous_format)
    warp_blend_triton(feat, logits, h)  # a Triton call (interpreted or compiled) with every submodule imported
    assert callable(leo_rt.kernels.warp_blend) and leo_rt.kernels.warp_blend.__module__ == "leo_rt.kernels.warp"
    assert all(callable(getattr(leo_rt.kernels, n)) for n in leo_rt.kernels.__all__ if n.islower())


# ---------------------------------------------------------------------------------------------------- the op


class _Warp(torch.nn.Module):
    def forward(self, feat, logits, h, src_index=None):
        return torch.ops.leo_rt.warp_blend(feat, logits, h, src_index)


@pytest.mark.parametrize("indexed", [False, True], ids=["shared", "indexed"])
def test_op_on_cpu_eager_compile_export(indexed):
    """The op on CPU tensors (the reference inside it): eager, torch.compile(fullgraph=True), torch.export (one
    node), and opcheck (schema, fake tensors, AOT dispatch)."""
    k = 3 if indexed else 1
    g = torch.Generator().manual_seed(4)
    feat, logits = torch.randn(k, 8, 7, 9, generator=g), torch.randn(4, 3, 7, 9, generator=g)
    h = torch.randn(4, 8, 7, 9, generator=g)
    src_index = torch.tensor([2, 0, 1, 2]) if indexed else None
    want = warp_blend_reference(feat, logits, h, None, src_index)
    eager = torch.ops.leo_rt.warp_blend(feat, logits, h, src_index)
    compiled = torch.compile(_Warp(), fullgraph=True)(feat, logits, h, src_index)
    ep = torch.export.export(_Warp(), (feat, logits, h, src_index))
    assert sum(n.target is torch.ops.leo_rt.warp_blend.default for n in ep.graph.nodes) == 1  # one opaque node
    exported = ep.module()(feat, logits, h, src_index)
    for a, b in zip(eager, want, strict=True):
        assert torch.equal(a, b)
    ref64 = _reference64(feat, logits, h, src_index)
    for got in (compiled, exported):
        for a, b, r in zip(got, want, ref64, strict=True):
            assert rel_err(a, r) <= max(2.0 * rel_err(b, r), FP32_FLOOR)
    torch.library.opcheck(torch.ops.leo_rt.warp_blend.default, (feat, logits, h, src_index))


def test_dispatcher_uses_the_reference_on_cpu():
    feat, logits, h = (t.cpu() for t in _inputs(2, 4, 6, 6, 1, torch.float32, torch.contiguous_format))
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
    feat, logits, h = (t.cpu() for t in _inputs(2, 5, 6, 7, 1, torch.float32, torch.contiguous_format, seed=5))
    path = tmp_path / "warp.onnx"
    torch.onnx.export(_Blend().eval(), (feat, logits, h), str(path), dynamo=True, opset_version=18, external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops and all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (feat.numpy(), logits.numpy(), h.numpy()), strict=True)))
    want, ref64 = warp_blend_reference(feat, logits, h), _reference64(feat, logits, h)
    for a, b, r in zip(got, want, ref64, strict=True):
        assert rel_err(torch.from_numpy(a), r) <= max(2.0 * rel_err(b, r), FP32_FLOOR)

    custom = tmp_path / "warp_custom.onnx"
    with onnx_custom_op():
        torch.onnx.export(
            _Blend().eval(), (feat, logits, h), str(custom), dynamo=True, opset_version=18, external_data=False
        )
    nodes = onnx.load(str(custom)).graph.node
    assert [(n.domain, n.op_type) for n in nodes] == [("leo_rt", "WarpBlend")]


# ---------------------------------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def tiny():
    """A randomised lia-32-tiny animator in fp32 and the same weights in float64, three sources encoded."""
    from leo_rt import Animator

    lia = make_lia("lia-32-tiny", seed=9)
    anim, anim64 = Animator(lia), Animator(make_lia("lia-32-tiny", seed=9).double())
    images = random_images(3, 32, seed=1)
    return anim, anim64, anim.encode_source(images), anim64.encode_source(images)


def _one(state, k):
    """Source k of a multi-source state, as a state of its own."""
    from leo_rt.fast import SourceState

    return SourceState(state.w_a[k : k + 1], [f[k : k + 1] for f in state.feats], state.alpha_src[k : k + 1],
                       state.styles0[k : k + 1])  # fmt: skip


def _use_kernel(monkeypatch, counter=None):
    """Route the renderer's warp through the op and the Triton kernel on CPU tensors (the interpreter)."""
    import leo_rt.kernels.warp as warp

    real = warp._launch_triton

    def launch(*args):
        if counter is not None:
            counter.append(1)
        return real(*args)

    monkeypatch.setattr(warp, "_use_triton", lambda t: True)
    monkeypatch.setattr(warp, "_kernel_device", lambda t: True)
    monkeypatch.setattr(warp, "_launch_triton", launch)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_one_batched_render_of_three_sources_equals_each_alone(tiny, path, monkeypatch):
    """Frames of three sources in one render (src_index) against each source rendered alone: both within the fp32
    bound of the float64 render of that source."""
    if path == "triton" and DEV != "cpu":
        pytest.skip("on a GPU machine the renderer uses the compiled kernel by itself (see the rehearsal)")
    anim, anim64, state, state64 = tiny
    src_index = torch.tensor([2, 0, 1, 1, 0, 2])
    alpha = torch.randn(6, anim.config.motion_dim, generator=torch.Generator().manual_seed(3))
    frames = list(enumerate(src_index.tolist()))
    refs = [anim64.render(_one(state64, k), alpha[n : n + 1].double()) for n, k in frames]  # float64, reference warp
    calls = []
    if path == "triton":
        _use_kernel(monkeypatch, calls)
    batched = anim.render(state, alpha, src_index)
    assert batched.shape == (6, 3, 32, 32)
    if path == "triton":
        assert len(calls) == len(anim.config.resolutions)  # every decoder block went through the kernel
    for (n, k), ref in zip(frames, refs, strict=True):
        alone = anim.render(_one(state, k), alpha[n : n + 1])
        bound = max(2.0 * rel_err(alone, ref), FP32_FLOOR)
        assert rel_err(batched[n : n + 1], ref) <= bound, (path, n, k)


def test_render_without_src_index_is_unchanged(tiny):
    """src_index=None keeps the shared-source path bit for bit, and a state of one source rendered with an index
    of zeros is the same computation with the features gathered (equal within fp32 rounding)."""
    anim, _, state, _ = tiny
    alpha = torch.randn(4, anim.config.motion_dim, generator=torch.Generator().manual_seed(5))
    one = _one(state, 1)
    shared = anim.render(one, alpha)
    direct = anim.renderer(alpha, one.styles0, one.feats).contiguous()
    assert torch.equal(shared, direct)
    indexed = anim.render(one, alpha, torch.zeros(4, dtype=torch.int64))
    assert rel_err(indexed, shared) < FP32_FLOOR


def test_render_checks_src_index(tiny):
    anim, _, state, _ = tiny
    alpha = torch.zeros(2, anim.config.motion_dim)
    with pytest.raises(InputError, match=r"src_index must be an \(2,\) tensor"):
        anim.render(state, alpha, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(InputError, match=r"src_index must be an \(2,\) tensor"):
        anim.render(state, alpha, [0, 1])
    with pytest.raises(InputError, match="integers"):
        anim.render(state, alpha, torch.zeros(2))
    with pytest.raises(InputError, match=r"\[0, 3\).*got 0\.\.3"):
        anim.render(state, alpha, torch.tensor([0, 3]))
    with pytest.raises(InputError, match=r"\[0, 3\).*got -1\.\.1"):
        anim.render(state, alpha, torch.tensor([-1, 1]))
    with pytest.raises(InputError, match="pass src_index"):
        anim.render(state, alpha)  # three sources, two frames, no index
    assert anim.render(state, alpha, torch.tensor([2, 0], dtype=torch.int32)).shape == (2, 3, 32, 32)


def test_compiled_renderer_with_src_index_equals_eager(tiny):
    """torch.compile(fullgraph=True) of the renderer on CPU, with and without src_index, against eager (both
    within the fp32 bound of the float64 render)."""
    anim, anim64, state, state64 = tiny
    alpha = torch.randn(4, anim.config.motion_dim, generator=torch.Generator().manual_seed(6))
    src_index = torch.tensor([1, 2, 0, 1])
    compiled = torch.compile(anim.renderer, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for idx, st, st64 in ((src_index, state, state64), (None, _one(state, 0), _one(state64, 0))):
            eager = anim.renderer(alpha, st.styles0, st.feats, idx)
            got = compiled(alpha, st.styles0, st.feats, idx)
            ref = anim64.renderer(alpha.double(), st64.styles0, st64.feats, idx)
            assert rel_err(got, ref) <= max(2.0 * rel_err(eager, ref), FP32_FLOOR)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="the interpreter-specific path of the kernel")
def test_interpreter_never_autotunes():
    from leo_rt.kernels import warp_triton

    assert warp_triton.INTERPRETED and not warp_triton.AUTOTUNE  # no autotuning sweeps in the interpreter
