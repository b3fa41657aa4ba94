"""Warp + occlusion blend (ToFlow of ARCHITECTURE.md §2): PyTorch reference, the `leo_rt::warp_blend` custom op,
and the dispatcher the renderer calls.

Which path runs:
- CUDA tensors, Triton importable, kernels enabled → the fused Triton kernel (through the custom op, so eager,
  torch.compile and torch.export all see one opaque op with a fake implementation).
- otherwise (CPU, no Triton, `LEO_RT_KERNELS=0`, or `set_kernels_enabled(False)`) → the PyTorch reference.
- during ONNX export → the reference (standard GridSample and element-wise ops), unless
  `onnx_custom_op(True)` asks for one `WarpBlend` node in the custom domain `leo_rt` (inputs feat, logits, h;
  outputs f̃, h'), for a runtime that implements it.
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


def check_warp_inputs(feat: torch.Tensor, logits: torch.Tensor, h: torch.Tensor) -> None:
    """Clear errors for inputs the op does not take."""
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
    if feat.shape[1:] != h.shape[1:] or feat.shape[0] not in (1, b):
        raise InputError(f"warp_blend: feat must be (1 or {b}, {c}, {hh}, {ww}) to match h, got {tuple(feat.shape)}")
    if feat.dtype != h.dtype:
        raise InputError(f"warp_blend: feat ({feat.dtype}) and h ({h.dtype}) must share a dtype")
    if hh < 2 or ww < 2:
        raise InputError(f"warp_blend: maps must be at least 2×2 (the base grid divides by size − 1), got {hh}×{ww}")
    if not (feat.device == logits.device == h.device):
        raise InputError(f"warp_blend: inputs on different devices ({feat.device}, {logits.device}, {h.device})")


def warp_blend_reference(
    feat: torch.Tensor, logits: torch.Tensor, h: torch.Tensor, grid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference. feat (1 or N, C, H, W) source features, broadcast when 1 (a view, never a copy);
    logits (N, 3, H, W); h (N, C, H, W); grid the (1, H, W, 2) base grid (built when None). Coordinates in fp32
    (or wider) whatever the dtype. Returns (f̃, h') with f̃ = grid_sample(feat, base + tanh(L[:, :2]))·sigmoid(L[:, 2])
    and h' = f̃ + h·(1 − m), both in h's dtype and memory layout."""
    n = logits.shape[0]
    if grid is None:
        grid = base_grid(h.shape[2], h.shape[3], device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
    coords = grid + torch.tanh(logits[:, 0:2].to(grid.dtype)).permute(0, 2, 3, 1)
    mask = torch.sigmoid(logits[:, 2:3].to(h.dtype))
    feat = feat.to(coords.dtype)  # before the broadcast, so a low-precision source is converted once, not N times
    if feat.shape[0] == 1:  # (a static test, so a symbolic batch stays symbolic under export)
        feat = feat.expand(n, -1, -1, -1)  # a view: the source features are shared, never copied
    sampled = F.grid_sample(feat, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
    # grid_sample writes NCHW whatever the input layout; match h's layout so the blend is one dense pass
    sampled = sampled.to(h.dtype).contiguous(memory_format=_layout(h))
    return sampled * mask, torch.lerp(h, sampled, mask)  # h' = f̃ + h·(1 − m) = h + m·(g − h)


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _STATE["enabled"] and _TRITON


@torch.library.custom_op("leo_rt::warp_blend", mutates_args=())
def warp_blend_op(feat: torch.Tensor, logits: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused warp as an opaque torch op: the Triton kernel on CUDA, the reference elsewhere."""
    check_warp_inputs(feat, logits, h)
    if _use_triton(h):
        from .warp_blend import warp_blend_triton

        return warp_blend_triton(feat, logits, h)
    warped, out = warp_blend_reference(feat, logits, h)
    return warped.contiguous(memory_format=_layout(h)), out.contiguous(memory_format=_layout(h))


@warp_blend_op.register_fake
def _warp_blend_fake(feat, logits, h):
    check_warp_inputs(feat, logits, h)
    return torch.empty_like(h), torch.empty_like(h)


def warp_blend(
    feat: torch.Tensor, logits: torch.Tensor, h: torch.Tensor, grid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the renderer calls: the custom op (Triton) on CUDA, the reference on CPU or when kernels are off;
    under ONNX export the reference, or the op when `onnx_custom_op()` is active."""
    if _STATE["onnx_custom"]:  # tracing for ONNX: one node for a runtime with its own WarpBlend (a TRT plugin)
        warped, out = torch.onnx.ops.symbolic_multi_out(
            ONNX_OP, (feat, logits, h), dtypes=(h.dtype, h.dtype), shapes=(h.shape, h.shape), version=1
        )
        return warped, out
    if torch.onnx.is_in_onnx_export():
        return warp_blend_reference(feat, logits, h, grid)
    if _use_triton(h):
        return torch.ops.leo_rt.warp_blend(feat, logits, h)
    return warp_blend_reference(feat, logits, h, grid)


def grid_sample(
    inp: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """grid_sample with the Triton kernel on CUDA (bilinear/nearest, zeros/border), torch's elsewhere."""
    if _use_triton(inp) and mode in ("bilinear", "nearest") and padding_mode in ("zeros", "border"):
        from .grid_sample import grid_sample_triton

        return grid_sample_triton(inp, grid, mode, padding_mode, align_corners)
    return F.grid_sample(inp, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
