"""The one runner interface: what the frame core needs from the animator and from every backend.

`Animator` (the eager fast form) and every backend in `leo_rt.backends` implement it; pipelines, sessions and the
server take a `Runner`, never a concrete class. See docs/ARCHITECTURE.md §5.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .errors import InputError
from .fast import SourceState


@runtime_checkable
class Runner(Protocol):
    """Images → source states and motion codes; (source state, codes) → frames. Images and frames are
    (B, 3, S, S) floats in [-1, 1] (frames unclamped); codes are (N, motion_dim)."""

    @property
    def size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def encode_source(self, images: torch.Tensor) -> SourceState: ...

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor: ...

    def render(self, source: SourceState, alpha: torch.Tensor, src_index: torch.Tensor | None = None) -> torch.Tensor:
        """Frames for codes alpha (N, D). src_index None: the source has batch 1 (shared by every frame) or N
        (one per frame). src_index (N,) integers: frame n uses source src_index[n] of a K-source state."""
        ...

    def relative_alpha(self, source: SourceState, alpha_drv: torch.Tensor, alpha_start: torch.Tensor) -> torch.Tensor:
        """Relative reenactment as the published demo: alpha_drv − alpha_start + alpha_src."""
        ...


def relative_alpha(source: SourceState, alpha_drv: torch.Tensor, alpha_start: torch.Tensor) -> torch.Tensor:
    """alpha_drv − alpha_start + alpha_src (the published demo's relative mode), on the source's device/dtype."""
    ref = source.alpha_src
    d = ref.shape[-1]
    for name, t in (("driving codes", alpha_drv), ("start code", alpha_start)):
        if not isinstance(t, torch.Tensor) or t.shape[-1] != d or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"relative_alpha: {name} must be (N, {d}) motion codes, got {shape}")
    alpha_drv = alpha_drv.to(device=ref.device, dtype=ref.dtype)
    return alpha_drv - alpha_start.to(alpha_drv) + ref


def render_by_source(render, source: SourceState, alpha: torch.Tensor, src_index: torch.Tensor) -> torch.Tensor:
    """Multi-source rendering for a runner whose render step takes one source at a time (exported graphs):
    frames are grouped by source, each group rendered with its source shared, and put back in order."""
    idx = src_index.to("cpu", torch.long)
    out: torch.Tensor | None = None
    for k in torch.unique(idx).tolist():
        rows = (idx == k).nonzero().flatten()
        frames = render(select_source(source, k), alpha[rows.to(alpha.device)])
        if out is None:
            out = frames.new_empty((alpha.shape[0], *frames.shape[1:]))
        out[rows.to(out.device)] = frames
    assert out is not None
    return out


def select_source(source: SourceState, k: int) -> SourceState:
    """Source k of a K-source state, as a batch-1 state (views, no copy)."""
    return SourceState(
        source.w_a[k : k + 1],
        [f[k : k + 1] for f in source.feats],
        source.alpha_src[k : k + 1],
        source.styles0[k : k + 1],
    )
