"""Code sources (driving videos, LMDM, edited videos) for the one frame loop, Session.stream, and the demo's assets."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .core import images_on
from .errors import InputError
from .fast import SourceState
from .io import to_model
from .runner import Runner


def batched(items: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Consecutive arrays of an iterable stacked into batches of at most `size` (consumed lazily)."""
    if size < 1:
        raise InputError(f"batch must be at least 1, got {size}")
    chunk: list[np.ndarray] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


# ----------------------------------------------------------------------------------------------- code sources


def driving_codes(
    runner: Runner, state: SourceState, driving: Iterable[np.ndarray], *, relative: bool = True, batch: int = 8
) -> Iterator[torch.Tensor]:
    """Motion codes (n, D) of driving frames (uint8 (S, S, 3), any iterable, consumed lazily), batch by batch. Relative
    mode (the published demo's default) moves the source by the driving motion since the first driving frame:
    alpha = alpha_drv − alpha_start + alpha_src; absolute mode uses the driving codes as they are."""
    alpha_start = None
    for frames in batched(driving, batch):
        alpha = runner.encode_motion(images_on(frames, runner.device))  # uint8 to the device, converted there
        if relative:
            if alpha_start is None:
                alpha_start = alpha[:1]
            alpha = runner.relative_alpha(state, alpha, alpha_start)
        yield alpha


def video_codes(runner: Runner, frames: Iterable[np.ndarray], batch: int = 16) -> torch.Tensor:
    """Motion codes (T, D) of every frame of a video (uint8 (S, S, 3) frames), encoded in batches."""
    out = [runner.encode_motion(images_on(chunk, runner.device)) for chunk in batched(frames, batch)]
    if not out:
        raise InputError("the video holds no frames")
    return torch.cat(out)


# --------------------------------------------------- jobs: code sources feeding Session.stream (the one loop)


def _frames(runner, source: torch.Tensor, codes, **stream_kw) -> Iterator[torch.Tensor]:
    """Frames of one source from a code source (a callable of the source state), through a Session."""
    from .session import Session

    with Session(runner, backend="torch") as session:
        state = session.start(source)
        yield from session.stream(codes(session, state), **stream_kw)


def reenact(
    runner: Runner, source: torch.Tensor, driving: Iterable[np.ndarray], *, relative: bool = True, batch: int = 8
) -> Iterator[torch.Tensor]:
    """Animate `source` ((1, 3, S, S) in [-1, 1]) with driving frames (uint8 (S, S, 3), consumed lazily). Yields
    rendered batches (n, 3, S, S)."""
    return _frames(
        runner,
        source,
        lambda session, state: driving_codes(session, state, driving, relative=relative, batch=batch),
        batch=batch,
    )


def generate(
    runner: Runner,
    sampler,
    source: torch.Tensor,
    n_frames: int,
    *,
    overlap: int = 0,
    seed: int | None = None,
    batch: int = 8,
) -> Iterator[torch.Tensor]:
    """Frames (n, 3, S, S) for a source image (1, 3, S, S): the source is encoded once, codes are sampled chunk
    after chunk from the source's own code by an LMDM MotionSampler, and rendered in batches as they arrive."""
    return _frames(
        runner, source, lambda session, state: sampler, n_frames=n_frames, overlap=overlap, seed=seed, batch=batch
    )


def edit(
    runner: Runner, codes: torch.Tensor, first_frame: torch.Tensor, *, relative: bool = False, batch: int = 8
) -> Iterator[torch.Tensor]:
    """Content-preserving editing: the video's motion codes (T, D) rendered with the appearance of an edited
    first frame (1, 3, S, S). Absolute mode by default (the codes as they are); relative mode moves the edited
    frame by the motion since the video's first frame."""

    def edit_codes(session, state):
        return [session.relative_alpha(state, codes, codes[:1]) if relative else codes]

    return _frames(runner, first_frame, edit_codes, batch=batch)


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
