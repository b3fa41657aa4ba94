"""Fused warp + occlusion blend (ToFlow of docs/ARCHITECTURE.md §2) as one Triton kernel.

Per pixel it reads the three logits, computes Δ = tanh(L[0:2]) (libdevice's accurate tanh when compiled), the
mask m = sigmoid(L[2]), the grid base + Δ (base_i = −1 + 2i/(size − 1), built in the kernel) and the four bilinear
taps (zeros padding, align_corners=False) in fp32; then, for one block of channels, it gathers the source
features and writes f̃ = sample·m and h' = f̃ + h·(1 − m), rounding once at the store.

Grid: axis 0 is (frame, pixel block), frame-major, so the batch is not bound by the 65535 limit of axes 1 and 2;
axis 1 is the channel block, so small maps still fill the GPU (8×8 × 512 channels, batch 1: 32 blocks, not 1).
Sources: one shared by every frame is read through a zero batch stride; with `src_index` (N,) frame n reads
source src_index[n] of a (K, C, H, W) stack, by offsetting the feature base; features are never copied.

Configurations: a small set per layout (pixel-major tiles for NCHW, channel-major for channels-last), each with
at most 8 tile elements a thread so nothing spills (tests/test_kernels_sm90.py compiles every one for sm_90 and
reads ptxas's register and spill counts). Compiled, the set is autotuned, keyed on (C, H·W, layout) and the
tensors' dtypes; `LEO_RT_AUTOTUNE=0` runs the first configuration of the layout instead. The interpreter never
autotunes (its timings mean nothing) and takes one big tile unless a configuration is asked for.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from .sample_triton import _bilinear_zeros, check_grid, check_int32, device_guard

try:  # triton ≥ 3.0 (3.6 and 3.7 alike): dispatches to CUDA's libdevice (or ROCm's ocml) at compile time
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - an older triton: the exp form below is used instead
    libdevice = None

# (BLOCK_P, BLOCK_C, num_warps) per layout (False: NCHW, True: channels-last); the first is the default.
# Tile elements a thread = BLOCK_P·BLOCK_C / (32·num_warps) = 8 in every one: at 16, NCHW tiles spill on sm_90.
CONFIGS = {
    False: ((64, 16, 4), (128, 8, 4), (128, 16, 8)),
    True: ((32, 32, 4), (16, 64, 4), (64, 32, 8)),
}
MIN_BLOCKS = (16, 8)  # the smallest BLOCK_P and BLOCK_C above: the launch-limit check uses them
# The interpreter runs each program as numpy calls on whole tiles: big tiles, few programs (tests force CONFIGS).
INTERPRETER_CONFIG = (1024, 64, 4)


@triton.jit
def _warp_blend_kernel(
    feat_ptr,  # (K, C, H, W) source features; read at batch src_index[n], n, or 0 (zero batch stride)
    logits_ptr,  # (N, 3, H, W) flow/mask pre-activations
    h_ptr,  # (N, C, H, W) decoder features
    warped_ptr,  # (N, C, H, W) out: f̃
    out_ptr,  # (N, C, H, W) out: h'
    index_ptr,  # (N,) int64 source of each frame (read only when HAS_INDEX)
    C,
    H,
    W,
    P,  # H·W
    sf_n,
    sf_c,
    sf_h,
    sf_w,
    sl_n,  # logits, h and the outputs are addressed by pixel p = y·W + x (rows dense: stride_h = W·stride_w)
    sl_c,
    sl_p,
    sh_n,
    sh_c,
    sh_p,
    so_n,
    so_c,
    so_p,
    CHANNELS_LAST: tl.constexpr,  # autotune key (Triton specialises the unit stride, so the code adapts itself)
    HAS_INDEX: tl.constexpr,
    ACCURATE_TANH: tl.constexpr,  # libdevice.tanh; the interpreter has no libdevice and takes the exp form
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n_pb = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    n = pid // n_pb
    p = (pid - n * n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = p < P
    cmask = c < C
    yy = p // W
    xx = p - yy * W
    lg = n * sl_n + p * sl_p
    l0 = tl.load(logits_ptr + lg, mask=pmask, other=0.0).to(tl.float32)
    l1 = tl.load(logits_ptr + lg + sl_c, mask=pmask, other=0.0).to(tl.float32)
    l2 = tl.load(logits_ptr + lg + 2 * sl_c, mask=pmask, other=0.0).to(tl.float32)
    if ACCURATE_TANH:
        dx = libdevice.tanh(l0)
        dy = libdevice.tanh(l1)
    else:
        dx = 1.0 - 2.0 / (tl.exp(2.0 * l0) + 1.0)  # saturates correctly at ±inf
        dy = 1.0 - 2.0 / (tl.exp(2.0 * l1) + 1.0)
    m = 1.0 / (1.0 + tl.exp(-l2))  # sigmoid
    gx = xx.to(tl.float32) * (2.0 / (W - 1.0)) - 1.0 + dx
    gy = yy.to(tl.float32) * (2.0 / (H - 1.0)) - 1.0 + dy
    ix = ((gx + 1.0) * W - 1.0) / 2.0  # align_corners=False
    iy = ((gy + 1.0) * H - 1.0) / 2.0
    if HAS_INDEX:
        src = tl.load(index_ptr + n).to(tl.int32)
    else:
        src = n
    sampled = _bilinear_zeros(feat_ptr, src * sf_n, ix, iy, pmask, cmask, c * sf_c, H, W, sf_h, sf_w)
    mask2 = pmask[:, None] & cmask[None, :]
    warped = sampled * m[:, None]
    hv = tl.load(h_ptr + (n * sh_n + p * sh_p)[:, None] + (c * sh_c)[None, :], mask=mask2, other=0.0)
    out = warped + hv.to(tl.float32) * (1.0 - m)[:, None]
    offs = (n * so_n + p * so_p)[:, None] + (c * so_c)[None, :]
    tl.store(warped_ptr + offs, warped.to(warped_ptr.dtype.element_ty), mask=mask2)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask2)


INTERPRETED = not isinstance(_warp_blend_kernel, JITFunction)  # TRITON_INTERPRET=1 was set before the import
AUTOTUNE = not INTERPRETED and os.environ.get("LEO_RT_AUTOTUNE", "1").lower() not in ("0", "off", "false", "no")


def _tuned(channels_last: bool):
    configs = [triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=nw) for bp, bc, nw in CONFIGS[channels_last]]
    return triton.autotune(configs=configs, key=["C", "P", "CHANNELS_LAST"])(_warp_blend_kernel)


_TUNED = {cl: _tuned(cl) for cl in (False, True)} if AUTOTUNE else {}


def _rows_dense(t: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """t itself when its rows are dense (stride_h = W·stride_w, so a pixel is p = y·W + x), else a dense copy."""
    return t if t.stride(2) == t.shape[3] * t.stride(3) else t.contiguous(memory_format=layout)


def _tracing(*tensors: torch.Tensor) -> bool:
    """Whether the launch is being traced (torch.compile, export, AOT dispatch): then it goes through wrap_triton so
    the kernel lands in the graph. An eager call launches the kernel itself (the traceable wrapper costs ~1 ms);
    the interpreter's functions are always launched directly (they have nothing to trace)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    plain = all(type(t) is torch.Tensor for t in tensors)
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or not plain


def warp_blend_triton(
    feat: torch.Tensor,
    logits: torch.Tensor,
    h: torch.Tensor,
    src_index: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel; inputs already validated by leo_rt.kernels.warp.check_warp_inputs. Outputs take
    h's dtype and layout (channels-last or NCHW, dense). `config` (BLOCK_P, BLOCK_C, num_warps) forces one
    configuration instead of the autotuned choice. Traceable: the launch goes through torch.library.wrap_triton."""
    b, c, hh, ww = h.shape
    p = hh * ww
    channels_last = h.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    h = _rows_dense(h, layout)
    logits = _rows_dense(logits, torch.contiguous_format)
    warped = torch.empty_like(h, memory_format=layout)
    out = torch.empty_like(h, memory_format=layout)
    if not isinstance(b, torch.SymInt):  # concrete sizes (eager, or a trace with a static batch)
        if h.numel() == 0:
            return warped, out
        check_int32(feat, logits, h, out)
        check_grid(b, p, c, *MIN_BLOCKS)
    sf = list(feat.stride())
    if src_index is None and feat.shape[0] == 1:
        sf[0] = 0  # one source shared by every frame: read through a zero batch stride, never copied
    args = (feat, logits, h, warped, out, logits if src_index is None else src_index, c, hh, ww, p, *sf)
    args += (logits.stride(0), logits.stride(1), logits.stride(3), h.stride(0), h.stride(1), h.stride(3))
    args += (out.stride(0), out.stride(1), out.stride(3))
    meta = dict(CHANNELS_LAST=channels_last, HAS_INDEX=src_index is not None, ACCURATE_TANH=not INTERPRETED)
    if config is None and AUTOTUNE:
        kernel = _TUNED[channels_last]

        def grid(cfg):
            return (b * triton.cdiv(p, cfg["BLOCK_P"]), triton.cdiv(c, cfg["BLOCK_C"]))

    else:
        block_p, block_c, num_warps = config or (INTERPRETER_CONFIG if INTERPRETED else CONFIGS[channels_last][0])
        kernel = _warp_blend_kernel
        grid = (b * triton.cdiv(p, block_p), triton.cdiv(c, block_c))
        meta.update(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    launch = kernel if INTERPRETED or not _tracing(feat, logits, h) else wrap_triton(kernel)
    with device_guard(h):
        launch[grid](*args, **meta)
    return warped, out


__all__ = ["AUTOTUNE", "CONFIGS", "INTERPRETED", "warp_blend_triton"]
