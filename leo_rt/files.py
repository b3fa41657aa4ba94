"""Writing files so that a failure never leaves a half-written one behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path` (same suffix, so writers that look at it pick the right format);
    rename it onto `path` when the block succeeds, delete it when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint_dir(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict,
    metadata: dict[str, str],
    weights_file: str = "model.safetensors",
    config_file: str = "config.json",
) -> Path:
    """A checkpoint directory: `weights_file` (safetensors with `metadata`) and `config_file` (JSON), each
    written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory; leo_rt checkpoints are directories")
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path / weights_file) as tmp:
        save_file(cpu, tmp, metadata=metadata)
    with atomic_path(path / config_file) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2) + "\n")
    return path
