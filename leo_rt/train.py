"""Training an LMDM on motion codes extracted from videos with the animator's motion encoder."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .animator import Animator
from .errors import CheckpointError, InputError, OutputError
from .files import atomic_path
from .io import iter_video, video_info
from .lmdm import LMDM, LMDMConfig, load_lmdm, save_lmdm
from .pipelines import video_codes
from .schedulers import DDPMScheduler

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
STATE_FILE = "train_state.pt"


@dataclass
class MotionCodes:
    """Codes of several videos, concatenated: codes (N, D); lengths (V,) summing to N; fps (V,); names (V,)."""

    codes: np.ndarray
    lengths: np.ndarray
    fps: np.ndarray
    names: list[str]

    def videos(self) -> list[np.ndarray]:
        return np.split(self.codes, np.cumsum(self.lengths)[:-1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (any name: nothing is appended to it), atomically, and read it back before it is put
        in place."""
        path = Path(path)
        arrays = {
            "codes": self.codes.astype(np.float32),
            "lengths": self.lengths.astype(np.int64),
            "fps": self.fps.astype(np.float64),
            "names": np.array(self.names, dtype=str),
        }

        def same(tmp: str) -> None:
            back = MotionCodes.load(tmp)
            if back.codes.shape != arrays["codes"].shape or not np.array_equal(back.lengths, arrays["lengths"]):
                raise OutputError(f"{path} did not read back as written; write it again")

        # np.savez given a *name* appends ".npz" when it is missing; given an open file it writes exactly there
        with atomic_path(path, verify=same, what="codes file") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, motion_dim: int | None = None) -> MotionCodes:
        """Read and validate a codes file written by `leo-rt extract-motion`. Anything else (empty, truncated,
        another kind of file, arrays of the wrong kind or shape, NaN/inf codes) is an InputError."""
        path = Path(path)
        fix = "make one with `leo-rt extract-motion`"
        if path.is_dir():
            raise InputError(f"codes file {path} is a folder; give the .npz written by `leo-rt extract-motion`")
        if not path.is_file():
            raise InputError(f"codes file {path} does not exist; {fix}")
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise InputError(f"cannot read codes file {path} ({e.strerror or e})") from None
        if head != b"PK\x03\x04":
            what = "an empty file" if not head else "not an .npz archive"
            raise InputError(f"codes file {path} is {what}; {fix}")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                arrays = {k: z[k] for k in sorted(files & {"codes", "lengths", "fps", "names"})}
        except Exception as e:  # noqa: BLE001 - zipfile, zlib, format and pickle errors of a damaged archive
            raise InputError(f"could not read codes file {path} ({type(e).__name__}: {e}); {fix}") from None
        missing = {"codes", "lengths"} - files
        if missing:
            raise InputError(f"{path} lacks {sorted(missing)}: not a codes file from `leo-rt extract-motion`")
        codes, lengths = arrays["codes"], arrays["lengths"]
        if codes.ndim != 2 or codes.dtype.kind not in "fiu" or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise InputError(
                f"codes in {path} are {codes.dtype} {codes.shape}; expected real numbers of shape (frames, motion_dim)"
            )
        if motion_dim is not None and codes.shape[1] != motion_dim:
            raise InputError(f"codes in {path} have {codes.shape[1]} channels but the model uses {motion_dim}-d codes")
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or len(lengths) == 0:
            raise InputError(f"lengths in {path} are {lengths.dtype} {lengths.shape}; expected integers, one a video")
        if (lengths < 0).any() or int(lengths.astype(np.int64).sum()) != codes.shape[0]:
            raise InputError(
                f"lengths in {path} (sum {int(lengths.astype(np.int64).sum())}) do not add up to the "
                f"{codes.shape[0]} codes"
            )
        fps = arrays.get("fps", np.full(len(lengths), np.nan))
        if fps.shape != lengths.shape or fps.dtype.kind not in "fiu":
            raise InputError(f"fps in {path} is {fps.dtype} {fps.shape}; expected one number per video")
        names = arrays.get("names")
        if names is None:
            names = [f"video{i}" for i in range(len(lengths))]
        elif names.shape != lengths.shape or names.dtype.kind not in "US":
            raise InputError(f"names in {path} are {names.dtype} {names.shape}; expected one string per video")
        else:
            names = [str(n) for n in names]
        if not np.isfinite(codes).all():
            row = int(np.nonzero(~np.isfinite(codes).all(1))[0][0])
            raise InputError(f"codes in {path} contain NaN or inf (first at row {row}); extract them again")
        return cls(codes.astype(np.float32), lengths.astype(np.int64), fps.astype(np.float64), names)


def find_videos(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Video files from a mix of files and directories (directories searched recursively, sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in VIDEO_SUFFIXES and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p} does not exist")
    if not out:
        raise InputError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found in {[str(i) for i in inputs]}")
    return out


def extract_motion(
    animator: Animator, videos: Sequence[Path], batch: int = 16, on_video: Callable[[Path, int], None] | None = None
) -> MotionCodes:
    """Motion codes of every frame of every video (batched encode_motion), with fps and lengths kept."""
    codes, lengths, fps = [], [], []
    for v in videos:
        info = video_info(v)
        c = video_codes(animator, iter_video(v, animator.size), batch).float().cpu().numpy()
        codes.append(c)
        lengths.append(len(c))
        fps.append(info.fps)
        if on_video:
            on_video(v, len(c))
    return MotionCodes(np.concatenate(codes), np.array(lengths), np.array(fps), [str(v) for v in videos])


@dataclass
class TrainConfig:
    steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    save_every: int = 500
    seed: int = 0


class _Windows:
    """Random chunk-long windows from the videos; x = (window − window[0]) / data_std, alpha_1 = window[0]."""

    def __init__(self, data: MotionCodes, chunk: int):
        self.videos = [torch.from_numpy(v) for v in data.videos() if len(v) >= chunk]
        if not self.videos:
            longest = int(data.lengths.max()) if len(data.lengths) else 0
            raise InputError(
                f"no video has at least {chunk} frames (the longest has {longest}); use a preset with a "
                "shorter chunk or longer videos"
            )
        self.chunk = chunk
        counts = torch.tensor([len(v) - chunk + 1 for v in self.videos], dtype=torch.float64)
        self.weights = counts / counts.sum()

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        vids = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        out = []
        for v in vids.tolist():
            start = int(torch.randint(len(self.videos[v]) - self.chunk + 1, (1,), generator=gen))
            out.append(self.videos[v][start : start + self.chunk])
        return torch.stack(out)  # (n, L, D)


def _statistics(windows: _Windows, data: MotionCodes, gen: torch.Generator) -> dict[str, torch.Tensor]:
    w = windows.sample(4096, gen)
    rel = w - w[:, :1]
    cond = torch.from_numpy(data.codes)
    std = rel.std(0).clamp_min(1e-4)  # (L, D)
    std[0] = 1.0  # row 0 is 0 by construction
    return {
        "data_std": std,
        "cond_mean": cond.mean(0),
        "cond_std": cond.std(0).clamp_min(1e-4),
    }


def train_lmdm(
    data: MotionCodes,
    out_dir: str | os.PathLike,
    *,
    preset: str | LMDMConfig = "lmdm-small",
    cfg: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> LMDM:
    """AdamW + EMA training with periodic checkpoints (the EMA weights are what is saved and used) and resume
    from `out_dir/train_state.pt`. Returns the EMA model."""
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if resume and state_path.is_file():
        saved = _load_state(state_path)
        model = load_lmdm(out_dir)  # architecture and statistics
        ema = load_lmdm(out_dir)
        try:
            model.load_state_dict(saved["model"])
            ema.load_state_dict(saved["ema"])
            start = int(saved["step"])
            gen.set_state(saved["rng"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{state_path} does not fit the LMDM in {out_dir} ({type(e).__name__}: {str(e)[:200]}); drop "
                "--resume to start afresh"
            ) from None
    else:
        if resume:
            raise InputError(f"--resume was given but {state_path} does not exist; drop --resume to start afresh")
        lcfg = LMDMConfig.from_name(preset) if isinstance(preset, str) else preset
        model = LMDM(lcfg)
        start, saved = 0, None
    mcfg = model.cfg
    if data.codes.shape[1] != mcfg.motion_dim:
        raise InputError(f"codes have {data.codes.shape[1]} channels but the LMDM models {mcfg.motion_dim}")
    windows = _Windows(data, mcfg.chunk)
    if saved is None:
        for name, value in _statistics(windows, data, gen).items():
            getattr(model, name).copy_(value)
        ema = copy.deepcopy(model)
    model.to(device).train()
    ema.to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved is not None:
        opt.load_state_dict(saved["optim"])
    sched = DDPMScheduler(
        mcfg.num_train_timesteps, mcfg.beta_schedule, mcfg.beta_start, mcfg.beta_end, mcfg.prediction_type
    )
    for step in range(start, cfg.steps):
        w = windows.sample(cfg.batch, gen).to(device)
        alpha_1 = w[:, 0]
        x0 = (w - w[:, :1]) / model.data_std
        t = torch.randint(0, mcfg.num_train_timesteps, (cfg.batch,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = sched.add_noise(x0, noise, t)
        # half the windows see a longer known prefix (1 … max_prefix codes), as overlapping chunks do
        k = torch.randint(1, mcfg.max_prefix + 1, (cfg.batch,), generator=gen)
        k = torch.where(torch.rand(cfg.batch, generator=gen) < 0.5, k, torch.ones_like(k)).to(device)
        loss = F.mse_loss(model(x_t, t, alpha_1, x0, k), sched.training_target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up, so early checkpoints are usable
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)
        if on_step:
            on_step(step + 1, loss.item())
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _checkpoint(out_dir, model, ema, opt, step + 1, gen)
    return ema.eval()


def _load_state(path: Path) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and EOF errors of a damaged file
        raise CheckpointError(
            f"could not read {path} ({type(e).__name__}: {str(e).strip()[:200]}); the file is damaged: drop "
            "--resume to start afresh"
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is not a leo_rt training state; drop --resume to start afresh")
    return saved


def _checkpoint(out_dir: Path, model: LMDM, ema: LMDM, opt, step: int, gen: torch.Generator) -> None:
    save_lmdm(ema, out_dir, extra={"step": step})
    state = {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optim": opt.state_dict(),
        "rng": gen.get_state(),
    }
    with atomic_path(out_dir / STATE_FILE, what="training state") as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
