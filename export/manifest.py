"""manifest.json beside exported artifacts: what each file is, its SHA-256, its contract, and the versions that
made it. Loading verifies it and refuses a tampered, missing or mismatched file with an error saying how to
rebuild."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from ..errors import ManifestError

MANIFEST = "manifest.json"
FORMAT_NAME = "leo_rt.export"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_hash(sd: dict[str, torch.Tensor]) -> str:
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


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {"format": FORMAT_NAME, "version": 1, "artifacts": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); re-export with `leo-rt export ... --force`") from None
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path} is not a leo_rt export manifest")
    return data


def write_manifest(out_dir: str | os.PathLike, data: dict) -> Path:
    from ..files import atomic_path

    path = Path(out_dir) / MANIFEST
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def verify_artifact(out_dir: str | os.PathLike, key: str, expect: dict | None = None) -> dict:
    """The manifest entry of artifact `key` ("stage/format"), after checking that its file exists and hashes as
    recorded, and (when given) that the recorded fields in `expect` match (size, precision, checkpoint hash …)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    entry = manifest["artifacts"].get(key)
    rebuild = f"re-export with `leo-rt export --checkpoint CKPT --out {out_dir} --force`"
    if entry is None:
        raise ManifestError(f"{out_dir} has no {key} artifact in {MANIFEST}; {rebuild}")
    path = out_dir / entry["file"]
    if not path.is_file():
        raise ManifestError(f"{path} listed in {MANIFEST} is missing; {rebuild}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ManifestError(f"{path} does not match its SHA-256 in {MANIFEST} (modified or corrupt); {rebuild}")
    for field, value in (expect or {}).items():
        if entry.get(field) != value:
            raise ManifestError(f"{path} was exported with {field}={entry.get(field)!r}, not {value!r}; {rebuild}")
    return entry
