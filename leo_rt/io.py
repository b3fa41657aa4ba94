"""Image and video input/output.

Resize policy (inputs that are not S×S): center-crop to the largest centred square, then resize that square to
S×S with bicubic filtering. Aspect ratio is never distorted; an S×S input passes through untouched.
Frames leave the model in [-1, 1]; writers clamp and map them linearly to 0…255 (a fixed map, never a per-clip
min–max, which flickers). Every writer writes a temporary file next to the output and renames it at the end
(leo_rt.files.atomic_path: nothing half-written is ever left, write failures are OutputError).

Bad inputs are MediaError / InputError with the reason and the fix: a folder given as a file, an image above the
decompression-bomb limit, a file that is not an image or video, a non-finite image tensor. Sources smaller than
MIN_SOURCE_SIDE pixels load with a SmallImageWarning (they are upscaled and will look blurry).

A video damaged part-way through (``iter_video``): by default decoding stops at the last good frame, a
DamagedVideoWarning says so (with the number of frames kept) and ``on_damage(frames_kept, reason)`` is called
when given; the frames already decoded are kept, so a job that was rendering them can finish its output.
``strict=True`` raises MediaError instead. A video with no decodable frame at all is always a MediaError.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, MediaError
from .files import atomic_path, check_output, resolve_output

RESIZE_POLICY = "center-crop to a square, then bicubic resize to SIZE×SIZE (never stretched)"
MIN_SOURCE_SIDE = 64  # a source with a shorter side is upscaled a lot: it loads, with a SmallImageWarning


class SmallImageWarning(UserWarning):
    """A source image smaller than MIN_SOURCE_SIDE on its shorter side (upscaled; the result will be blurry)."""


class DamagedVideoWarning(UserWarning):
    """A video that could be decoded only up to some frame; the frames before it were kept."""


def _not_a_folder(path: Path, what: str, fix: str) -> None:
    if path.is_dir():
        raise MediaError(f"{path} is a folder, not {what}; {fix}")
    if not path.exists():
        raise MediaError(f"{what.split(' ', 1)[-1]} {path} does not exist")
    if not path.is_file():
        raise MediaError(f"{path} is not a regular file; {fix}")


# ---------------------------------------------------------------------------------------------------- images


def read_image(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Read an image file in any mode (grey, grey+alpha, RGBA, palette, 16-bit, CMYK, 1-bit) as uint8 RGB
    (H, W, 3). EXIF orientation is applied; transparent areas are composited onto `background`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    _not_a_folder(path, "an image", "give an image file (PNG or JPEG)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
    except Image.DecompressionBombError as e:
        raise MediaError(_bomb_message(path, str(e))) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # PIL's plugins raise ValueError/EOFError/SyntaxError on some damaged files, MemoryError on absurd headers
        raise MediaError(f"could not read image {path} ({type(e).__name__}: {e}); use a PNG or JPEG file") from None
    except Exception as e:  # noqa: BLE001 - a damaged file must not escape as a bare traceback (found by fuzzing)
        raise MediaError(f"could not read image {path} ({type(e).__name__}: {e}); the file is damaged") from None
    try:
        return _to_rgb(im, background)
    except (OSError, ValueError, TypeError) as e:
        raise MediaError(f"could not convert image {path} ({im.mode}) to RGB ({e}); save it as 8-bit RGB") from None


def _bomb_message(path: Path, text: str) -> str:
    from PIL import Image

    found = re.search(r"\((\d+) pixels\)", text)
    pixels = int(found.group(1)) if found else None
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    size = f"{pixels / 1e6:.0f} megapixels" if pixels else "too many pixels"
    return (
        f"image {path} has {size}, above the limit of {limit / 1e6:.0f} megapixels that guards against "
        f"decompression bombs; shrink it (a source is resized to at most 512×512 anyway), e.g. to 4096×4096"
    )


def _to_rgb(im, background: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grey: PIL's convert("RGB") would clip at 255; scale to 8 bits instead
        arr = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
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
    """Read an image and return it as a (1, 3, size, size) model input in [-1, 1] (resize policy applied). A
    source smaller than MIN_SOURCE_SIDE pixels loads with a SmallImageWarning."""
    image = read_image(path)
    warn_if_small(image, str(path), size)
    return to_model(square_resize(image, size))


def warn_if_small(image: np.ndarray, name: str, size: int, stacklevel: int = 3) -> bool:
    """Warn (SmallImageWarning) when an (H, W, 3) source is below MIN_SOURCE_SIDE on its shorter side."""
    h, w = image.shape[:2]
    least = min(MIN_SOURCE_SIDE, size)  # a model smaller than the minimum needs no more than its own size
    if min(h, w) >= least:
        return False
    warnings.warn(
        f"source {name} is {w}×{h} pixels, below the {least}-pixel minimum: it is upscaled to "
        f"{size}×{size} and the result will be blurry; use a larger image",
        SmallImageWarning,
        stacklevel=stacklevel,
    )
    return True


def check_finite(images: torch.Tensor, what: str = "source image") -> torch.Tensor:
    """Refuse a tensor with NaN or inf values (InputError naming the first bad image); returns it unchanged."""
    if images.is_floating_point() or images.is_complex():
        bad = ~torch.isfinite(images)
        if bool(bad.any()):
            flat = bad.reshape(bad.shape[0], -1).any(1) if bad.dim() > 1 else bad
            first = int(flat.nonzero()[0, 0])
            raise InputError(
                f"{what} {first} holds {int(bad.sum())} NaN/inf values; images must be finite, in [-1, 1] "
                "(load files with leo_rt.io.load_image)"
            )
    return images


def prepare_image(image, size: int, what: str = "source image") -> torch.Tensor:
    """Any source the library accepts → a checked (1, 3, size, size) float tensor in [-1, 1]: an image path, a
    uint8 (H, W, 3) array (resize policy applied; SmallImageWarning below MIN_SOURCE_SIDE) or a (1, 3, S, S) /
    (3, S, S) tensor (must be finite). Bad input is a MediaError / InputError."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, size)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise InputError(
                f"a {what} array must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}; load files with "
                "leo_rt.io.read_image"
            )
        warn_if_small(image, f"array {image.shape[1]}×{image.shape[0]}", size)
        return to_model(square_resize(image, size))
    if isinstance(image, torch.Tensor):
        t = image[None] if image.dim() == 3 else image
        if t.dim() != 4 or tuple(t.shape[1:]) != (3, size, size) or not t.is_floating_point():
            raise InputError(
                f"a {what} tensor must be float (1, 3, {size}, {size}) in [-1, 1], got {tuple(image.shape)} "
                f"{image.dtype}; load files with leo_rt.io.load_image(path, {size})"
            )
        return check_finite(t, what)
    raise InputError(f"a {what} must be a path, a uint8 (H, W, 3) array or a tensor, got {type(image).__name__}")


def save_image(path: str | os.PathLike, frame: torch.Tensor) -> Path:
    """Write one (3, H, W) or (1, 3, H, W) frame in [-1, 1] as PNG, atomically."""
    from PIL import Image

    arr = to_uint8(frame[None] if frame.dim() == 3 else frame)[0]
    with atomic_path(Path(path), stream_ok=True, what="image") as tmp, open(tmp, "ab") as f:
        Image.fromarray(arr).save(f, format="PNG")
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

    _not_a_folder(path, "a video", "give a video file (mp4, mov or webm)")
    try:
        container = av.open(str(path), timeout=30)
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError, IndexError) as e:
        raise MediaError(f"could not open video {path} ({e}); use an mp4, mov or webm file") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path} has no video stream (audio only?); give a video file")
    return container


def video_info(path: str | os.PathLike) -> VideoInfo:
    container = _open_video(Path(path))
    with container:
        st = container.streams.video[0]
        try:
            rate = st.average_rate or st.guessed_rate or st.base_rate
            fps = float(rate) if rate else 0.0
        except (ZeroDivisionError, ValueError, OverflowError):
            fps = 0.0
        if not fps or not np.isfinite(fps) or fps <= 0:
            raise MediaError(f"video {path} declares no usable frame rate; re-encode it (e.g. ffmpeg -r 25)")
        ctx = st.codec_context
        if ctx is None:  # a damaged stream header: no decoder could be set up
            raise MediaError(f"video {path} has a video stream that cannot be decoded; the file is damaged")
        return VideoInfo(fps, st.frames or None, ctx.width, ctx.height)


def iter_video(
    path: str | os.PathLike,
    size: int | None = None,
    max_frames: int | None = None,
    *,
    strict: bool = False,
    on_damage: Callable[[int, str], None] | None = None,
) -> Iterator[np.ndarray]:
    """Decode a video frame by frame as uint8 (H, W, 3) RGB (resize policy applied when size is given).
    Memory stays flat however long the video is.

    A video damaged part-way through: with ``strict=False`` (default) iteration ends at the last good frame,
    ``on_damage(frames_kept, reason)`` is called if given and a DamagedVideoWarning is issued, so the frames
    already used are kept; with ``strict=True`` a MediaError is raised. No decodable frame at all is always a
    MediaError."""
    path = Path(path)
    container = _open_video(path)
    n = 0
    failure = None
    with container:
        frames = container.decode(video=0)
        while max_frames is None or n < max_frames:
            try:
                frame = next(frames, None)
                if frame is None:
                    break
                rgb = frame.to_ndarray(format="rgb24")
            except Exception as e:  # noqa: BLE001 - any decoder failure is a damaged file (av.FFmpegError mostly)
                failure = f"{type(e).__name__}: {e}"
                break
            yield square_resize(rgb, size) if size else rgb
            n += 1
    if n == 0:
        why = f" ({failure})" if failure else ""
        raise MediaError(f"video {path} holds no decodable frames{why}; give a playable video file")
    if failure is not None:
        if strict:
            raise MediaError(
                f"video {path} is damaged: decoding failed after frame {n} ({failure}); repair or re-encode it, "
                "or drop --strict to keep the frames before the damage"
            )
        reason = f"decoding failed after frame {n} ({failure})"
        if on_damage is not None:
            on_damage(n, reason)
        warnings.warn(
            f"video {path} is damaged: {reason}; stopped at the last good frame and kept {n} frames "
            "(strict=True / --strict fails instead)",
            DamagedVideoWarning,
            stacklevel=2,
        )


def read_video(path: str | os.PathLike, size: int | None = None, max_frames: int | None = None, *, strict=False):
    """Whole video as (uint8 (T, H, W, 3), fps); a damaged video as iter_video (strict or up to the damage)."""
    info = video_info(path)
    return np.stack(list(iter_video(path, size, max_frames, strict=strict))), info.fps


_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}


class VideoWriter:
    """H.264 mp4 writer (libx264, yuv420p). Use as a context manager; frames go to a temporary file that is
    renamed onto `path` when the block exits cleanly and deleted when it raises (an error, Ctrl-C, a full disk:
    nothing half-written is left, and an existing file at `path` is kept). The output path is checked when the
    writer is made (folder, permissions, a read-only file or a device in the way: OutputError), before any frame
    is rendered. Write failures, a full disk included, are OutputError."""

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 18):
        try:
            fps_ok = fps is not None and float(fps) > 0 and np.isfinite(float(fps))
        except (TypeError, ValueError):
            fps_ok = False
        if not fps_ok:
            raise MediaError(f"fps must be a positive finite number, got {fps}")
        self.path = Path(path)
        resolve_output(self.path, what="video", create_dirs=False)  # a folder or a device in the way is named as such
        if self.path.suffix.lower() not in _MUXERS:
            raise MediaError(f"output {self.path} must end in .mp4 (H.264 in an MP4 container) or .mov")
        check_output(self.path, what="video")
        self.fps, self.crf = float(fps), crf
        self.frames = 0
        self._ctx = self._container = self._stream = None

    def __enter__(self) -> VideoWriter:
        import av

        self._ctx = atomic_path(self.path, what="video")
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
        if arr.ndim != 4 or arr.shape[3] != 3:
            raise MediaError(f"frames must be (N, 3, H, W) floats or (N, H, W, 3) uint8, got {arr.shape}")
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

    def _abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # noqa: BLE001,S110 - the file is being thrown away; its own close error is moot
            pass

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abort()
            return self._ctx.__exit__(exc_type, exc, tb)
        try:
            if self._stream is None:
                raise MediaError(f"no frames were written to {self.path}")
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()  # writes the index at the end: a full disk may show only here
        except BaseException:
            self._abort()
            self._ctx.__exit__(*sys.exc_info())  # deletes the temporary file, raises the (mapped) error
            raise
        return self._ctx.__exit__(None, None, None)
