"""The public animator API: load a checkpoint, encode a source once, render frames from motion codes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import build_lia, read_checkpoint, save_lia
from .errors import InputError
from .fast import FastEncoder, FastRenderer, SourceState
from .model import LIA, LIAConfig

_CL = torch.channels_last


class Animator:
    """An LIA image animator in its fast form (docs/ARCHITECTURE.md §3), built from the official parameters.

    ``reference`` is the same network in the published form (same parameter tensors), for comparison.
    Images are (B, 3, S, S) floats in [-1, 1]; frames come back the same way, unclamped.
    """

    def __init__(self, lia: LIA):
        self.reference = lia.eval().requires_grad_(False)
        self.config: LIAConfig = lia.cfg
        self.encoder = FastEncoder(lia)
        self.renderer = FastRenderer(lia)

    @classmethod
    def random(cls, config: LIAConfig | str = "lia-256", *, seed: int = 0, device="cpu", dtype=torch.float32):
        """An animator with freshly initialised (untrained) weights, as the published code initialises them."""
        cfg = LIAConfig.from_name(config) if isinstance(config, str) else config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lia = LIA(cfg)
        return cls(lia.to(device=device, dtype=dtype))

    @property
    def size(self) -> int:
        return self.config.size

    @property
    def device(self) -> torch.device:
        return self.renderer.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.renderer.q.dtype

    def _images(self, images: torch.Tensor, what: str) -> torch.Tensor:
        s = self.size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(
                f"{what} must be a (B, 3, {s}, {s}) tensor in [-1, 1], got {shape}; load files with "
                f"leo_rt.io.load_image(path, {s}), which center-crops and resizes"
            )
        return images.to(device=self.device, dtype=self.dtype).contiguous(memory_format=_CL)

    @torch.no_grad()
    def encode_source(self, images: torch.Tensor) -> SourceState:
        """Encode source images once: w_a, the features, alpha_src and the per-source modulations."""
        w_a, feats = self.encoder(self._images(images, "source images"))
        return SourceState(w_a, feats, self.encoder.motion_from_wa(w_a), self.renderer.styles0(w_a))

    @torch.no_grad()
    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        """Motion codes alpha (B, motion_dim) of driving images."""
        w_a, _ = self.encoder(self._images(images, "driving images"))
        return self.encoder.motion_from_wa(w_a)

    @torch.no_grad()
    def render(self, source: SourceState, alpha: torch.Tensor, src_index: torch.Tensor | None = None) -> torch.Tensor:
        """Frames (N, 3, S, S) for motion codes alpha (N, motion_dim), absolute mode z = w_a + alpha·Qᵀ.
        Without src_index the source has batch 1 (shared by all N frames, never copied) or batch N (one source per
        frame). With src_index (N,) integers in [0, K), frame n renders source src_index[n] of a K-source state
        (several sources in one batch; their features are read in place, never copied per frame)."""
        m = self.config.motion_dim
        if not isinstance(alpha, torch.Tensor) or alpha.dim() != 2 or alpha.shape[1] != m:
            shape = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
            raise InputError(f"alpha must be an (N, {m}) tensor of motion codes, got {shape}")
        if src_index is not None:
            src_index = self._src_index(src_index, alpha.shape[0], source.batch)
        elif source.batch not in (1, alpha.shape[0]):
            raise InputError(
                f"a source state of batch {source.batch} cannot render {alpha.shape[0]} frames: encode one source "
                "(batch 1, shared by every frame) or one source per frame, or pass src_index"
            )
        alpha = alpha.to(device=self.device, dtype=self.dtype)
        return self.renderer(alpha, source.styles0, source.feats, src_index).contiguous()

    def _src_index(self, src_index: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """src_index checked (shape (n,), integers in [0, k)) and moved to the device as int64. The range check
        reads the values: pass the index on the CPU to keep it free of a device sync."""
        if not isinstance(src_index, torch.Tensor) or src_index.shape != (n,):
            shape = tuple(src_index.shape) if isinstance(src_index, torch.Tensor) else type(src_index).__name__
            raise InputError(f"src_index must be an ({n},) tensor, one source index per frame, got {shape}")
        if src_index.dtype.is_floating_point or src_index.dtype.is_complex or src_index.dtype == torch.bool:
            raise InputError(f"src_index must hold integers (torch.int64), got {src_index.dtype}")
        if n and (int(src_index.min()) < 0 or int(src_index.max()) >= k):
            lo, hi = int(src_index.min()), int(src_index.max())
            raise InputError(f"src_index values must lie in [0, {k}) for a state of {k} sources, got {lo}..{hi}")
        return src_index.to(device=self.device, dtype=torch.int64)

    def relative_alpha(self, source: SourceState, alpha_drv: torch.Tensor, alpha_start: torch.Tensor) -> torch.Tensor:
        """Relative reenactment as in the published demo: alpha = alpha_drv − alpha_start + alpha_src."""
        from .runner import relative_alpha

        return relative_alpha(source, alpha_drv, alpha_start)

    def save(self, path: str | os.PathLike) -> Path:
        """Save in leo_rt's format (directory with model.safetensors + config.json); round-trips exactly."""
        return save_lia(self.reference, path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The official state-dict layout (the 'gen' entry of a published checkpoint)."""
        return self.reference.state_dict()


def load_animator(
    source: str | os.PathLike | Mapping,
    *,
    size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Animator:
    """Load an animator from an official LIA checkpoint, a leo_rt checkpoint, or a (bare) state dict.

    ``size`` is inferred from the keys when None. A state dict that does not fit raises
    :class:`~leo_rt.checkpoint.CheckpointError` listing missing and unexpected keys and the size the keys fit.
    """
    sd, info = read_checkpoint(source)
    lia = build_lia(sd, size=size, config=info["config"])
    return Animator(lia.to(device=device, dtype=dtype))
