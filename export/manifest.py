"""manifest.json beside exported artifacts: what each file is, its SHA-256, its contract, the checkpoint it was
exported from and the versions that made it. Loading verifies it and refuses a tampered, missing or mismatched
file with an error saying how to rebuild.

Concurrency: a folder may be shared by several processes (the backend cache under $LEO_RT_CACHE). Writers take
`export_lock(out_dir)` (a file lock) around a whole export and `manifest_lock(out_dir)` around every
read-modify-write of the manifest (`update_manifest`); a process that finds the folder being exported waits for
the other one and then finds its artifacts up to date. Readers take no lock: the manifest and every artifact are
replaced by an atomic rename, so a reader sees an old or a new file, never half of one.

Checkpoint identity: `checkpoint_hash(source)` is the SHA-256 of a checkpoint's tensors (keys, shapes, values cast
to float32); for a file it is cached by path, size, mtime, ctime and inode (in memory and in
$LEO_RT_CACHE/checkpoint_hashes.json), so checking it on every load is cheap.
`check_engines(engines_dir, checkpoint)` refuses engines exported from another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ManifestError, OutputError

MANIFEST = "manifest.json"
FORMAT_NAME = "leo_rt.export"
HASH_CACHE = "checkpoint_hashes.json"
LOCK_SUFFIX = ".lock"
_REQUIRED = {"file": str, "sha256": str}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_hash(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the keys, dtypes, shapes and bytes of a state dict (the source checkpoint's identity)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "tensorrt", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _rebuild(out_dir: Path) -> str:
    return f"re-export with `leo-rt export --checkpoint CKPT --out {out_dir} --force`"


def cache_root() -> Path:
    """$LEO_RT_CACHE (default ~/.cache/leo_rt/engines): the backend cache, and the checkpoint hash cache."""
    return Path(os.environ.get("LEO_RT_CACHE", Path.home() / ".cache" / "leo_rt" / "engines"))


# ------------------------------------------------------------------------------------------------ reading


def read_manifest(out_dir: str | os.PathLike, *, missing_ok: bool = True) -> dict:
    """The manifest of `out_dir`, checked for shape (a JSON object of the leo_rt.export format whose artifacts
    are objects with a file name and a SHA-256). A missing manifest is an empty one when `missing_ok`, else a
    ManifestError that says what to do."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        if path.exists():
            raise ManifestError(f"{path} is not a file; remove it and {_rebuild(out_dir)}")
        if not missing_ok:
            _missing_manifest(out_dir)
        return {"format": FORMAT_NAME, "version": 1, "artifacts": {}}
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); {_rebuild(out_dir)}") from None
    except OSError as e:
        raise ManifestError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    except RecursionError:
        raise ManifestError(f"{path} is nested too deeply to be a manifest; {_rebuild(out_dir)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path} is not a leo_rt export manifest; {_rebuild(out_dir)}")
    artifacts = data.get("artifacts", {})
    if not isinstance(artifacts, dict):
        raise ManifestError(f"{path} is damaged ('artifacts' is not an object); {_rebuild(out_dir)}")
    for key, entry in artifacts.items():
        bad = not isinstance(entry, dict) or any(not isinstance(entry.get(f), t) for f, t in _REQUIRED.items())
        if bad:
            raise ManifestError(f"{path} is damaged (entry {key!r} lacks a file name or SHA-256); {_rebuild(out_dir)}")
    data["artifacts"] = artifacts
    return data


def _missing_manifest(out_dir: Path) -> None:
    from ..checkpoint import ENGINE_SUFFIXES

    if not out_dir.is_dir():
        raise ManifestError(f"engines folder {out_dir} does not exist; export one with `leo-rt export`")
    found = sorted(p.name for p in out_dir.iterdir() if p.suffix in ENGINE_SUFFIXES)
    if found:
        raise ManifestError(
            f"{out_dir} holds exported engines ({', '.join(found[:3])}) but no {MANIFEST}, so they cannot be "
            f"verified or used: the manifest was deleted or the export did not finish; {_rebuild(out_dir)}"
        )
    raise ManifestError(f"{out_dir} is not an engines folder (no {MANIFEST}); export one with `leo-rt export`")


def is_engines_dir(path: str | os.PathLike) -> bool:
    """True for a folder with a manifest.json, or with exported artifacts but no manifest (a damaged one)."""
    from ..checkpoint import ENGINE_SUFFIXES

    path = Path(path)
    if not path.is_dir():
        return False
    return (path / MANIFEST).exists() or any(p.suffix in ENGINE_SUFFIXES for p in path.iterdir())


def verify_artifact(out_dir: str | os.PathLike, key: str, expect: dict | None = None) -> dict:
    """The manifest entry of artifact `key` ("stage/format"), after checking that it belongs to that stage
    (another stage's file is refused), that its file exists inside the folder and hashes as recorded, that its
    recorded size agrees with its recorded shapes, and (when given) that the recorded fields in `expect` match
    (size, precision, checkpoint hash …)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir, missing_ok=False)
    entries = manifest["artifacts"]
    entry = entries.get(key)
    rebuild = _rebuild(out_dir)
    if entry is None:
        raise ManifestError(f"{out_dir} has no {key} artifact in {MANIFEST}; {rebuild}")
    stage = key.split("/", 1)[0]
    if entry.get("stage", stage) != stage:
        raise ManifestError(
            f"the {key} entry of {out_dir / MANIFEST} describes stage {entry.get('stage')!r}, not {stage!r}; {rebuild}"
        )
    name = entry["file"]
    if not name or Path(name).name != name or name in (".", ".."):
        raise ManifestError(
            f"the {key} entry of {out_dir / MANIFEST} names {name!r}, not a file in the folder; {rebuild}"
        )
    # a file claimed by entries of two stages belongs to the one it is named after (files are named stage.ext)
    claims = [k for k, e in entries.items() if e["file"] == name and k.split("/", 1)[0] != stage]
    named = [k for k in [key, *claims] if name.startswith(k.split("/", 1)[0] + ".")]
    owner = next((k for k in claims if k in named), claims[0] if claims and key not in named else None)
    if owner is not None:
        raise ManifestError(
            f"the {key} entry of {out_dir / MANIFEST} points at {name}, the file of {owner} (another stage): the "
            f"manifest was edited or damaged; {rebuild}"
        )
    path = out_dir / name
    if not path.is_file():
        raise ManifestError(f"{path} listed in {MANIFEST} is missing; {rebuild}")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise ManifestError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    if digest != entry["sha256"]:
        raise ManifestError(f"{path} does not match its SHA-256 in {MANIFEST} (modified or corrupt); {rebuild}")
    _check_size(entry, key, out_dir)
    for field, value in (expect or {}).items():
        if entry.get(field) != value:
            raise ManifestError(f"{path} was exported with {field}={entry.get(field)!r}, not {value!r}; {rebuild}")
    return entry


def _check_size(entry: dict, key: str, out_dir: Path) -> None:
    """The recorded image size must be the spatial size of the recorded image inputs / frame outputs."""
    size = entry.get("size")
    if size is None:
        return
    shapes = [
        rec.get("shape")
        for group in ("inputs", "outputs")
        for name, rec in (entry.get(group) or {}).items()
        if name in ("image", "frames") and isinstance(rec, dict)
    ]
    for shape in shapes:
        if isinstance(shape, list) and shape and shape[-1] != size:
            raise ManifestError(
                f"the {key} entry of {out_dir / MANIFEST} says size {size!r} but its tensors are {shape[-1]} pixels "
                f"wide: the manifest was edited or damaged; {_rebuild(out_dir)}"
            )


# ------------------------------------------------------------------------------------------------ writing


def write_manifest(out_dir: str | os.PathLike, data: dict) -> Path:
    """Replace the manifest atomically. Callers that read it first hold manifest_lock (see update_manifest)."""
    from ..files import atomic_path

    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    with atomic_path(path, what="manifest", hint=_cache_hint(out_dir)) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


_LOCKS: dict[str, object] = {}
_LOCKS_GUARD = threading.Lock()


def _file_lock(path: Path):
    """One FileLock per lock file and process (thread-local counts: threads exclude each other, a thread may
    re-enter its own lock)."""
    from filelock import FileLock

    key = os.path.abspath(path)
    with _LOCKS_GUARD:
        if key not in _LOCKS:
            _LOCKS[key] = FileLock(key, thread_local=True)
        return _LOCKS[key]


@contextmanager
def _locked(lock_path: Path, what: str, log: Callable[[str], None] | None, hint: str | None) -> Iterator[None]:
    from filelock import Timeout

    from ..files import make_dirs, output_error

    make_dirs(lock_path.parent, what=what, hint=hint)
    lock = _file_lock(lock_path)
    try:
        try:
            lock.acquire(timeout=0.2)
        except Timeout:
            if log is not None:
                log(f"waiting for another process that is writing {lock_path.parent} ({what})")
            lock.acquire()
    except OSError as e:  # a read-only folder cannot hold the lock file
        raise (output_error(e, lock_path, hint=hint) or OutputError(f"cannot lock {lock_path} ({e})")) from None
    try:
        yield
    finally:
        lock.release()


def _cache_hint(out_dir: Path) -> str | None:
    try:
        inside = Path(os.path.abspath(out_dir)).is_relative_to(os.path.abspath(cache_root()))
    except ValueError:
        inside = False
    return "set LEO_RT_CACHE to a writable folder" if inside else None


@contextmanager
def export_lock(out_dir: str | os.PathLike, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Held around a whole export into `out_dir` (every artifact build and manifest update of it): a second
    process exporting into the same folder waits, then finds the artifacts up to date."""
    out_dir = Path(out_dir)
    with _locked(out_dir / f".export{LOCK_SUFFIX}", "export", log, _cache_hint(out_dir)):
        yield


@contextmanager
def artifact_lock(out_dir: str | os.PathLike, key: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Held while one artifact ("stage/format") is built: a process that finds it being built waits for it."""
    out_dir = Path(out_dir)
    name = key.replace("/", ".")
    with _locked(out_dir / f".{name}{LOCK_SUFFIX}", f"artifact {key}", log, _cache_hint(out_dir)):
        yield


@contextmanager
def manifest_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Held around every read-modify-write of a manifest."""
    out_dir = Path(out_dir)
    with _locked(out_dir / f".{MANIFEST}{LOCK_SUFFIX}", "manifest", None, _cache_hint(out_dir)):
        yield


def update_manifest(out_dir: str | os.PathLike, change: Callable[[dict], object]) -> dict:
    """Read the manifest, apply `change(manifest)` (in place) and write it back, under manifest_lock: entries
    added by other processes meanwhile are kept. Returns the manifest written."""
    with manifest_lock(out_dir):
        data = read_manifest(out_dir)
        change(data)
        write_manifest(out_dir, data)
        return data


# ------------------------------------------------------------------------------------------------ checkpoints

_HASHES: dict[tuple, str] = {}


def _canonical_hash(sd: Mapping[str, torch.Tensor]) -> str:
    from ..checkpoint import _strip_prefix

    sd = _strip_prefix(dict(sd))
    return state_dict_hash({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})


def _stat_key(path: Path) -> tuple | None:
    from ..checkpoint import WEIGHTS_FILE

    target = path / WEIGHTS_FILE if path.is_dir() else path
    try:
        st = os.stat(target)
    except OSError:
        return None
    return (os.path.realpath(target), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _disk_cache() -> Path:
    return cache_root() / HASH_CACHE


def _disk_get(key: tuple) -> str | None:
    try:
        data = json.loads(_disk_cache().read_text())
        rec = data.get(key[0]) if isinstance(data, dict) else None
        return rec["sha256"] if isinstance(rec, dict) and rec.get("stat") == list(key[1:]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _disk_put(key: tuple, digest: str) -> None:
    """Best effort: a read-only cache just means the hash is computed again next time."""
    from ..files import write_text

    path = _disk_cache()
    try:
        with _locked(path.with_name(path.name + LOCK_SUFFIX), "hash cache", None, None):
            try:
                data = json.loads(path.read_text())
                data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                data = {}
            data[key[0]] = {"stat": list(key[1:]), "sha256": digest}
            if len(data) > 256:  # keep the newest entries only
                data = dict(list(data.items())[-256:])
            write_text(path, json.dumps(data, indent=1) + "\n", what="hash cache")
    except (OSError, ManifestError):
        pass


def checkpoint_hash(source) -> str:
    """The identity of a checkpoint (a path, a state dict, an Animator or an LIA): SHA-256 of its tensors cast
    to float32 (an fp16 file and the fp32 model loaded from it agree). Prefer the path where there is one: it
    identifies the file whatever dtype a model is loaded in. Files are hashed once per path, size, mtime, ctime
    and inode (cached in memory and in $LEO_RT_CACHE/checkpoint_hashes.json)."""
    from ..checkpoint import read_checkpoint

    if hasattr(source, "reference") and hasattr(source, "encode_source"):  # an Animator
        return _canonical_hash(source.reference.state_dict())
    if isinstance(source, torch.nn.Module):
        return _canonical_hash(source.state_dict())
    if isinstance(source, Mapping):
        return _canonical_hash(read_checkpoint(source)[0])
    path = Path(source)
    key = _stat_key(path)
    if key is not None and key in _HASHES:
        return _HASHES[key]
    digest = _disk_get(key) if key is not None else None
    if digest is None:
        digest = _canonical_hash(read_checkpoint(path)[0])
        if key is not None:
            _disk_put(key, digest)
    if key is not None:
        _HASHES[key] = digest
    return digest


def check_engines(engines_dir: str | os.PathLike, checkpoint) -> dict:
    """Refuse an engines folder exported from another checkpoint than `checkpoint` (a path, a state dict, an
    Animator): ManifestError naming both hashes and the fix. Also refuses a folder without a manifest, or with
    none of its artifacts recording a checkpoint. Returns the manifest. Cheap on repeated calls (the checkpoint
    hash is cached; the artifacts themselves are verified by verify_artifact when loaded)."""
    engines_dir = Path(engines_dir)
    manifest = read_manifest(engines_dir, missing_ok=False)
    recorded = {
        str(e.get("checkpoint_sha256", "")).split("+", 1)[0]
        for e in manifest["artifacts"].values()
        if e.get("checkpoint_sha256")
    }
    top = manifest.get("checkpoint_sha256")
    if isinstance(top, str) and top:
        recorded.add(top.split("+", 1)[0])
    if not recorded:
        raise ManifestError(
            f"{engines_dir / MANIFEST} records no checkpoint, so the engines cannot be checked against one; "
            f"{_rebuild(engines_dir)}"
        )
    actual = checkpoint_hash(checkpoint)
    wrong = sorted(r for r in recorded if r != actual)
    if wrong:
        name = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "the given model"
        ckpt = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "CKPT"
        raise ManifestError(
            f"the engines in {engines_dir} were exported from another checkpoint (recorded sha256 {wrong[0][:12]}…, "
            f"{name} has {actual[:12]}…); re-export them with `leo-rt export --checkpoint {ckpt} --out "
            f"{engines_dir} --force`, or pass the checkpoint they were made from"
        )
    return manifest
