"""Warp + occlusion blend (ToFlow of docs/ARCHITECTURE.md §2): PyTorch reference, the `leo_rt::warp_blend` op, and
the dispatcher the renderer calls.

Which path runs:
- CUDA tensors, Triton importable, kernels enabled → the fused Triton kernel, through the op. On a machine with a
  GPU (or in Triton's interpreter) the op is a `torch.library.triton_op`: eager calls launch the kernel, while
  torch.compile and AOTInductor trace into it (the launch goes through `wrap_triton`) and compile the kernel into
  their output, so a CUDA AOTInductor package is self-contained; torch.export keeps it as one node. Elsewhere it
  is a plain custom op (registering a triton_op imports torch._inductor, ~2 s, not worth it without a GPU).
- otherwise (CPU, no Triton, `LEO_RT_KERNELS=0`, or `set_kernels_enabled(False)`) → the PyTorch reference, called
  directly, outside the op. The op itself runs the reference on non-CUDA tensors (for tests and CPU traces).
- during ONNX export → the reference (standard GridSample and element-wise ops), unless
  `onnx_custom_op(True)` asks for one `WarpBlend` node in the custom domain `leo_rt` (inputs feat, logits, h;
  outputs f̃, h'), for a runtime that implements it.

Sources: `feat` is (1, C, H, W) shared by every frame, (N, C, H, W) one per frame, or, with `src_index` (N,)
integers, a (K, C, H, W) stack of which frame n reads source src_index[n].
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import InputError

_STATE = {
    "enabled": os.environ.get("LEO_RT_KERNELS", "1").lower() not in ("0", "off", "false", "no"),
    "onnx_custom": False,
}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ONNX_OP = "leo_rt::WarpBlend"


def set_kernels_enabled(enabled: bool) -> None:
    """Turn the Triton kernels on or off for this process (the environment switch is LEO_RT_KERNELS=0)."""
    _STATE["enabled"] = bool(enabled)


def kernels_enabled() -> bool:
    return _STATE["enabled"]


_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: cheap, and traceable by torch.compile


def triton_available() -> bool:
    return _TRITON


@contextmanager
def onnx_custom_op(enabled: bool = True):
    """While active, the warp traces as one custom-domain ONNX node instead of decomposing (for tracing towards
    ONNX only: the node has no PyTorch implementation)."""
    saved = _STATE["onnx_custom"]
    _STATE["onnx_custom"] = enabled
    try:
        yield
    finally:
        _STATE["onnx_custom"] = saved


def base_grid(h: int, w: int | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, h, w, 2) grid with x_i = −1 + 2i/(w−1) along width ([..., 0]) and y_j = −1 + 2j/(h−1) along height:
    the values of linspace(−1, 1, n) rounded to fp32 as published. Built with arange so exporters keep sizes
    symbolic. With align_corners=False these are not pixel centres (a zero flow is not the identity warp)."""
    w = h if w is None else w
    xs = torch.arange(w, device=device, dtype=torch.float64) * (2.0 / (w - 1)) - 1.0
    ys = torch.arange(h, device=device, dtype=torch.float64) * (2.0 / (h - 1)) - 1.0
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0).float().to(dtype)


def check_warp_inputs(
    feat: torch.Tensor, logits: torch.Tensor, h: torch.Tensor, src_index: torch.Tensor | None = None
) -> None:
    """Clear errors for inputs the op does not take. The values of src_index are not read here (that would wait
    for the GPU): callers check their range (Animator.render does)."""
    for name, t in (("feat", feat), ("logits", logits), ("h", h)):
        if t.dim() != 4:
            raise InputError(f"warp_blend: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise InputError(f"warp_blend: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    b, c, hh, ww = h.shape
    if logits.shape != (b, 3, hh, ww):
        raise InputError(
            f"warp_blend: logits must be ({b}, 3, {hh}, {ww}) to match h {tuple(h.shape)}, got {tuple(logits.shape)}"
        )
    if src_index is None:
        if feat.shape[1:] != h.shape[1:] or feat.shape[0] not in (1, b):
            raise InputError(
                f"warp_blend: feat must be (1 or {b}, {c}, {hh}, {ww}) to match h, got {tuple(feat.shape)}"
            )
    else:
        if feat.shape[1:] != h.shape[1:]:
            raise InputError(f"warp_blend: feat must be (K, {c}, {hh}, {ww}) to match h, got {tuple(feat.shape)}")
        if src_index.dim() != 1 or src_index.shape[0] != b:
            raise InputError(f"warp_blend: src_index must be ({b},), a source per frame, got {tuple(src_index.shape)}")
        if src_index.dtype not in (torch.int64, torch.int32):
            raise InputError(f"warp_blend: src_index has dtype {src_index.dtype}; use torch.int64")
        if src_index.device != h.device:
            raise InputError(f"warp_blend: src_index is on {src_index.device} but h on {h.device}")
    if feat.dtype != h.dtype:
        raise InputError(f"warp_blend: feat ({feat.dtype}) and h ({h.dtype}) must share a dtype")
    if hh < 2 or ww < 2:
        raise InputError(f"warp_blend: maps must be at least 2×2 (the base grid divides by size − 1), got {hh}×{ww}")
    if not (feat.device == logits.device == h.device):
        raise InputError(f"warp_blend: inputs on different devices ({feat.device}, {logits.device}, {h.device})")


def warp_blend_reference(
    feat: torch.Tensor,
    logits: torch.Tensor,
    h: torch.Tensor,
    grid: torch.Tensor | None = None,
    src_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference. feat (1 or N, C, H, W) source features, broadcast when 1 (a view, never a copy), or
    (K, C, H, W) with src_index (N,): frame n samples feat[src_index[n]] (gathered here); logits (N, 3, H, W);
    h (N, C, H, W); grid the (1, H, W, 2) base grid (built when None). Coordinates in fp32 (or wider) whatever the
    dtype. Returns (f̃, h') with f̃ = grid_sample(feat, base + tanh(L[:, :2]))·sigmoid(L[:, 2]) and
    h' = f̃ + h·(1 − m), both in h's dtype and memory layout."""
    n = logits.shape[0]
    if grid is None:
        grid = base_grid(h.shape[2], h.shape[3], device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
    coords = grid + torch.tanh(logits[:, 0:2].to(grid.dtype)).permute(0, 2, 3, 1)
    mask = torch.sigmoid(logits[:, 2:3].to(h.dtype))
    feat = feat.to(coords.dtype)  # before the broadcast, so a low-precision source is converted once, not N times
    if src_index is not None:
        feat = feat.index_select(0, src_index)  # (N, C, H, W): frame n's own source
    elif feat.shape[0] == 1:  # (a static test, so a symbolic batch stays symbolic under export)
        feat = feat.expand(n, -1, -1, -1)  # a view: the source features are shared, never copied
    sampled = F.grid_sample(feat, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
    # grid_sample writes NCHW whatever the input layout; match h's layout so the blend is one dense pass
    sampled = sampled.to(h.dtype).contiguous(memory_format=_layout(h))
    return sampled * mask, torch.lerp(h, sampled, mask)  # h' = f̃ + h·(1 − m) = h + m·(g − h)


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _use_triton(t: torch.Tensor) -> bool:
    """The dispatcher's choice: the Triton kernel (through the op) for CUDA tensors when kernels are on."""
    return t.is_cuda and _STATE["enabled"] and _TRITON


def _kernel_device(t: torch.Tensor) -> bool:
    """The op's choice: the kernel on CUDA tensors (when Triton is importable), the reference elsewhere."""
    return t.is_cuda and _TRITON


def _env_on(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# A triton_op on a GPU machine or in the interpreter (decided once, at import: an op cannot change its kind);
# LEO_RT_TRITON_OP=1 asks for it anyway (the tests trace the CUDA path with fake CUDA tensors on a CPU machine).
_TRITON_OP = _TRITON and (_env_on("LEO_RT_TRITON_OP") or _env_on("TRITON_INTERPRET") or torch.cuda.is_available())
if _TRITON_OP:
    # imported here so that torch.library.triton_op finds the kernel behind `_launch_triton` (the AOTAutograd
    # cache key hashes its source)
    from .warp_triton import warp_blend_triton as _launch_triton
else:

    def _launch_triton(feat, logits, h, src_index):
        from .warp_triton import warp_blend_triton

        return warp_blend_triton(feat, logits, h, src_index)


def _warp_blend_impl(
    feat: torch.Tensor, logits: torch.Tensor, h: torch.Tensor, src_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of `leo_rt::warp_blend` (and its fake): outputs dense in h's layout."""
    check_warp_inputs(feat, logits, h, src_index)
    if _kernel_device(h):
        return _launch_triton(feat, logits, h, src_index)
    warped, out = warp_blend_reference(feat, logits, h, None, src_index)
    return warped.contiguous(memory_format=_layout(h)), out.contiguous(memory_format=_layout(h))


if _TRITON_OP:
    warp_blend_op = torch.library.triton_op("leo_rt::warp_blend", _warp_blend_impl, mutates_args=())
else:
    warp_blend_op = torch.library.custom_op("leo_rt::warp_blend", _warp_blend_impl, mutates_args=())
    warp_blend_op.register_fake(_warp_blend_impl)  # the reference traces; empty outputs would do as well


def warp_blend(
    feat: torch.Tensor,
    logits: torch.Tensor,
    h: torch.Tensor,
    grid: torch.Tensor | None = None,
    src_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the renderer calls: the op (Triton) on CUDA, the reference on CPU or when kernels are off; under ONNX
    export the reference, or one custom node when `onnx_custom_op()` is active. src_index (N,) int64: frame n
    reads feat[src_index[n]] of a (K, C, H, W) stack (the kernel offsets its reads; the reference gathers)."""
    if _STATE["onnx_custom"]:  # tracing for ONNX: one node for a runtime with its own WarpBlend (a TRT plugin)
        if src_index is not None:
            feat = feat.index_select(0, src_index)  # the node takes one source per frame (or one for all)
        warped, out = torch.onnx.ops.symbolic_multi_out(
            ONNX_OP, (feat, logits, h), dtypes=(h.dtype, h.dtype), shapes=(h.shape, h.shape), version=1
        )
        return warped, out
    if torch.onnx.is_in_onnx_export():
        return warp_blend_reference(feat, logits, h, grid, src_index)
    if _use_triton(h):
        return torch.ops.leo_rt.warp_blend(feat, logits, h, src_index)
    return warp_blend_reference(feat, logits, h, grid, src_index)
