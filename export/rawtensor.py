"""The raw tensor files the C++ runner reads and writes: "LEOT", u32 version (1), u32 dtype (0 = float32),
u32 ndim, i64 dims[ndim], then the little-endian float32 data in C order."""

from __future__ import annotations

import os
import struct

import numpy as np
import torch

from ..errors import InputError

MAGIC = b"LEOT"


def write_raw(path: str | os.PathLike, t: torch.Tensor) -> None:
    from ..files import atomic_path

    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<III", 1, 0, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape))
        f.write(a.astype("<f4").tobytes())


def read_raw(path: str | os.PathLike) -> torch.Tensor:
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:4] != MAGIC:
            raise InputError(f"{path} is not a leo_rt raw tensor file (no LEOT header)")
        version, dtype, ndim = struct.unpack("<III", head[4:])
        if version != 1 or dtype != 0:
            raise InputError(f"{path}: unsupported raw tensor version {version} / dtype {dtype}")
        shape = struct.unpack(f"<{ndim}q", f.read(8 * ndim))
        data = np.frombuffer(f.read(), dtype="<f4")
    if data.size != int(np.prod(shape)):
        raise InputError(f"{path}: {data.size} values for shape {shape}; the file is truncated")
    return torch.from_numpy(data.reshape(shape).copy())
