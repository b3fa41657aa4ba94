"""Triton grid_sample (2-D; bilinear or nearest; zeros or border padding; either align_corners), with the same
semantics as torch.nn.functional.grid_sample, and the sampling helpers the fused warp kernel shares.

The library renders through the fused warp (leo_rt.kernels.warp_triton); this standalone kernel is kept for the
kernel tests and benchmarks. Importing this module imports triton. Coordinates and interpolation weights are fp32
whatever the storage dtype; indexing is 32-bit (the launcher checks that every offset fits).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..errors import InputError

MODES = {"bilinear": 0, "nearest": 1}
PADDINGS = {"zeros": 0, "border": 1}
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1
GRID_AXIS_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 takes 2**31 − 1)
SAMPLE_CONFIG = (64, 16, 4)  # BLOCK_P, BLOCK_C, num_warps: 8 elements a thread, no spills on sm_90


@triton.jit
def _unnormalize(coord, size, ALIGN_CORNERS: tl.constexpr):
    # [-1, 1] → pixel index space, as ATen's grid_sampler_compute_source_index
    if ALIGN_CORNERS:
        return (coord + 1.0) / 2.0 * (size - 1)
    else:
        return ((coord + 1.0) * size - 1.0) / 2.0


@triton.jit
def _rint(x):
    # round half to even, as std::nearbyint in ATen's nearest mode
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _tap(ptr, base, xi, yi, w, valid, cmask, off_c, stride_h, stride_w):
    """One interpolation tap for a (BLOCK_P, BLOCK_C) tile: w · ptr[base + c·stride_c + y·stride_h + x·stride_w],
    zero where the tap is outside the map. xi, yi are int32 (BLOCK_P,), w fp32 (BLOCK_P,)."""
    xs = tl.where(valid, xi, 0)
    ys = tl.where(valid, yi, 0)
    offs = base + off_c[None, :] + (ys * stride_h + xs * stride_w)[:, None]
    v = tl.load(ptr + offs, mask=valid[:, None] & cmask[None, :], other=0.0)
    return v.to(tl.float32) * w[:, None]


@triton.jit
def _bilinear_zeros(ptr, base, ix, iy, pmask, cmask, off_c, H, W, stride_h, stride_w):
    """Bilinear sample with zeros padding at pixel coordinates (ix, iy): a (BLOCK_P, BLOCK_C) fp32 tile."""
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    wx1 = ix - x0f
    wy1 = iy - y0f
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    # clamp before the int conversion so huge or non-finite coordinates cannot overflow (they are masked anyway)
    x0 = tl.minimum(tl.maximum(x0f, -2.0), W + 1.0).to(tl.int32)
    y0 = tl.minimum(tl.maximum(y0f, -2.0), H + 1.0).to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    in_x0 = (x0 >= 0) & (x0 < W)
    in_x1 = (x1 >= 0) & (x1 < W)
    in_y0 = (y0 >= 0) & (y0 < H)
    in_y1 = (y1 >= 0) & (y1 < H)
    acc = _tap(ptr, base, x0, y0, wx0 * wy0, pmask & in_x0 & in_y0, cmask, off_c, stride_h, stride_w)
    acc += _tap(ptr, base, x1, y0, wx1 * wy0, pmask & in_x1 & in_y0, cmask, off_c, stride_h, stride_w)
    acc += _tap(ptr, base, x0, y1, wx0 * wy1, pmask & in_x0 & in_y1, cmask, off_c, stride_h, stride_w)
    acc += _tap(ptr, base, x1, y1, wx1 * wy1, pmask & in_x1 & in_y1, cmask, off_c, stride_h, stride_w)
    return acc


@triton.jit
def _grid_sample_kernel(
    inp_ptr,  # (N, C, H_in, W_in), any strides
    grid_ptr,  # (N, H_out, W_out, 2), any strides
    out_ptr,  # (N, C, H_out, W_out)
    C,
    H_in,
    W_in,
    W_out,
    P_out,
    si_n,
    si_c,
    si_h,
    si_w,
    sg_n,
    sg_h,
    sg_w,
    sg_k,
    so_n,
    so_c,
    so_h,
    so_w,
    MODE: tl.constexpr,  # 0 bilinear, 1 nearest
    PADDING: tl.constexpr,  # 0 zeros, 1 border
    ALIGN_CORNERS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grid axis 0: (frame, pixel block), frame-major, so the batch is not bound by axis 1's 65535; axis 1: channels
    n_pb = tl.cdiv(P_out, BLOCK_P)
    pid = tl.program_id(0)
    n = pid // n_pb
    p = (pid - n * n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = p < P_out
    cmask = c < C
    oy = p // W_out
    ox = p - oy * W_out
    g = n * sg_n + oy * sg_h + ox * sg_w
    gx = tl.load(grid_ptr + g, mask=pmask, other=0.0).to(tl.float32)
    gy = tl.load(grid_ptr + g + sg_k, mask=pmask, other=0.0).to(tl.float32)
    ix = _unnormalize(gx, W_in, ALIGN_CORNERS)
    iy = _unnormalize(gy, H_in, ALIGN_CORNERS)
    if PADDING == 1:  # border: clip the source coordinate into the map
        ix = tl.minimum(tl.maximum(ix, 0.0), W_in - 1.0)
        iy = tl.minimum(tl.maximum(iy, 0.0), H_in - 1.0)
    base = n * si_n
    off_c = c * si_c
    if MODE == 0:
        acc = _bilinear_zeros(inp_ptr, base, ix, iy, pmask, cmask, off_c, H_in, W_in, si_h, si_w)
    else:
        xr = _rint(ix)
        yr = _rint(iy)
        valid = pmask & (xr >= 0.0) & (xr <= W_in - 1.0) & (yr >= 0.0) & (yr <= H_in - 1.0)
        xi = tl.minimum(tl.maximum(xr, -1.0), W_in + 0.0).to(tl.int32)
        yi = tl.minimum(tl.maximum(yr, -1.0), H_in + 0.0).to(tl.int32)
        acc = _tap(inp_ptr, base, xi, yi, tl.full([BLOCK_P], 1.0, tl.float32), valid, cmask, off_c, si_h, si_w)
    offs = (n * so_n + oy * so_h + ox * so_w)[:, None] + (c * so_c)[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


def check_int32(*tensors: torch.Tensor) -> None:
    """Every element offset of every tensor must fit in int32 (the kernels index with 32 bits)."""
    for t in tensors:
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True) if s > 0)
        if span > INT32_MAX:
            raise InputError(
                f"a tensor of shape {tuple(t.shape)} spans {span} elements, beyond 32-bit indexing; "
                "split the batch into smaller calls"
            )


def check_grid(n: int, p: int, c: int, block_p: int, block_c: int) -> tuple[int, int]:
    """The launch grid (frames × pixel blocks, channel blocks), within CUDA's axis limits."""
    axis0, axis1 = n * triton.cdiv(p, block_p), triton.cdiv(c, block_c)
    if axis0 > INT32_MAX or axis1 > GRID_AXIS_MAX:
        raise InputError(f"{n} frames of {c} channels × {p} pixels exceed one launch; split the batch")
    return axis0, axis1


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device). A no-op for CPU tensors and while
    tracing (fake or functional tensors: the compiled code guards its device itself)."""
    return torch.cuda.device(t.device) if t.is_cuda and type(t) is torch.Tensor else contextlib.nullcontext()


def grid_sample_triton(
    inp: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Triton launch of grid_sample. inp (N, C, H_in, W_in); grid (N, H_out, W_out, 2) → (N, C, H_out, W_out),
    in inp's dtype and memory layout."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if padding_mode not in PADDINGS:
        raise InputError(
            f"padding_mode must be one of {sorted(PADDINGS)} (reflection is not supported), got {padding_mode!r}"
        )
    if inp.dim() != 4 or grid.dim() != 4 or grid.shape[-1] != 2:
        raise InputError(
            f"expected input (N, C, H, W) and grid (N, H_out, W_out, 2), got {tuple(inp.shape)} and {tuple(grid.shape)}"
        )
    if grid.shape[0] != inp.shape[0]:
        raise InputError(f"grid batch {grid.shape[0]} does not match input batch {inp.shape[0]}")
    if inp.dtype not in STORAGE_DTYPES or grid.dtype not in STORAGE_DTYPES:
        raise InputError(f"dtypes must be float32, float16 or bfloat16, got {inp.dtype} and {grid.dtype}")
    if inp.device != grid.device:
        raise InputError(f"input on {inp.device} but grid on {grid.device}")
    n, c, h_in, w_in = inp.shape
    _, h_out, w_out, _ = grid.shape
    layout = torch.channels_last if inp.is_contiguous(memory_format=torch.channels_last) and c > 1 else None
    out = torch.empty(
        (n, c, h_out, w_out), device=inp.device, dtype=inp.dtype, memory_format=layout or torch.contiguous_format
    )
    if out.numel() == 0:
        return out
    check_int32(inp, grid, out)
    block_p, block_c, num_warps = SAMPLE_CONFIG
    launch = check_grid(n, h_out * w_out, c, block_p, block_c)
    with device_guard(inp):
        _grid_sample_kernel[launch](
            inp,
            grid,
            out,
            c,
            h_in,
            w_in,
            w_out,
            h_out * w_out,
            *inp.stride(),
            *grid.stride(),
            *out.stride(),
            MODE=MODES[mode],
            PADDING=PADDINGS[padding_mode],
            ALIGN_CORNERS=bool(align_corners),
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return out
