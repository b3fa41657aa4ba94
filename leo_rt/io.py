"""Image and video input/output.

Resize policy (inputs that are not S×S): center-crop to the largest centred square, then resize that square to
S×S with bicubic filtering. Aspect ratio is never distorted; an S×S input passes through untouched.
Frames leave the model in [-1, 1]; writers clamp and map them linearly to 0…255 (a fixed map, never a per-clip
min–max, which flickers). Every writer writes a temporary file next to the output and renames it at the end.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import MediaError
from .files import atomic_path

RESIZE_POLICY = "center-crop to a square, then bicubic resize to SIZE×SIZE (never stretched)"


# ---------------------------------------------------------------------------------------------------- images


def read_image(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Read an image file in any mode (grey, grey+alpha, RGBA, palette, 16-bit, CMYK, 1-bit) as uint8 RGB
    (H, W, 3). EXIF orientation is applied; transparent areas are composited onto `background`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MediaError(f"could not read image {path} ({e}); use a PNG or JPEG file") from None
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grey: PIL's convert("RGB") would clip at 255; scale to 8 bits instead
        arr = np.asarray(im).astype(np.float64)
        peak = 65535.0 if im.mode != "F" or arr.max() > 255 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (*background, 255))
        im = Image.alpha_composite(canvas, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) → uint8 (size, size, 3) by the resize policy (center crop, then bicubic resize)."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    return np.array(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))


def to_model(frames: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) → float (N, 3, H, W) in [-1, 1], as the published preprocessing."""
    arr = np.ascontiguousarray(frames)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if t.dim() == 3:
        t = t[None]
    return (t.permute(0, 3, 1, 2).float() / 255.0 - 0.5) * 2.0


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] → uint8 (N, H, W, 3): clamp, then the fixed linear map to 0…255."""
    x = (frames.detach().float().clamp(-1, 1) + 1.0) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Read an image and return it as a (1, 3, size, size) model input in [-1, 1] (resize policy applied)."""
    return to_model(square_resize(read_image(path), size))


def save_image(path: str | os.PathLike, frame: torch.Tensor) -> Path:
    """Write one (3, H, W) or (1, 3, H, W) frame in [-1, 1] as PNG, atomically."""
    from PIL import Image

    arr = to_uint8(frame[None] if frame.dim() == 3 else frame)[0]
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


# ---------------------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int | None  # as the container declares it; None when unknown
    width: int
    height: int


def _open_video(path: Path):
    import av

    if not path.is_file():
        raise MediaError(f"video {path} does not exist")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"could not open video {path} ({e}); use an mp4, mov or webm file") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path} has no video stream")
    return container


def video_info(path: str | os.PathLike) -> VideoInfo:
    container = _open_video(Path(path))
    with container:
        st = container.streams.video[0]
        rate = st.average_rate or st.guessed_rate or st.base_rate
        if not rate:
            raise MediaError(f"video {path} declares no frame rate")
        return VideoInfo(float(rate), st.frames or None, st.codec_context.width, st.codec_context.height)


def iter_video(path: str | os.PathLike, size: int | None = None, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode a video frame by frame as uint8 (H, W, 3) RGB (resize policy applied when size is given).
    Memory stays flat however long the video is."""
    import av

    path = Path(path)
    container = _open_video(path)
    n = 0
    try:
        with container:
            for frame in container.decode(video=0):
                if max_frames is not None and n >= max_frames:
                    return
                rgb = frame.to_ndarray(format="rgb24")
                yield square_resize(rgb, size) if size else rgb
                n += 1
    except av.FFmpegError as e:
        raise MediaError(f"could not decode video {path} after {n} frames ({e}); the file is damaged") from None
    if n == 0:
        raise MediaError(f"video {path} holds no decodable frames")


def read_video(path: str | os.PathLike, size: int | None = None, max_frames: int | None = None):
    """Whole video as (uint8 (T, H, W, 3), fps)."""
    info = video_info(path)
    return np.stack(list(iter_video(path, size, max_frames))), info.fps


_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}


class VideoWriter:
    """H.264 mp4 writer (libx264, yuv420p). Use as a context manager; frames go to a temporary file that is
    renamed onto `path` when the block exits cleanly and deleted when it raises."""

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 18):
        if not fps or fps <= 0:
            raise MediaError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        if self.path.suffix.lower() not in _MUXERS:
            raise MediaError(f"output {self.path} must end in .mp4 (H.264 in an MP4 container) or .mov")
        self.fps, self.crf = fps, crf
        self.frames = 0
        self._ctx = self._container = self._stream = None

    def __enter__(self) -> VideoWriter:
        import av

        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._container = av.open(tmp, mode="w", format=_MUXERS[self.path.suffix.lower()])
        except BaseException:
            self._ctx.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames: float (N, 3, H, W) in [-1, 1], or uint8 (N, H, W, 3) / (H, W, 3)."""
        import av

        arr = to_uint8(frames) if isinstance(frames, torch.Tensor) else np.asarray(frames, dtype=np.uint8)
        if arr.ndim == 3:
            arr = arr[None]
        h, w = arr.shape[1:3]
        if self._stream is None:
            if h % 2 or w % 2:
                raise MediaError(f"H.264 (yuv420p) needs even frame sizes, got {w}×{h}")
            self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
        elif (h, w) != (self._stream.height, self._stream.width):
            raise MediaError(f"frame size changed from {self._stream.width}×{self._stream.height} to {w}×{h}")
        for a in arr:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.frames += len(arr)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if self._stream is None:
                    raise MediaError(f"no frames were written to {self.path}")
                for packet in self._stream.encode():
                    self._container.mux(packet)
        except BaseException:
            self._container.close()
            self._ctx.__exit__(*sys.exc_info())
            raise
        self._container.close()
        return self._ctx.__exit__(exc_type, exc, tb)
