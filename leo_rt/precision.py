"""One precision vocabulary for every part of leo_rt: the CLI, sessions, backends, export and benchmarks.

`fp32` means IEEE float32 arithmetic: TF32 tensor-core math is turned off for leo_rt's calls (cuDNN and cuBLAS
default to TF32 convolutions on Ampere and later, which is ~1e-3, not fp32). `tf32` asks for TF32 explicitly:
float32 storage, TF32 matmuls and convolutions where the GPU has them (on CPU it is fp32).
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum

import torch

from .errors import InputError


class Precision(str, Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype tensors are stored and computed in."""
        return _DTYPES[self]

    @property
    def tf32(self) -> bool:
        return self is Precision.TF32

    @property
    def is_16bit(self) -> bool:
        return self in (Precision.FP16, Precision.BF16)

    @classmethod
    def parse(cls, value: str | Precision | torch.dtype) -> Precision:
        """A Precision from its name ('fp32', 'tf32', 'fp16', 'bf16'), itself, or a torch dtype."""
        if isinstance(value, Precision):
            return value
        if isinstance(value, torch.dtype):
            for p, d in _DTYPES.items():
                if d == value and p is not Precision.TF32:
                    return p
            raise InputError(f"no leo_rt precision stores {value}; use one of {names()}")
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InputError(f"unknown precision {value!r}; choose one of {names()}") from None

    def __str__(self) -> str:
        return self.value

    @contextmanager
    def math(self):
        """While active, TF32 is on exactly when this precision is `tf32` (process-wide flags, restored after;
        leo_rt runs device work on one worker thread, so its calls do not race on them)."""
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


_DTYPES = {
    Precision.FP32: torch.float32,
    Precision.TF32: torch.float32,
    Precision.FP16: torch.float16,
    Precision.BF16: torch.bfloat16,
}


def names() -> list[str]:
    """The precision names, for CLI choices and error messages."""
    return [p.value for p in Precision]
