"""The fault table: every case of shared/design/fault_cases.md (bad inputs and faults, tried as a hostile new user
would), each asserting the exit code or exception type, that the message names the problem, and that no file other
than the intended output exists afterwards (the intended one complete, or absent).

Rows are grouped as in fault_cases.md; the `area` of each row is the first part of its id. CLI rows run
`leo_rt.cli.main` in-process; SIGINT and read-only-folder rows run a subprocess (the read-only rows drop the
capabilities that let root write anywhere, so they mean the same as root and as a user); disk-full mounts a tiny
tmpfs when it can and patches the writer's muxing with ENOSPC when it cannot. Everything uses the lia-32-tiny
preset and videos of a few 32×32 frames, so the whole file stays quick.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_lia
from leo_rt.cli import main
from leo_rt.errors import InputError, LeoError, ManifestError
from leo_rt.io import DamagedVideoWarning, SmallImageWarning, VideoWriter, iter_video, load_image, read_video

PRESET, S = "lia-32-tiny", 32
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ assets


def _frames(n: int, h: int = S, w: int = S, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [
            np.stack([(xx * 5 + 7 * t + seed) % 256, (yy * 3 + t) % 256, np.full_like(xx, (9 * t) % 256)], -1)
            for t in range(n)
        ]
    ).astype(np.uint8)


def _write_video(path: Path, n: int, fps: float = 10, h: int = S, w: int = S) -> Path:
    with VideoWriter(path, fps=fps) as wr:
        for i in range(0, n, 64):
            wr.write(_frames(min(64, n - i), h, w, seed=i))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    lia = make_lia(PRESET, seed=3)
    torch.save({"gen": lia.state_dict()}, d / "ck.pt")
    torch.save({"gen": make_lia(PRESET, seed=4).state_dict()}, d / "ck2.pt")
    (d / "alt").mkdir()  # another checkpoint of the same size (torch names the records inside after the file)
    torch.save({"gen": make_lia(PRESET, seed=4).state_dict()}, d / "alt" / "ck.pt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "src.png")
    _write_video(d / "drv.mp4", 6)
    return d


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Exports record checkpoint hashes under $LEO_RT_CACHE: keep them out of the user's cache."""
    monkeypatch.setenv("LEO_RT_CACHE", str(tmp_path / "_cache"))


def files_in(folder: Path) -> set[str]:
    """Every file under `folder` (hidden ones too), relative; lock files of the export cache excepted."""
    if not folder.exists():
        return set()
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and not p.name.endswith(".lock") and "_cache" not in p.parts
    }


def video_frames(path: Path) -> int:
    return len(read_video(path)[0])


# ------------------------------------------------------------------------------------------------ CLI rows


@dataclass
class Ctx:
    assets: Path
    tmp: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def reenact(self, *extra, source=None, driving=None, out=None, ckpt=None) -> list[str]:
        a = self.assets
        return [
            "reenact",
            "--checkpoint",
            str(ckpt or a / "ck.pt"),
            "--source",
            str(source or a / "src.png"),
            "--driving",
            str(driving or a / "drv.mp4"),
            "--out",
            str(out or self.out / "o.mp4"),
            "--no-progress",
            *map(str, extra),
        ]

    def generate(self, *extra, out=None) -> list[str]:
        return [
            "generate",
            "--checkpoint",
            str(self.assets / "ck.pt"),
            "--source",
            str(self.assets / "src.png"),
            "--out",
            str(out or self.out / "g.mp4"),
            "--no-progress",
            *map(str, extra),
        ]


@dataclass
class Row:
    id: str
    argv: Callable[[Ctx], list[str]]
    code: int = 2
    match: str | None = None  # regex over stderr (stdout too when code == 0); case-insensitive
    setup: Callable[[Ctx], None] | None = None
    outputs: dict[str, int] = field(default_factory=dict)  # file → frames it must hold (-1: any non-empty file)
    check: Callable[[Ctx, str], None] | None = None
    warns: type[Warning] | None = None
    lead: bool = False  # passes once the lead's CLI/core work lands (see the report)
    chdir: bool = False  # run from inside the test's folder (relative paths)


def _bad_file(name: str, data: bytes):
    def setup(ctx: Ctx) -> None:
        (ctx.tmp / name).write_bytes(data)

    return setup


def _sd(**change):
    """The tiny checkpoint's state dict with entries replaced (a tensor) or removed (None)."""
    sd = dict(make_lia(PRESET, seed=3).state_dict())
    for k, v in change.items():
        k = k.replace("__", ".")
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    return sd


def _save_ckpt(name: str, obj, **kw):
    def setup(ctx: Ctx) -> None:
        torch.save(obj() if callable(obj) else obj, ctx.tmp / name, **kw)

    return setup


class _Custom:
    def __init__(self):
        self.x = 1


class _Evil:
    marker = "/nonexistent"

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_setup(legacy: bool):
    def setup(ctx: Ctx) -> None:
        _Evil.marker = str(ctx.tmp / "PWNED")
        kw = {"_use_new_zipfile_serialization": False} if legacy else {}
        torch.save({"gen": _sd(), "x": _Evil()}, ctx.tmp / "evil.pt", **kw)

    return setup


def _truncated(n: int | None):
    def setup(ctx: Ctx) -> None:
        data = (ctx.assets / "ck.pt").read_bytes()
        (ctx.tmp / "cut.pt").write_bytes(data[: n if n is not None else len(data) // 2])

    return setup


def _zip_not_torch(ctx: Ctx) -> None:
    with zipfile.ZipFile(ctx.tmp / "z.pt", "w") as z:
        z.writestr("hello.txt", "not a checkpoint")


def _png(ctx: Ctx, name: str = "p.png", size=(8, 8), mode="RGB") -> Path:
    Image.new(mode, size, 90).save(ctx.tmp / name)
    return ctx.tmp / name


def _no_pwned(ctx: Ctx, err: str) -> None:
    assert not (ctx.tmp / "PWNED").exists(), "the pickle ran code"


CHECKPOINT_ROWS = [
    Row("checkpoint-missing", lambda c: ["info", str(c.tmp / "nope.pt")], match=r"nope\.pt does not exist"),
    Row(
        "checkpoint-directory",
        lambda c: ["info", str(c.tmp / "d")],
        match=r"folder without model\.safetensors",
        setup=lambda c: (c.tmp / "d").mkdir(),
    ),
    Row(
        "checkpoint-truncated-1000B",
        lambda c: ["info", str(c.tmp / "cut.pt")],
        match="truncated or corrupt",
        setup=_truncated(1000),
    ),
    Row(
        "checkpoint-truncated-half",
        lambda c: ["info", str(c.tmp / "cut.pt")],
        match="truncated or corrupt",
        setup=_truncated(None),
    ),
    Row(
        "checkpoint-zip-not-torch",
        lambda c: ["info", str(c.tmp / "z.pt")],
        match=r"could not read .*z\.pt",
        setup=_zip_not_torch,
    ),
    Row("checkpoint-size-mismatch", lambda c: c.reenact("--size", 64), match=r"the keys fit size 32.*--size 32"),
    Row(
        "checkpoint-wrong-shape",
        lambda c: ["info", str(c.tmp / "w.pt")],
        match=r"wrong shapes \(1\): enc\.net_app\.convs\.0\.0\.weight \(5, 3, 1, 1\)",
        setup=_save_ckpt("w.pt", lambda: {"gen": _sd(enc__net_app__convs__0__0__weight=torch.zeros(5, 3, 1, 1))}),
    ),
    Row(
        "checkpoint-missing-keys",
        lambda c: ["info", str(c.tmp / "m.pt")],
        match=r"missing keys \(1\): enc\.fc\.4\.bias",
        setup=_save_ckpt("m.pt", lambda: {"gen": _sd(enc__fc__4__bias=None)}),
    ),
    Row(
        "checkpoint-unrelated-dict",
        lambda c: ["info", str(c.tmp / "u.pt")],
        match="does not hold an animator state dict",
        setup=_save_ckpt("u.pt", {"epoch": 3, "name": "resnet"}),
    ),
    Row(
        "checkpoint-list",
        lambda c: ["info", str(c.tmp / "l.pt")],
        match=r"does not hold an animator state dict \(found list\)",
        setup=_save_ckpt("l.pt", [1, 2, 3]),
    ),
    Row(
        "checkpoint-custom-class",
        lambda c: ["info", str(c.tmp / "c.pt")],
        match=r"Python objects .*_Custom.*refuses it for safety",
        setup=_save_ckpt("c.pt", lambda: {"gen": _sd(), "extra": _Custom()}),
    ),
    Row(
        "checkpoint-numpy-scalar",
        lambda c: ["info", str(c.tmp / "n.pt")],
        match=r"Python objects .*numpy.*refuses it for safety",
        setup=_save_ckpt("n.pt", np.float64(1.5)),
    ),
    Row("checkpoint-png", lambda c: ["info", str(c.tmp / "p.png")], match=r"p\.png is not a checkpoint", setup=_png),
    Row(
        "checkpoint-malicious-pickle-legacy",
        lambda c: ["info", str(c.tmp / "evil.pt")],
        match=r"holds Python objects .*posix\.system.*could run code.*refuses it for safety",
        setup=_evil_setup(True),
        check=_no_pwned,
    ),
    Row(
        "checkpoint-malicious-pickle-zip",
        lambda c: ["info", str(c.tmp / "evil.pt")],
        match=r"holds Python objects .*posix\.system.*could run code.*refuses it for safety",
        setup=_evil_setup(False),
        check=_no_pwned,
    ),
    Row(
        "checkpoint-direction-weight-reshaped",
        lambda c: ["info", str(c.tmp / "dw.pt")],
        match=r"wrong shapes \(1\): dec\.direction\.weight \(64, 10\) vs expected \(64, 20\)",
        setup=_save_ckpt("dw.pt", lambda: {"gen": _sd(dec__direction__weight=torch.zeros(64, 10))}),
        check=lambda c, err: "enc.fc.4" not in err,
    ),
    Row(
        "checkpoint-to-flows-block-removed",
        lambda c: ["info", str(c.tmp / "tf.pt")],
        match=r"size 32:.*missing keys \(5\): dec\.to_flows\.1\.\* \(5 keys",
        setup=_save_ckpt(
            "tf.pt", lambda: {"gen": {k: v for k, v in _sd().items() if not k.startswith("dec.to_flows.1.")}}
        ),
        check=lambda c, err: "size 16" not in err,
    ),
]


def _unreadable_image(name: str, data: bytes):
    return Row(
        f"image-{name}",
        lambda c: c.reenact(source=c.tmp / "s.png"),
        match=r"could not read image .*s\.png",
        setup=_bad_file("s.png", data),
    )


def _garble_middle(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 200] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


def _garbled(ctx: Ctx) -> None:
    _write_video(ctx.tmp / "long.mp4", 60)
    _garble_middle(ctx.tmp / "long.mp4", ctx.tmp / "g.mp4")
    (ctx.tmp / "long.mp4").unlink()


def _kept_frames_said(ctx: Ctx, err: str) -> None:
    import re

    kept = int(re.search(r"kept (\d+) frames", err).group(1))
    assert 0 < kept < 60 and video_frames(ctx.out / "o.mp4") == kept


def _zero_frame_video(fmt: str):
    def setup(ctx: Ctx) -> None:
        import av

        with av.open(str(ctx.tmp / f"z.{fmt}"), "w", format={"mp4": "mp4", "mkv": "matroska"}[fmt]) as c:
            st = c.add_stream("libx264" if fmt == "mp4" else "ffv1", rate=10)
            st.width = st.height = S
            st.pix_fmt = "yuv420p"

    return setup


def _audio_only(ctx: Ctx) -> None:
    import av

    with av.open(str(ctx.tmp / "a.mp4"), "w") as c:
        st = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for pkt in st.encode(frame):
            c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


IMAGE_VIDEO_ROWS = [
    Row("image-missing", lambda c: c.reenact(source=c.tmp / "none.png"), match=r"image .*none\.png does not exist"),
    _unreadable_image("empty-file", b""),
    _unreadable_image("text-renamed-png", b"just some text, not an image\n"),
    Row("image-directory", lambda c: c.reenact(source=c.tmp), match=r"is a folder, not an image"),
    Row("video-directory", lambda c: c.reenact(driving=c.tmp), match=r"is a folder, not a video"),
    Row(
        "image-1x1-warns",
        lambda c: c.reenact(source=_png(c, "one.png", (1, 1))),
        code=0,
        warns=SmallImageWarning,
        outputs={"o.mp4": 6},
    ),
    Row(
        "image-14000x14000-bomb",
        lambda c: c.reenact(source=c.tmp / "bomb.png"),
        match=r"bomb\.png has 196 megapixels, above the limit of \d+ megapixels.*decompression bombs; shrink it",
        setup=lambda c: _bomb_png(c.tmp / "bomb.png", 14000, 14000),
    ),
    Row("video-missing", lambda c: c.reenact(driving=c.tmp / "none.mp4"), match=r"video .*none\.mp4 does not exist"),
    Row(
        "video-zero-frame-mp4",
        lambda c: c.reenact(driving=c.tmp / "z.mp4"),
        match=r"z\.mp4",
        setup=_zero_frame_video("mp4"),
    ),
    Row(
        "video-zero-frame-mkv",
        lambda c: c.reenact(driving=c.tmp / "z.mkv"),
        match=r"z\.mkv",
        setup=_zero_frame_video("mkv"),
    ),
    Row(
        "video-truncated",
        lambda c: c.reenact(driving=c.tmp / "t.mp4"),
        match=r"t\.mp4",
        setup=lambda c: (c.tmp / "t.mp4").write_bytes((c.assets / "drv.mp4").read_bytes()[:700]),
    ),
    Row(
        "video-audio-only",
        lambda c: c.reenact(driving=c.tmp / "a.mp4"),
        match=r"a\.mp4 has no video stream",
        setup=_audio_only,
    ),
    Row(
        "video-text-file",
        lambda c: c.reenact(driving=c.tmp / "v.mp4"),
        match=r"could not open video .*v\.mp4",
        setup=_bad_file("v.mp4", b"hello, I am not a video\n" * 10),
    ),
    Row(
        "video-garbled-middle-keeps-frames",
        lambda c: c.reenact(driving=c.tmp / "g.mp4"),
        code=0,
        setup=_garbled,
        warns=DamagedVideoWarning,
        match=r"g\.mp4 is damaged.*kept \d+ frames",
        outputs={"o.mp4": -1},
        check=_kept_frames_said,
        lead=True,
    ),
    Row(
        "video-garbled-middle-strict",
        lambda c: c.reenact("--strict", driving=c.tmp / "g.mp4"),
        setup=_garbled,
        match=r"g\.mp4 is damaged: decoding failed after frame \d+",
        lead=True,
    ),
]


def _bomb_png(path: Path, w: int, h: int) -> None:
    """A PNG whose header declares w×h pixels (PIL refuses it on open, before any pixel is decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


ARGUMENT_ROWS = [
    Row("args-batch-0", lambda c: c.reenact("--batch", 0), match=r"--batch must be at least 1"),
    Row("args-max-frames--1", lambda c: c.reenact("--max-frames", -1), match=r"--max-frames must be at least 1"),
    Row("args-max-frames-0", lambda c: c.reenact("--max-frames", 0), match=r"--max-frames must be at least 1"),
    Row(
        "args-frames--3-demo",
        lambda c: ["demo", "--frames", "-3", "--preset", PRESET, "--out", str(c.out / "d.mp4")],
        match=r"--frames must be at least 1",
    ),
    Row(
        "args-frames-0-demo",
        lambda c: ["demo", "--frames", "0", "--preset", PRESET, "--out", str(c.out / "d.mp4")],
        match=r"--frames must be at least 1",
    ),
    Row("args-frames--5-generate", lambda c: c.generate("--frames", -5), match=r"--frames must be at least 1"),
    Row("args-steps-0", lambda c: c.generate("--frames", 4, "--steps", 0), match=r"--steps must be at least 1"),
    Row("args-chunk-0", lambda c: c.generate("--frames", 4, "--chunk", 0), match=r"chunk"),
    Row("args-overlap--3", lambda c: c.generate("--frames", 4, "--overlap", -3), match=r"overlap"),
    Row("args-fps-0", lambda c: c.generate("--frames", 4, "--fps", 0), match=r"fps"),
    Row("args-fps-nan", lambda c: c.generate("--frames", 4, "--fps", "nan"), match=r"fps"),
    Row("args-fps-inf", lambda c: c.generate("--frames", 4, "--fps", "inf"), match=r"fps", lead=True),
    Row(
        "args-max-batch-0",
        lambda c: ["export", "--checkpoint", str(c.assets / "ck.pt"), "--out", str(c.out / "e"), "--max-batch", "0"],
        match=r"max.batch",
    ),
    Row("args-backend-foo", lambda c: c.reenact("--backend", "foo"), match=r"foo"),
    Row("args-device-cuda-without-gpu", lambda c: c.reenact("--device", "cuda"), match=r"cuda|CUDA"),
    Row("args-device-tpu", lambda c: c.reenact("--device", "tpu"), match=r"tpu", lead=True),
    Row("args-device-gpu", lambda c: c.reenact("--device", "gpu"), match=r"gpu", lead=True),
    Row("args-out-avi", lambda c: c.reenact(out=c.out / "x.avi"), match=r"x\.avi must end in \.mp4"),
]


def _readonly_file(ctx: Ctx) -> None:
    ctx.out.mkdir()
    (ctx.out / "o.mp4").write_bytes(b"precious")
    (ctx.out / "o.mp4").chmod(0o444)


def _kept_readonly(ctx: Ctx, err: str) -> None:
    assert (ctx.out / "o.mp4").read_bytes() == b"precious"


def _symlinked_output(ctx: Ctx) -> None:
    ctx.out.mkdir()
    (ctx.out / "real.mp4").write_bytes(b"old")
    (ctx.out / "o.mp4").symlink_to("real.mp4")


def _written_through(ctx: Ctx, err: str) -> None:
    assert (ctx.out / "o.mp4").is_symlink() and os.readlink(ctx.out / "o.mp4") == "real.mp4"
    assert video_frames(ctx.out / "real.mp4") == 6


def _device_kept(ctx: Ctx, err: str) -> None:
    assert Path("/dev/null").is_char_device()


OUTPUT_ROWS = [
    Row(
        "outputs-folder-does-not-exist",
        lambda c: c.reenact(out=c.out / "new" / "deeper" / "o.mp4"),
        code=0,
        outputs={"new/deeper/o.mp4": 6},
    ),
    Row(
        "outputs-path-is-a-directory",
        lambda c: c.reenact(out=c.out),
        match=r"out is a folder; the video needs a file name",
        setup=lambda c: c.out.mkdir(),
    ),
    Row(
        "outputs-existing-read-only-file",
        lambda c: c.reenact(),
        match=r"o\.mp4 exists and is read-only.*chmod u\+w",
        setup=_readonly_file,
        outputs={"o.mp4": -1},
        check=_kept_readonly,
    ),
    Row(
        "outputs-symlink-written-through",
        lambda c: c.reenact(),
        code=0,
        setup=_symlinked_output,
        outputs={"o.mp4": -1, "real.mp4": 6},
        check=_written_through,
    ),
    Row(
        "outputs-device-node",
        lambda c: c.reenact(out="/dev/null"),
        match=r"/dev/null is a character device",
        check=_device_kept,
    ),
]


def _codes_file(ctx: Ctx, name: str, codes: np.ndarray, lengths) -> Path:
    with open(ctx.tmp / name, "wb") as f:
        np.savez(
            f,
            codes=codes.astype(np.float32),
            lengths=np.array(lengths),
            fps=np.full(len(lengths), 10.0),
            names=np.array([f"v{i}" for i in range(len(lengths))]),
        )
    return ctx.tmp / name


def _train(ctx: Ctx, codes: Path, *extra) -> list[str]:
    return [
        "train-lmdm",
        "--codes",
        str(codes),
        "--out",
        str(ctx.out / "lm"),
        "--preset",
        "lmdm-tiny",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        *map(str, extra),
    ]


def _codes_complete(ctx: Ctx, out: str) -> None:
    from leo_rt.train import MotionCodes

    data = MotionCodes.load(ctx.out / "codes")
    assert data.codes.shape == (6, 20) and data.lengths.tolist() == [6] and np.isfinite(data.codes).all()


def _folder_one_bad_video(ctx: Ctx) -> None:
    (ctx.tmp / "vids").mkdir()
    shutil.copy(ctx.assets / "drv.mp4", ctx.tmp / "vids" / "good.mp4")
    (ctx.tmp / "vids" / "bad.mp4").write_bytes(b"garbage" * 50)


def _animator_dir(ctx: Ctx) -> None:
    from leo_rt import load_animator

    load_animator(ctx.assets / "ck.pt").save(ctx.tmp / "anim")


LMDM_ROWS = [
    Row(
        "extract-motion-out-without-npz",
        lambda c: [
            "extract-motion",
            "--checkpoint",
            str(c.assets / "ck.pt"),
            "--videos",
            str(c.assets / "drv.mp4"),
            "--out",
            str(c.out / "codes"),
            "--no-progress",
        ],
        code=0,
        match=r"wrote .*codes",
        outputs={"codes": -1},
        check=_codes_complete,
    ),
    Row(
        "train-lmdm-on-empty-codes-file",
        lambda c: _train(c, c.tmp / "codes"),
        match=r"codes\b.*is an empty file",
        setup=_bad_file("codes", b""),
    ),
    Row(
        "lmdm-too-short-codes",
        lambda c: _train(c, _codes_file(c, "short.npz", np.zeros((3, 20)), [3])),
        match=r"no video has at least \d+ frames",
    ),
    Row(
        "lmdm-nan-codes",
        lambda c: _train(c, _codes_file(c, "nan.npz", np.full((40, 20), np.nan), [40])),
        match=r"NaN or inf \(first at row 0\)",
    ),
    Row("lmdm-png-as-codes", lambda c: _train(c, _png(c)), match=r"p\.png is not an \.npz archive"),
    Row(
        "lmdm-animator-dir-as-lmdm",
        lambda c: c.generate("--frames", 4, "--lmdm", c.tmp / "anim"),
        match=r"not an LMDM",
        setup=_animator_dir,
    ),
    Row(
        "lmdm-folder-with-one-bad-video",
        lambda c: [
            "extract-motion",
            "--checkpoint",
            str(c.assets / "ck.pt"),
            "--videos",
            str(c.tmp / "vids"),
            "--out",
            str(c.out / "c.npz"),
            "--no-progress",
        ],
        match=r"bad\.mp4",
        setup=_folder_one_bad_video,
    ),
]


def _paths_unicode(ctx: Ctx) -> None:
    d = ctx.tmp / "dös fïles ✓"
    d.mkdir()
    shutil.copy(ctx.assets / "src.png", d / "sö urce.png")
    shutil.copy(ctx.assets / "drv.mp4", d / "drí ving.mp4")
    shutil.copy(ctx.assets / "ck.pt", d / "chëck point.pt")


def _symlinked_inputs(ctx: Ctx) -> None:
    for name in ("src.png", "drv.mp4", "ck.pt"):
        (ctx.tmp / f"l-{name}").symlink_to(ctx.assets / name)


def _relative_inputs(ctx: Ctx) -> None:
    (ctx.tmp / "in").mkdir()
    for name in ("src.png", "drv.mp4", "ck.pt"):
        shutil.copy(ctx.assets / name, ctx.tmp / "in" / name)


PATH_ROWS = [
    Row(
        "paths-relative",
        lambda c: c.reenact(source="in/src.png", driving="./in/drv.mp4", ckpt="in/../in/ck.pt", out="out/o.mp4"),
        code=0,
        setup=_relative_inputs,
        outputs={"o.mp4": 6},
        chdir=True,
    ),
    Row(
        "paths-spaces-and-unicode",
        lambda c: c.reenact(
            source=c.tmp / "dös fïles ✓" / "sö urce.png",
            driving=c.tmp / "dös fïles ✓" / "drí ving.mp4",
            ckpt=c.tmp / "dös fïles ✓" / "chëck point.pt",
            out=c.out / "ö ut ✓.mp4",
        ),
        code=0,
        setup=_paths_unicode,
        outputs={"ö ut ✓.mp4": 6},
    ),
    Row(
        "paths-symlinked-inputs",
        lambda c: c.reenact(source=c.tmp / "l-src.png", driving=c.tmp / "l-drv.mp4", ckpt=c.tmp / "l-ck.pt"),
        code=0,
        setup=_symlinked_inputs,
        outputs={"o.mp4": 6},
    ),
    Row(
        "paths-dangling-symlink",
        lambda c: c.reenact(source=c.tmp / "dangling.png"),
        match=r"dangling\.png does not exist",
        setup=lambda c: (c.tmp / "dangling.png").symlink_to(c.tmp / "gone.png"),
    ),
]

CLI_ROWS = CHECKPOINT_ROWS + IMAGE_VIDEO_ROWS + ARGUMENT_ROWS + OUTPUT_ROWS + LMDM_ROWS + PATH_ROWS


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refusals
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.id for r in CLI_ROWS])
def test_cli_fault(row: Row, assets, tmp_path, capsys, monkeypatch):
    ctx = Ctx(assets, tmp_path)
    if row.chdir:
        monkeypatch.chdir(tmp_path)
    if row.setup:
        row.setup(ctx)
    argv = row.argv(ctx)
    before = files_in(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(argv, capsys)
    said = err + "".join(str(w.message) for w in caught) + (out if code == 0 else "")
    assert code == row.code, f"exit {code}, expected {row.code}\n{err[-2000:]}"
    if row.code != 0:
        assert "Traceback" not in err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) >= 1 and lines[-1].startswith("leo-rt"), err
    if row.match:
        import re

        assert re.search(row.match, said, re.I | re.S), f"{row.match!r} not in:\n{said[-2000:]}"
    if row.warns:
        assert any(issubclass(w.category, row.warns) for w in caught), [str(w.message) for w in caught]
    # nothing but the intended outputs, and those complete
    new = files_in(tmp_path) - before
    intended = {str(Path("out") / name) for name in row.outputs}
    assert new <= intended, f"left behind: {sorted(new - intended)}"
    for name, frames in row.outputs.items():
        path = ctx.out / name
        assert path.exists(), f"{name} was not written"
        if frames > 0:
            assert video_frames(path) == frames
    if row.check:
        assert row.check(ctx, said) is not False


# ------------------------------------------------------------------------------------------------ the API


@pytest.fixture(scope="module")
def session(assets):
    from leo_rt import Session

    with Session(assets / "ck.pt", backend="torch", device="cpu") as s:
        s.start(assets / "src.png")
        yield s


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _no_new_threads(before: set[threading.Thread], wait_s: float = 10.0) -> None:
    """Every thread started since `before` has ended (waiting for it up to wait_s: a producer that is in the
    middle of a slow item ends when that item returns)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        left = [t for t in _threads() - before if t.is_alive()]
        if not left:
            return
        time.sleep(0.02)
    raise AssertionError(f"threads left: {[t.name for t in left]}")


@dataclass
class ApiRow:
    id: str
    call: Callable  # call(session, assets) -> result (or raises)
    exc: type[BaseException] | None = None
    match: str | None = None
    check: Callable | None = None  # check(result)
    lead: bool = False


API_ROWS = [
    ApiRow("codes-width-19", lambda s, a: s.render(torch.zeros(3, 19)), InputError, r"\(N, 20\).*\(3, 19\)"),
    ApiRow("codes-width-21", lambda s, a: s.render(torch.zeros(3, 21)), InputError, r"\(N, 20\).*\(3, 21\)"),
    ApiRow("codes-1d", lambda s, a: s.render(torch.zeros(20)), InputError, r"\(N, 20\)"),
    ApiRow("codes-numpy", lambda s, a: s.render(np.zeros((2, 20), np.float32)), InputError, r"tensor"),
    ApiRow("codes-0-rows", lambda s, a: s.render(torch.zeros(0, 20)), check=lambda r: tuple(r.shape) == (0, 3, S, S)),
    ApiRow(
        "codes-relative-alpha-wrong-width",
        lambda s, a: s.relative_alpha(s.state, torch.zeros(2, 21), torch.zeros(1, 21)),
        InputError,
        r"21",
        lead=True,
    ),
    ApiRow(
        "codes-nan",
        lambda s, a: s.render(torch.tensor([[0.0] * 20, [float("nan")] * 20])),
        InputError,
        r"NaN.*row 1|row 1.*NaN",
        lead=True,
    ),
    ApiRow(
        "codes-inf",
        lambda s, a: s.render(torch.tensor([[float("inf")] + [0.0] * 19])),
        InputError,
        r"inf.*row 0|row 0.*inf",
        lead=True,
    ),
    ApiRow(
        "image-nan-source", lambda s, a: s.start(torch.full((1, 3, S, S), float("nan"))), InputError, r"NaN", lead=True
    ),
]


@pytest.mark.parametrize("row", API_ROWS, ids=[r.id for r in API_ROWS])
def test_api_fault(row: ApiRow, session, assets):
    if row.exc is not None:
        with pytest.raises(row.exc, match=row.match):
            row.call(session, assets)
        session.start(assets / "src.png")  # a refused source leaves the session usable with a good one
    else:
        assert row.check(row.call(session, assets))


def test_image_modes_load(tmp_path):
    """1×1 (with a warning), 16-bit grey, grey, RGBA, CMYK JPEG: each loads as a finite (1, 3, S, S) source."""
    cases = {
        "g16.png": Image.fromarray(np.array([[0, 30000], [65535, 1000]], dtype=np.uint16)),
        "grey.png": Image.new("L", (40, 40), 77),
        "rgba.png": Image.new("RGBA", (40, 40), (10, 20, 30, 128)),
        "cmyk.jpg": Image.new("CMYK", (40, 40), (0, 50, 100, 0)),
        "one.png": Image.new("RGB", (1, 1), (200, 10, 10)),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = load_image(tmp_path / name, S)
        assert x.shape == (1, 3, S, S) and torch.isfinite(x).all() and -1 <= x.min() <= x.max() <= 1
        small = [w for w in caught if issubclass(w.category, SmallImageWarning)]
        assert bool(small) == (name in ("one.png", "g16.png")), (name, [str(w.message) for w in caught])
        if small:
            assert "pixels, below the" in str(small[0].message)


def test_image_8000x8000_loads(tmp_path):
    Image.new("L", (8000, 8000), 128).save(tmp_path / "big.jpg", quality=50)
    x = load_image(tmp_path / "big.jpg", S)
    assert x.shape == (1, 3, S, S) and abs(float(x.mean()) - (128 / 127.5 - 1)) < 0.02


def test_odd_sized_variable_frame_rate_video(tmp_path):
    """321×179 at a variable frame rate: centre-cropped to square frames, a finite constant fps reported."""
    import av

    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as c:
        st = c.add_stream("ffv1", rate=30)
        st.width, st.height, st.pix_fmt = 321, 179, "yuv420p"
        st.time_base = __import__("fractions").Fraction(1, 1000)
        t = 0
        for i, f in enumerate(_frames(8, 179, 321)):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = t, st.time_base
            t += 30 if i % 2 else 60
            for pkt in st.encode(frame):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    from leo_rt.io import video_info

    info = video_info(path)
    frames = list(iter_video(path, S))
    assert len(frames) == 8 and all(f.shape == (S, S, 3) for f in frames)
    assert 0 < info.fps < 1000 and np.isfinite(info.fps)


# ------------------------------------------------------------------------------------------------ streams


def _codes(n_chunks: int, rows: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 20, generator=g) * 0.3 for _ in range(n_chunks)]


def _raising(after: int):
    def gen():
        yield from _codes(after)
        raise RuntimeError("producer failed on purpose")

    return gen()


def _slow(n: int, delay: float):
    for c in _codes(n):
        time.sleep(delay)
        yield c


@pytest.fixture
def fresh(assets):
    """A session of its own (closed by the test), and the threads alive before it was opened."""
    from leo_rt import Session

    before = _threads()
    s = Session(assets / "ck.pt", backend="torch", device="cpu")
    s.start(assets / "src.png")
    return s, before


@pytest.mark.parametrize("after", [3, 0], ids=["mid-way", "first-item"])
def test_stream_producer_raises(fresh, after):
    s, before = fresh
    with s:
        with pytest.raises(RuntimeError, match="on purpose"):
            for _ in s.stream(_raising(after), batch=2):
                pass
    _no_new_threads(before)


def test_stream_producer_wrong_width(fresh):
    s, before = fresh
    with s:
        with pytest.raises(InputError, match=r"\(N, 20\)"):
            list(s.stream([torch.zeros(4, 20), torch.zeros(4, 19)], batch=2))
    _no_new_threads(before)


def test_stream_consumer_breaks_fast_producer(fresh):
    s, before = fresh
    with s:
        before_stream = _threads()
        for i, _ in enumerate(s.stream(iter(_codes(1000)), batch=2)):
            if i == 1:
                break
        _no_new_threads(before_stream)  # the stream's own thread ends with the stream, the session still open
    _no_new_threads(before)


def test_stream_consumer_breaks_slow_producer(fresh):
    s, before = fresh
    with s:
        before_stream = _threads()
        for _ in range(5):  # five early exits, no thread left by any
            for _ in s.stream(_slow(100, 0.05), batch=4):
                break
        _no_new_threads(before_stream)
    _no_new_threads(before)


def test_stream_kept_without_reading_ends_at_close(fresh):
    s, before = fresh
    gen = s.stream(iter(_codes(1000)), batch=2)
    next(gen)  # started, then kept without reading
    s.close()
    _no_new_threads(before)
    del gen


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
def test_stream_policies_count_and_order(fresh, policy):
    s, before = fresh
    chunks = _codes(10, rows=2, seed=7)
    with s:
        expect = [s.render(c) for c in chunks]
        got = []
        for frames in s.stream(chunks, batch=2, queue_size=1, policy=policy):
            got.append(frames)
            time.sleep(0.03)  # a slow consumer
        idx = []
        for g in got:
            match = [i for i, e in enumerate(expect) if torch.allclose(g, e, atol=1e-4)]
            assert len(match) == 1
            idx.append(match[0])
        assert idx == sorted(idx) and len(set(idx)) == len(idx)  # in order, none twice
        assert len(got) * 2 + s.dropped == 20
        if policy == "block":
            assert s.dropped == 0 and idx == list(range(10))
    _no_new_threads(before)


# ------------------------------------------------------------------------------------------------ outputs


def test_umask_is_respected(assets, tmp_path, capsys):
    from leo_rt.files import write_text
    from leo_rt.train import MotionCodes

    codes = MotionCodes(np.zeros((3, 20), np.float32), np.array([3]), np.array([10.0]), ["v"])
    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(umask)
            d = tmp_path / f"u{umask:03o}"
            write_text(d / "a.json", "{}\n")
            codes.save(d / "codes.npz")
            _write_video(d / "v.mp4", 2)
            for name in ("a.json", "codes.npz", "v.mp4"):
                assert (d / name).stat().st_mode & 0o777 == mode, (name, oct(umask))
        os.umask(0o022)
        code, _, err = run_cli(
            [
                "extract-motion",
                "--checkpoint",
                assets / "ck.pt",
                "--videos",
                assets / "drv.mp4",
                "--out",
                tmp_path / "cli.npz",
                "--no-progress",
            ],
            capsys,
        )
        assert code == 0, err
        assert (tmp_path / "cli.npz").stat().st_mode & 0o777 == 0o644
        # a replaced file keeps its own mode
        (tmp_path / "keep.json").write_text("old")
        (tmp_path / "keep.json").chmod(0o640)
        write_text(tmp_path / "keep.json", "new")
        assert (tmp_path / "keep.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_bench_json_through_a_symlink_to_stdout(tmp_path, capfd):
    """`bench --json LINK` where LINK → /dev/stdout: the JSON is printed and the link is kept (lead: the CLI
    writes it with leo_rt.files.write_json, which streams to a device)."""
    link = tmp_path / "so.json"
    link.symlink_to("/dev/stdout")
    code = main(["bench", "--tiny", "--sizes", str(S), "--batches", "1", "--frames", "1", "--json", str(link)])
    out = capfd.readouterr().out
    assert code == 0
    assert link.is_symlink() and os.readlink(link) == "/dev/stdout"
    start = out.index("{")
    data, _ = json.JSONDecoder().raw_decode(out[start:])
    assert isinstance(data, dict) and data
    assert files_in(tmp_path) == {"so.json"}


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full(assets, tmp_path, capsys, monkeypatch):
    """ENOSPC from the muxer: a tiny tmpfs filled up when this process may mount one, else the writer's mux
    patched to fail as a full disk does. Exit 2, one line saying the disk is full, nothing left behind."""
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, "256k")
    try:
        if mounted:
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # leave no room
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
        else:
            disk.mkdir(exist_ok=True)
            real = VideoWriter.write

            def full(self, frames):
                real(self, frames)
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

            monkeypatch.setattr(VideoWriter, "write", full)
        before = files_in(disk)
        ctx = Ctx(assets, tmp_path)
        code, out, err = run_cli(ctx.reenact(out=disk / "o.mp4"), capsys)
        assert code == 2, err
        assert "Traceback" not in err and re.search(r"no space left to write .*o\.mp4.*full", err, re.I), err
        assert files_in(disk) == before
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


_NO_DAC = r"""
import ctypes, json, os, sys
# Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (bits 1, 2) from this process, so that root obeys permission bits
# as any user does (a no-op for a user, who has no capabilities). Done before any thread exists.
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
libc = ctypes.CDLL(None, use_errno=True)
hdr, data = Header(0x20080522, 0), (Data * 2)()
assert libc.capget(ctypes.byref(hdr), data) == 0
for d in data[:1]:
    d.effective &= ~0b110
    d.permitted &= ~0b110
    d.inheritable &= ~0b110
assert libc.capset(ctypes.byref(hdr), data) == 0, ctypes.get_errno()
status = open("/proc/self/status").read()
cap_eff = int(status.split("CapEff:")[1].split()[0], 16)
assert not cap_eff & 0b110
from leo_rt.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    import io, contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = f"raised {type(e).__name__}: {e}"
    results[name] = [code, err.getvalue()]
print("RESULTS " + json.dumps(results))
"""


def test_read_only_output_folder_and_cache(assets, tmp_path):
    """A read-only output folder and a read-only $LEO_RT_CACHE: exit 2 with the reason and the fix, nothing
    written. Run in a subprocess without the capabilities that let root ignore permission bits."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "cache").mkdir()
    ctx = Ctx(assets, tmp_path)
    cases = {
        "folder": ctx.reenact(out=ro / "o.mp4"),
        "codes": [
            "extract-motion",
            "--checkpoint",
            str(assets / "ck.pt"),
            "--videos",
            str(assets / "drv.mp4"),
            "--out",
            str(ro / "c.npz"),
            "--no-progress",
        ],
        "cache": ctx.reenact("--backend", "onnxruntime", out=tmp_path / "w" / "o.mp4"),
        "export": ["export", "--checkpoint", str(assets / "ck.pt"), "--out", str(ro / "engines")],
    }
    ro.chmod(0o555)
    (ro / "cache").chmod(0o555)
    env = {**os.environ, "LEO_RT_CACHE": str(ro / "cache"), "PYTHONPATH": str(REPO)}
    try:
        r = subprocess.run(
            [sys.executable, "-c", _NO_DAC, json.dumps(cases)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
        )
    finally:
        ro.chmod(0o755)
        (ro / "cache").chmod(0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.split("RESULTS ", 1)[1])
    for name, (code, err) in results.items():
        assert code == 2, (name, code, err)
        assert "Traceback" not in err, (name, err)
        assert re.search(r"permission denied", err, re.I), (name, err)
    assert "LEO_RT_CACHE" in results["cache"][1]
    assert files_in(ro) == set() and files_in(tmp_path / "w") == set()


# ------------------------------------------------------------------------------------------------ interrupts


def _popen_cli(args: list, tmp: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LEO_RT_CACHE": str(tmp / "_cache")}
    return subprocess.Popen(
        [sys.executable, "-m", "leo_rt.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp,
        **kw,
    )


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _has_bytes(paths) -> bool:
    """Some file among paths holds bytes (one may vanish between the listing and its stat: the writer's own)."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_size > 0:
                return True
    return False


def test_ctrl_c_in_reenact(assets, tmp_path, capsys):
    """SIGINT mid-render: exit 130, "interrupted" on one line and no traceback, the previous output kept as it was,
    no temporary file left; a rerun works."""
    drv = _write_video(tmp_path / "long.mp4", 3000)
    out = tmp_path / "out" / "o.mp4"
    _write_video(out, 2)
    old = out.read_bytes()
    ctx = Ctx(assets, tmp_path)
    proc = _popen_cli(ctx.reenact(driving=drv)[0:], tmp_path)
    _wait_for(lambda: _has_bytes(out.parent.glob(".o.mp4.*")), proc, "frames were being written")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert out.read_bytes() == old
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.mp4"]
    code, _, err = run_cli(ctx.reenact("--max-frames", 4, driving=drv), capsys)
    assert code == 0, err
    assert video_frames(out) == 4


# ------------------------------------------------------------------------------------------------ engines


def _session_script(ckpt: Path, out: Path) -> str:
    return (
        "import sys, torch; from leo_rt import Session\n"
        f"with Session({str(ckpt)!r}, backend='onnxruntime', device='cpu') as s:\n"
        f"    s.start({str(out.parent.parent / 'assets_src.png')!r})\n"
        "    f = s.render(torch.zeros(2, 20))\n"
        f"    torch.save(f, {str(out)!r})\n"
    )


@pytest.fixture(scope="module")
def engines(assets, tmp_path_factory):
    """Exported engines of the tiny checkpoint, made the hard way (each step is also a row of the table):

    1. `leo-rt export` into the folder the onnxruntime backend uses in a shared $LEO_RT_CACHE, interrupted by
       SIGINT once its first artifact is in the manifest: exit 130, the folder consistent (every artifact listed
       verifies, nothing partial);
    2. then, at the same time on that folder: the export rerun (skips the done stage) and two sessions of the
       onnxruntime backend for the same checkpoint (the cache race; they export into the cache when the entry is
       not complete): every process succeeds and the manifest holds every entry.
    """
    from leo_rt import load_animator
    from leo_rt.export import read_manifest, state_dict_hash, verify_artifact

    root = tmp_path_factory.mktemp("engines")
    shutil.copy(assets / "src.png", root / "assets_src.png")
    cache = root / "cache"
    # the cache entry the backend uses for this checkpoint (a different naming only means more work below)
    eng = cache / f"{state_dict_hash(load_animator(assets / 'ck.pt').state_dict())[:16]}-{S}"
    report = {}
    p = _popen_cli(["export", "--checkpoint", assets / "ck.pt", "--out", eng], root)
    _wait_for(lambda: (eng / "manifest.json").exists() and bool(read_manifest(eng)["artifacts"]), p, "one artifact")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    done = set(read_manifest(eng)["artifacts"])
    for key in done:
        verify_artifact(eng, key)
    report["interrupt"] = (p.returncode, err, done, sorted(x.name for x in eng.iterdir()))

    env = {**os.environ, "PYTHONPATH": str(REPO), "LEO_RT_CACHE": str(cache)}
    procs = {"rerun": _popen_cli(["export", "--checkpoint", assets / "ck.pt", "--out", eng], root)}
    (root / "x").mkdir()
    for name in ("cache-a", "cache-b"):
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _session_script(assets / "ck.pt", root / "x" / f"{name}.pt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=root,
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        report[name] = (proc.returncode, out, err)
    return {"dir": eng, "root": root, "cache": cache, "report": report, "done": done}


def test_ctrl_c_in_export_then_rerun_skips_done_stages(engines):
    code, err, done, names = engines["report"]["interrupt"]
    assert code == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert done and not [n for n in names if "partial" in n]
    code, out, err = engines["report"]["rerun"]
    assert code == 0, err[-3000:]
    for key in done:
        assert f"skip   {key}" in out, out


def test_concurrent_exports_and_a_shared_cache(engines):
    """An export and two sessions of the onnxruntime backend exporting into one $LEO_RT_CACHE entry at the same
    time: all succeed, no manifest entry is lost, every artifact verifies, and the sessions render the same
    frames. (Sessions of different checkpoints use different cache entries; the lock tests below show that
    concurrent read-modify-writes of one manifest keep every entry.)"""
    from leo_rt.export import read_manifest, verify_artifact

    for name in ("rerun", "cache-a", "cache-b"):
        code, _, err = engines["report"][name]
        assert code == 0, (name, err[-3000:])
    folders = [d for d in engines["cache"].iterdir() if (d / "manifest.json").exists()]
    assert engines["dir"] in folders and len(folders) <= 2  # the sessions share one entry (the export's, today)
    for d in folders:
        arts = read_manifest(d)["artifacts"]
        assert set(arts) == {"source_encoder/onnx", "motion_encoder/onnx", "renderer/onnx"}
        for key in arts:
            verify_artifact(d, key)
    a = torch.load(engines["root"] / "x" / "cache-a.pt")
    b = torch.load(engines["root"] / "x" / "cache-b.pt")
    assert torch.equal(a, b) and torch.isfinite(a).all()


def _copy_engines(engines, tmp_path, edit: Callable[[dict, Path], None] | None = None) -> Path:
    d = tmp_path / "E"
    shutil.copytree(engines["dir"], d, ignore=shutil.ignore_patterns("*.lock"))
    if edit is not None:
        m = json.loads((d / "manifest.json").read_text())
        edit(m, d)
        (d / "manifest.json").write_text(json.dumps(m))
    return d


def _open_engines(d: Path, **kw):
    from leo_rt import Session

    with Session(d, backend="onnxruntime", device="cpu", **kw) as s:
        s.start(torch.zeros(1, 3, S, S))
        return s.render(torch.zeros(1, 20))


def test_engines_byte_flipped_or_deleted_or_truncated_manifest(engines, tmp_path):
    d = _copy_engines(engines, tmp_path)
    data = bytearray((d / "renderer.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "renderer.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"renderer\.onnx does not match its SHA-256.*re-export"):
        _open_engines(d)
    (d / "renderer.onnx").unlink()
    with pytest.raises(ManifestError, match=r"renderer\.onnx listed in manifest\.json is missing"):
        _open_engines(d)
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match=r"manifest\.json is not valid JSON.*--force"):
        _open_engines(d)


def test_engines_manifest_size_edited(engines, tmp_path):
    from leo_rt.export import ExportedStage

    def edit(m, d):
        for e in m["artifacts"].values():
            e["size"] = 64

    d = _copy_engines(engines, tmp_path, edit)
    with pytest.raises(ManifestError, match=r"size"):
        _open_engines(d)
    with pytest.raises(ManifestError, match=r"says size 64 but its tensors are 32 pixels wide"):
        ExportedStage(d, "renderer", "onnx")  # no expectations given: the manifest contradicts itself


def test_engines_manifest_deleted(engines, tmp_path):
    from leo_rt.export import check_engines

    d = _copy_engines(engines, tmp_path)
    (d / "manifest.json").unlink()
    for call in (lambda: _open_engines(d), lambda: check_engines(d, engines["root"] / "assets_src.png")):
        with pytest.raises(ManifestError) as e:
            call()
        assert "no manifest.json" in str(e.value) and "model.safetensors" not in str(e.value)


def test_engines_entry_pointing_at_another_stage(engines, tmp_path):
    from leo_rt.export import ExportedStage

    def edit(m, d):
        m["artifacts"]["renderer/onnx"]["file"] = m["artifacts"]["motion_encoder/onnx"]["file"]
        m["artifacts"]["renderer/onnx"]["sha256"] = m["artifacts"]["motion_encoder/onnx"]["sha256"]

    d = _copy_engines(engines, tmp_path, edit)
    for call in (lambda: _open_engines(d), lambda: ExportedStage(d, "renderer", "onnx")):
        with pytest.raises(ManifestError, match=r"points at motion_encoder\.onnx, the file of motion_encoder/onnx"):
            call()


def test_engines_from_another_checkpoint(engines, assets, tmp_path, capsys):
    """The recorded checkpoint replaced by another of the same size, or the recorded hash edited: refused on
    load, by the library (check_engines), the Session and the CLI."""
    from leo_rt.export import check_engines

    ck = tmp_path / "ck.pt"
    shutil.copy(assets / "ck.pt", ck)
    d = _copy_engines(engines, tmp_path, lambda m, d: m.__setitem__("checkpoint_path", str(ck)))
    check_engines(d, ck)  # the right one passes
    shutil.copy(assets / "alt" / "ck.pt", ck)  # replaced in place (same size)
    assert ck.stat().st_size == (assets / "ck.pt").stat().st_size
    with pytest.raises(ManifestError, match=r"exported from another checkpoint.*--force"):
        check_engines(d, ck)
    with pytest.raises(ManifestError, match=r"another checkpoint"):
        _open_engines(d)
    ctx = Ctx(assets, tmp_path)
    code, _, err = run_cli(ctx.reenact("--backend", "onnxruntime", "--engines", d, ckpt=ck), capsys)
    assert code == 2 and "another checkpoint" in err, err
    assert files_in(ctx.out) == set()

    def edit_hash(m, d):
        for e in m["artifacts"].values():
            e["checkpoint_sha256"] = "0" * 64
        m["checkpoint_sha256"] = "0" * 64

    d2 = tmp_path / "E2"
    shutil.move(_copy_engines(engines, tmp_path / "h", edit_hash), d2)
    with pytest.raises(ManifestError, match=r"another checkpoint"):
        check_engines(d2, assets / "ck.pt")


def test_engines_whose_recorded_checkpoint_is_gone(engines, assets, tmp_path):
    d = _copy_engines(engines, tmp_path, lambda m, d: m.__setitem__("checkpoint_path", str(tmp_path / "gone.pt")))
    with pytest.raises(LeoError, match=r"checkpoint"):
        _open_engines(d)
    frames = _open_engines(assets / "ck.pt", engines=d)  # the folder and the checkpoint given together
    assert frames.shape == (1, 3, S, S) and torch.isfinite(frames).all()


def test_manifest_lock_keeps_every_entry_of_two_processes(tmp_path):
    """Two processes each add 30 entries by read-modify-write (update_manifest): none is lost."""
    script = (
        "import sys; from leo_rt.export import update_manifest\n"
        "for i in range(30):\n"
        "    update_manifest(sys.argv[1], lambda m: m['artifacts'].__setitem__(f'{sys.argv[2]}{i}/onnx', "
        "{'file': 'f', 'sha256': 'x'}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), p], env=env) for p in "ab"]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    from leo_rt.export import read_manifest

    assert len(read_manifest(tmp_path)["artifacts"]) == 60


def test_artifact_being_built_is_waited_for(tmp_path):
    """A process that finds an artifact being built (its lock held by another process) waits for it."""
    from leo_rt.export import artifact_lock

    script = (
        "import sys, time; from pathlib import Path; from leo_rt.export import artifact_lock\n"
        "with artifact_lock(sys.argv[1], 'renderer/onnx'):\n"
        "    Path(sys.argv[1], 'started').write_text('1')\n"
        "    time.sleep(1.0)\n"
        "    Path(sys.argv[1], 'renderer.onnx').write_text('built')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env)
    _wait_for(lambda: (tmp_path / "started").exists(), proc, "the builder took the lock")
    waited = []
    with artifact_lock(tmp_path, "renderer/onnx", log=waited.append):
        assert (tmp_path / "renderer.onnx").read_text() == "built"  # not before the builder finished
    assert proc.wait(timeout=60) == 0
    assert waited and "waiting for another process" in waited[0]
