"""Jobs built on the animator: reenactment from a driving video, and the no-download demo."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .animator import Animator
from .errors import InputError
from .io import to_model
from .timing import StageTimer


def resolve_device(spec: str | torch.device) -> torch.device:
    """'auto' → cuda when available else cpu; a CUDA device that is not there is a clear error."""
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {spec!r} was asked for but this torch sees no CUDA device; use --device cpu")
    return dev


def _batches(frames: Iterable[np.ndarray], batch: int) -> Iterator[np.ndarray]:
    chunk: list[np.ndarray] = []
    for f in frames:
        chunk.append(f)
        if len(chunk) == batch:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


def reenact(
    animator: Animator,
    source: torch.Tensor,
    driving: Iterable[np.ndarray],
    *,
    relative: bool = True,
    batch: int = 8,
    timer: StageTimer | None = None,
) -> Iterator[torch.Tensor]:
    """Animate `source` ((1, 3, S, S) in [-1, 1]) with driving frames (uint8 (S, S, 3), any iterable, consumed
    lazily). Yields rendered batches (n, 3, S, S). Relative mode (the published demo's default) moves the
    source by the driving motion since the first driving frame: alpha = alpha_drv − alpha_start + alpha_src."""
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}")
    timer = timer or StageTimer(animator.device)
    with timer.stage("source"):
        state = animator.encode_source(source)
    for alpha in driving_codes(animator, state, driving, relative=relative, batch=batch, timer=timer):
        with timer.stage("render", alpha.shape[0]):
            out = animator.render(state, alpha)
        yield out


def driving_codes(
    animator,
    state,
    driving: Iterable[np.ndarray],
    *,
    relative: bool = True,
    batch: int = 8,
    timer: StageTimer | None = None,
) -> Iterator[torch.Tensor]:
    """Motion codes (n, D) of driving frames, batch by batch, in absolute or relative mode (see `reenact`)."""
    timer = timer or StageTimer(animator.device)
    alpha_start = None
    for frames in _batches(driving, batch):
        with timer.stage("motion", len(frames)):
            alpha = animator.encode_motion(to_model(frames))
        if relative:
            if alpha_start is None:
                alpha_start = alpha[:1]
            alpha = animator.relative_alpha(state, alpha, alpha_start)
        yield alpha


def find_shared_data() -> Path | None:
    """The shared LIA test assets: $LEO_RT_DATA, else ../shared/data/lia beside the repository or the cwd."""
    env = os.environ.get("LEO_RT_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "shared/data/lia", Path.cwd().parent / "shared/data/lia"]
    return next((p for p in candidates if (p / "vox").is_dir()), None)


def synthetic_portrait(size: int) -> np.ndarray:
    """A drawn stand-in portrait (uint8 (size, size, 3)): a face-like ellipse with eyes and a mouth."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    img = np.stack([0.25 + 0.2 * yy, 0.35 + 0.1 * xx, 0.55 - 0.1 * yy], -1)
    face = (xx / 0.55) ** 2 + ((yy + 0.05) / 0.72) ** 2 < 1
    img[face] = (0.86, 0.68, 0.56)
    for ex in (-0.22, 0.22):
        img[((xx - ex) / 0.1) ** 2 + ((yy + 0.15) / 0.06) ** 2 < 1] = (0.15, 0.1, 0.1)
    img[((xx / 0.22) ** 2 + ((yy - 0.35) / 0.05) ** 2 < 1)] = (0.6, 0.2, 0.25)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def synthetic_driving(image: np.ndarray, frames: int) -> Iterator[np.ndarray]:
    """A short driving clip made from one image: a smooth sway, nod and zoom (uint8 frames)."""
    x = to_model(image)
    for t in range(frames):
        ph = 2 * math.pi * t / max(frames, 1)
        ang, zoom = 0.08 * math.sin(ph), 1.0 + 0.05 * math.sin(2 * ph)
        theta = torch.tensor(
            [
                [
                    [math.cos(ang) / zoom, -math.sin(ang) / zoom, 0.08 * math.sin(ph)],
                    [math.sin(ang) / zoom, math.cos(ang) / zoom, 0.05 * math.cos(ph)],
                ]
            ]
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        y = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        yield ((y[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
