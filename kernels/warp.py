"""Warp + occlusion blend (ToFlow of ARCHITECTURE.md §2), PyTorch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def warp_blend(feat: torch.Tensor, logits: torch.Tensor, h: torch.Tensor, grid: torch.Tensor):
    """Reference warp + occlusion blend of §2 (ToFlow). feat (1 or N, C, r, r) source features, broadcast when 1;
    logits (N, 3, r, r); h (N, C, r, r); grid (1, r, r, 2) base grid. Coordinates in fp32 whatever the dtype.
    Returns (f̃, h') with f̃ = grid_sample(feat, base + tanh(L[:, :2])) · sigmoid(L[:, 2]) and h' = f̃ + h·(1 − m)."""
    n = logits.shape[0]
    coords = grid + torch.tanh(logits[:, 0:2].to(grid.dtype)).permute(0, 2, 3, 1)
    mask = torch.sigmoid(logits[:, 2:3])
    feat = feat.to(coords.dtype)  # before the broadcast, so a low-precision source is converted once, not N times
    if feat.shape[0] != n:
        feat = feat.expand(n, -1, -1, -1)  # a view: the source features are shared, never copied
    sampled = F.grid_sample(feat, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
    # grid_sample writes NCHW whatever the input layout; match h's layout so the blend is one dense pass
    sampled = sampled.to(h.dtype).contiguous(memory_format=_layout(h))
    return sampled * mask, torch.lerp(h, sampled, mask)  # h' = f̃ + h·(1 − m) = h + m·(g − h)


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format
