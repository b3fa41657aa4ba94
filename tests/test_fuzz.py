"""Fuzzing the input readers with Hypothesis: image bytes, video bytes, checkpoint files, codes files (.npz),
manifests and motion-code tensors. Every input either loads or raises one of leo_rt's errors (a LeoError
subclass): never another exception, never a hang.

File readers run in one long-lived worker process, each example with a time limit: a native decoder (FFmpeg,
libpng, the zip reader of torch) can hang or crash, which a Hypothesis deadline could not stop. The worker is
restarted after a timeout or a crash, and either fails the example. The worker caps its address space, so an
absurd size declared in a header fails as a MemoryError (which must be turned into our error) instead of the
machine swapping.

Examples are bounded (derandomized, so CI runs the same ones every time); set LEO_RT_FUZZ_EXAMPLES=N for N
random examples per reader instead.
"""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import make_lia
from leo_rt.errors import LeoError

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 30.0  # per example, in the worker; the slowest honest input (a 30-frame decode) takes < 1 s
_N = int(os.environ.get("LEO_RT_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int):
    return settings(
        max_examples=_N or examples,
        deadline=None,  # the worker enforces the time limit
        derandomize=not _N,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# ------------------------------------------------------------------------------------------------ the worker

_WORKER = r"""
import json, os, resource, sys, traceback, warnings
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
warnings.simplefilter("ignore")
from leo_rt.errors import LeoError
from leo_rt import io, load_animator
from leo_rt.train import MotionCodes

def video(p):
    io.video_info(p)
    return sum(1 for _ in io.iter_video(p, 32, max_frames=30))

READERS = {
    "image": lambda p: io.load_image(p, 32).shape,
    "video": video,
    "checkpoint": lambda p: load_animator(p).size,
    "codes": lambda p: MotionCodes.load(p).codes.shape,
    "_sleep": lambda p: __import__("time").sleep(float(open(p).read())),  # the harness's own test
}
print(json.dumps({"status": "ready"}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        out = READERS[req["kind"]](req["path"])
        res = {"status": "ok", "out": repr(out)}
    except LeoError as e:
        res = {"status": "leo", "type": type(e).__name__, "msg": str(e)[:300]}
    except BaseException as e:
        res = {"status": "other", "type": type(e).__name__, "msg": "".join(traceback.format_exception(e))[-3000:]}
    print(json.dumps(res), flush=True)
"""


class Worker:
    """A subprocess that reads files with leo_rt's readers, one request at a time, under a time limit."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = None
        self.n = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        limit = str(8 << 30)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, limit],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        ready = self._answer(120.0)
        assert ready == {"status": "ready"}, ready

    def _answer(self, timeout: float) -> dict | None:
        fd = self.proc.stdout.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"status": "crash", "type": f"exit {self.proc.poll()}"}

    def read(self, kind: str, data: bytes, suffix: str, time_limit: float = TIME_LIMIT_S) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.n += 1
        path = self.folder / f"in{self.n % 4}{suffix}"
        path.write_bytes(data)
        self.proc.stdin.write(json.dumps({"kind": kind, "path": str(path)}) + "\n")
        self.proc.stdin.flush()
        res = self._answer(time_limit)
        if res is None or res["status"] == "crash":
            self.close()
            return res or {"status": "hang", "type": f"no answer in {time_limit} s"}
        return res

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("fuzz"))
    w.start()
    yield w
    w.close()


def _judge(res: dict, data: bytes, suffix: str, tmp: Path) -> None:
    if res["status"] in ("ok", "leo"):
        return
    keep = tmp / f"failing{suffix}"
    keep.write_bytes(data)
    pytest.fail(f"{res['status']} {res.get('type')} on {keep} ({len(data)} bytes):\n{res.get('msg', '')}")


# ------------------------------------------------------------------------------------------------ strategies


@st.composite
def edits(draw) -> tuple:
    """A recipe for a damaged file: which seed, and a few byte edits (flip, set, cut, duplicate, insert,
    truncate) placed near its head, near its tail or anywhere, as fractions of its length; or plain random bytes.
    Recipes, not bytes, are what Hypothesis shows for a failing example (the file itself is kept on disk)."""
    if draw(st.integers(0, 9)) == 0:
        return ("random", draw(st.binary(max_size=2048)))
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        region = draw(st.sampled_from(["head", "tail", "any"]))
        where = draw(st.integers(0, 511)) if region != "any" else draw(st.floats(0, 1, exclude_max=True))
        op = draw(st.sampled_from(["flip", "set", "cut", "dup", "insert", "truncate"]))
        arg = {
            "flip": st.integers(0, 7),
            "set": st.sampled_from([0, 0xFF, 0x7F, 0x80]),
            "cut": st.integers(1, 64),
            "dup": st.integers(1, 64),
            "insert": st.binary(min_size=1, max_size=16),
            "truncate": st.none(),
        }[op]
        ops.append((region, where, op, draw(arg)))
    return ("seed", draw(st.integers(0, 7)), tuple(ops))


def apply_edits(recipe: tuple, seeds_: list[bytes]) -> bytes:
    if recipe[0] == "random":
        return recipe[1]
    _, which, ops = recipe
    data = bytearray(seeds_[which % len(seeds_)])
    for region, where, op, arg in ops:
        n = len(data)
        if not n:
            break
        i = {"head": min(where, n - 1), "tail": max(0, n - 1 - where), "any": int(where * n)}[region]
        if op == "flip":
            data[i] ^= 1 << arg
        elif op == "set":
            data[i] = arg
        elif op in ("cut", "truncate"):
            del data[i : (i + arg if op == "cut" else n)]
        elif op == "dup":
            data[i:i] = data[i : i + arg]
        else:
            data[i:i] = arg
    return bytes(data)


def _image_seeds() -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8))
    out = []
    for fmt, im, kw in (
        ("PNG", rgb, {}),
        ("PNG", Image.fromarray(np.arange(192, dtype=np.uint16).reshape(12, 16) * 300), {}),
        ("PNG", rgb.convert("P"), {"transparency": 0}),
        ("JPEG", rgb, {"quality": 80}),
        ("JPEG", rgb.convert("CMYK"), {}),
        ("GIF", rgb.convert("P"), {}),
        ("BMP", rgb, {}),
        ("TIFF", rgb, {}),
        ("WEBP", rgb, {}),
    ):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        out.append((buf.getvalue(), "." + fmt.lower()))
    return out


def _video_seeds(tmp: Path) -> list[tuple[bytes, str]]:
    import av

    from leo_rt.io import VideoWriter

    frames = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with VideoWriter(tmp / "v.mp4", fps=8) as w:
        w.write(frames)
    out = [((tmp / "v.mp4").read_bytes(), ".mp4")]
    for name, fmt, codec in (("v.mkv", "matroska", "ffv1"), ("v.webm", "webm", "libvpx-vp9")):
        if codec not in av.codecs_available:
            continue
        with av.open(str(tmp / name), "w", format=fmt) as c:
            st_ = c.add_stream(codec, rate=8)
            st_.width = st_.height = 16
            st_.pix_fmt = "yuv420p"
            for f in frames:
                for pkt in st_.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(pkt)
            for pkt in st_.encode():
                c.mux(pkt)
        out.append(((tmp / name).read_bytes(), Path(name).suffix))
    return out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    sd = make_lia("lia-32-tiny", seed=2).state_dict()
    torch.save({"gen": sd}, tmp / "ck.pt")
    torch.save({"gen": sd}, tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    from leo_rt import load_animator

    load_animator(sd).save(tmp / "anim")
    from leo_rt.train import MotionCodes

    MotionCodes(
        np.random.default_rng(3).standard_normal((12, 20)).astype(np.float32),
        np.array([5, 7]),
        np.array([25.0, 30.0]),
        ["a.mp4", "b.mp4"],
    ).save(tmp / "codes.npz")
    return {
        "image": _image_seeds(),
        "video": _video_seeds(tmp),
        "checkpoint": [
            ((tmp / "ck.pt").read_bytes(), ".pt"),
            ((tmp / "legacy.pt").read_bytes(), ".pt"),
            ((tmp / "anim" / "model.safetensors").read_bytes(), ".safetensors"),
        ],
        "codes": [((tmp / "codes.npz").read_bytes(), ".npz")],
    }


# ------------------------------------------------------------------------------------------------ the readers


def test_undamaged_seeds_load_in_the_worker(worker, seeds, tmp_path):
    """The harness reads what it should: every seed file loads (so "raised our error" below means something)."""
    for kind, files in seeds.items():
        for data, suffix in files:
            res = worker.read(kind, data, suffix)
            assert res["status"] == "ok", (kind, suffix, res)


@pytest.mark.parametrize("kind,examples", [("image", 80), ("video", 50), ("checkpoint", 30), ("codes", 50)])
def test_mutated_files_load_or_raise_our_error(kind, examples, worker, seeds, tmp_path):
    files = seeds[kind]

    @fuzz_settings(examples)
    @given(recipe=edits(), which_suffix=st.integers(0, len(files) - 1))
    def run(recipe, which_suffix):
        data, suffix = apply_edits(recipe, [d for d, _ in files]), files[which_suffix][1]
        _judge(worker.read(kind, data, suffix), data, suffix, tmp_path)

    run()


_dtypes = st.sampled_from(
    [np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8, np.bool_, "U3", np.complex64]
)


@st.composite
def codes_archives(draw) -> bytes:
    """An .npz with arrays of any dtype and small shape under the names a codes file uses (and others)."""
    from hypothesis.extra.numpy import array_shapes, arrays

    names = draw(st.sets(st.sampled_from(["codes", "lengths", "fps", "names", "other"]), min_size=0, max_size=5))
    out = {}
    for name in names:
        dtype = draw(_dtypes)
        shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
        out[name] = draw(arrays(dtype, shape))
    buf = io.BytesIO()
    np.savez(buf, **out)
    return buf.getvalue()


def test_structured_codes_files_load_or_raise_our_error(worker, tmp_path):
    @fuzz_settings(60)
    @given(data=codes_archives())
    def run(data):
        _judge(worker.read("codes", data, ".npz"), data, ".npz", tmp_path)

    run()


# ------------------------------------------------------------------------------------------------ manifests

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


def _valid_manifest(folder: Path) -> dict:
    from leo_rt.export.manifest import FORMAT_NAME, sha256_file

    (folder / "renderer.onnx").write_bytes(b"onnx bytes")
    (folder / "motion_encoder.onnx").write_bytes(b"other bytes")
    entry = {
        "stage": "renderer",
        "file": "renderer.onnx",
        "sha256": sha256_file(folder / "renderer.onnx"),
        "size": 32,
        "precision": "fp32",
        "checkpoint_sha256": "ab" * 32,
        "inputs": {"alpha": {"shape": ["batch", 20], "dtype": "float32"}},
        "outputs": {"frames": {"shape": ["batch", 3, 32, 32], "dtype": "float32"}},
        "batch": {"min": 1, "opt": 8, "max": 32},
    }
    motion = {**entry, "stage": "motion_encoder", "file": "motion_encoder.onnx"}
    motion["sha256"] = sha256_file(folder / "motion_encoder.onnx")
    return {
        "format": FORMAT_NAME,
        "version": 1,
        "checkpoint_sha256": "ab" * 32,
        "checkpoint_path": str(folder / "ck.pt"),
        "artifacts": {"renderer/onnx": entry, "motion_encoder/onnx": motion},
    }


@st.composite
def manifest_edits(draw) -> list[tuple[list, object]]:
    """Edits (path of keys into the manifest, new value or DELETE) applied to a valid manifest."""
    keys = st.sampled_from(
        ["format", "artifacts", "renderer/onnx", "motion_encoder/onnx", "file", "sha256", "size", "stage", "inputs",
         "outputs", "frames", "shape", "checkpoint_sha256", "checkpoint_path", "batch"]
    )  # fmt: skip
    return draw(
        st.lists(st.tuples(st.lists(keys, min_size=1, max_size=4), st.one_of(st.just("DELETE"), _json)), max_size=4)
    )


def _apply(m, edits):
    for path, value in edits:
        node = m
        for k in path[:-1]:
            if isinstance(node, dict) and k in node:
                node = node[k]
            else:
                break
        else:
            if isinstance(node, dict):
                if value == "DELETE":
                    node.pop(path[-1], None)
                else:
                    node[path[-1]] = value
    return m


def test_manifests_load_or_raise_our_error(tmp_path):
    from leo_rt.export import check_engines, read_manifest, verify_artifact

    folder = tmp_path / "E"
    folder.mkdir()
    base = _valid_manifest(folder)
    sd = {"dec.to_flows.0.bias": torch.zeros(1)}

    @fuzz_settings(150)
    @given(changes=manifest_edits(), raw=st.one_of(st.none(), edits()))
    def run(changes, raw):
        if raw is not None:
            text = apply_edits(raw, [json.dumps(base).encode()])
        else:
            text = json.dumps(_apply(json.loads(json.dumps(base)), changes)).encode()
        (folder / "manifest.json").write_bytes(text)
        for call in (
            lambda: read_manifest(folder),
            lambda: verify_artifact(folder, "renderer/onnx"),
            lambda: verify_artifact(folder, "renderer/onnx", {"size": 32, "precision": "fp32"}),
            lambda: check_engines(folder, sd),
        ):
            try:
                call()
            except LeoError:
                pass

    run()


# ------------------------------------------------------------------------------------------------ motion codes


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from leo_rt import Session, load_animator

    anim = load_animator(make_lia("lia-32-tiny", seed=5).state_dict())
    with Session(anim, backend="torch", device="cpu") as s:
        s.start(torch.zeros(1, 3, 32, 32))
        yield s


_special = st.sampled_from([0.0, -0.0, 1.0, -3.5, 1e30, -1e30, float("nan"), float("inf"), float("-inf")])


@st.composite
def code_tensors(draw):
    dims = draw(st.integers(0, 3))
    shape = [draw(st.sampled_from([0, 1, 2, 3])) for _ in range(dims - 1)] + (
        [draw(st.sampled_from([19, 20, 21]))] if dims else []
    )
    dtype = draw(
        st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool])
    )
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(st.one_of(_special, st.floats(-4, 4)), min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    return t.to(dtype) if dtype != torch.bool else t > 0


def test_motion_code_tensors_render_or_raise_our_error(session):
    @fuzz_settings(60)
    @given(alpha=code_tensors())
    def run(alpha):
        try:
            frames = session.render(alpha)
        except LeoError:
            return
        assert frames.shape == (alpha.shape[0], 3, 32, 32)
        assert torch.isfinite(frames).all()  # non-finite codes are refused, not rendered black

    run()


def test_the_worker_reports_a_hang_and_goes_on(worker):
    """The harness itself: a reader that does not answer in time is reported as a hang (a failure), and the
    worker is restarted for the next input."""
    assert worker.read("_sleep", b"30", ".txt", time_limit=1.0)["status"] == "hang"
    assert worker.read("codes", b"", ".npz")["status"] == "leo"
