"""Fused warp + occlusion blend (ToFlow of ARCHITECTURE.md §2) as one Triton kernel.

Per pixel it reads the three logits once, computes Δ = tanh(L[0:2]), m = sigmoid(L[2]), the grid
base + Δ (base_i = −1 + 2i/(size − 1), built in the kernel) and the four bilinear taps (zeros padding,
align_corners=False) in fp32; then, channel block by channel block, it gathers the source features, and writes
f̃ = sample·m and h' = f̃ + h·(1 − m). A source shared by all frames (batch 1) is read through a zero batch stride,
never copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid_sample import STORAGE_DTYPES, _bilinear_zeros, _pow2, check_int32


@triton.jit
def _warp_blend_kernel(
    feat_ptr,  # (Bf, C, H, W) source features; Bf = 1 is read with a zero batch stride
    logits_ptr,  # (B, 3, H, W) flow/mask pre-activations
    h_ptr,  # (B, C, H, W) decoder features
    warped_ptr,  # (B, C, H, W) out: f̃
    out_ptr,  # (B, C, H, W) out: h'
    C,
    H,
    W,
    P,
    sf_n,
    sf_c,
    sf_h,
    sf_w,
    sl_n,
    sl_c,
    sl_h,
    sl_w,
    sh_n,
    sh_c,
    sh_h,
    sh_w,
    so_n,
    so_c,
    so_h,
    so_w,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    yy = p // W
    xx = p % W
    lg = n * sl_n + yy * sl_h + xx * sl_w
    l0 = tl.load(logits_ptr + lg, mask=pmask, other=0.0).to(tl.float32)
    l1 = tl.load(logits_ptr + lg + sl_c, mask=pmask, other=0.0).to(tl.float32)
    l2 = tl.load(logits_ptr + lg + 2 * sl_c, mask=pmask, other=0.0).to(tl.float32)
    dx = 1.0 - 2.0 / (tl.exp(2.0 * l0) + 1.0)  # tanh, saturating correctly at ±inf
    dy = 1.0 - 2.0 / (tl.exp(2.0 * l1) + 1.0)
    m = 1.0 / (1.0 + tl.exp(-l2))  # sigmoid
    gx = xx.to(tl.float32) * (2.0 / (W - 1.0)) - 1.0 + dx
    gy = yy.to(tl.float32) * (2.0 / (H - 1.0)) - 1.0 + dy
    ix = ((gx + 1.0) * W - 1.0) / 2.0  # align_corners=False
    iy = ((gy + 1.0) * H - 1.0) / 2.0
    fbase = n * sf_n
    hpix = n * sh_n + yy * sh_h + xx * sh_w
    opix = n * so_n + yy * so_h + xx * so_w
    keep = 1.0 - m
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        mask2 = pmask[:, None] & cmask[None, :]
        sampled = _bilinear_zeros(feat_ptr, fbase, ix, iy, pmask, cmask, c * sf_c, H, W, sf_h, sf_w)
        warped = sampled * m[:, None]
        hv = tl.load(h_ptr + hpix[:, None] + (c * sh_c)[None, :], mask=mask2, other=0.0).to(tl.float32)
        out = warped + hv * keep[:, None]
        offs = opix[:, None] + (c * so_c)[None, :]
        tl.store(warped_ptr + offs, warped.to(warped_ptr.dtype.element_ty), mask=mask2)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask2)


def warp_blend_triton(feat: torch.Tensor, logits: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel; inputs already validated by leo_rt.kernels.warp.check_warp_inputs.
    Outputs take h's dtype and memory layout."""
    b, c, hh, ww = h.shape
    warped = torch.empty_like(h)
    out = torch.empty_like(h)
    if h.numel() == 0:
        return warped, out
    check_int32(feat, logits, h, out)
    sf = list(feat.stride())
    if feat.shape[0] == 1:
        sf[0] = 0  # broadcast the shared source over the batch
    block_p, block_c = 64, _pow2(c, 1, 32)
    _warp_blend_kernel[(triton.cdiv(hh * ww, block_p), b)](
        feat,
        logits,
        h,
        warped,
        out,
        c,
        hh,
        ww,
        hh * ww,
        *sf,
        *logits.stride(),
        *h.stride(),
        *out.stride(),
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    return warped, out


__all__ = ["STORAGE_DTYPES", "warp_blend_triton"]
