"""TensorRT engines built from the exported ONNX files (TensorRT 10 API), cached, and run on torch's CUDA stream.

UNVERIFIED HERE: TensorRT cannot be installed on the machines this project is developed and tested on, so this
module is written against the TensorRT 10 Python API and never ran; its tests skip with that reason. It imports
tensorrt lazily, inside the functions that need it.

Engines are cached under a key of: the ONNX model's SHA-256, the TensorRT version, the GPU's compute capability,
the precision and the batch profile. An engine whose key does not match the current machine is refused with an
error saying how to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import torch

from ..errors import BackendUnavailable, InputError
from .manifest import ManifestError, sha256_file


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass(frozen=True)
class Profile:
    """min/opt/max batch for the dynamic axis 0 of `batch_inputs`; other inputs keep their exported shapes."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(
                f"need 1 <= min <= opt <= max batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )


class TensorRTUnavailable(BackendUnavailable):
    """TensorRT (10+) or a CUDA GPU is missing; the message says what to install or use instead."""


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed: install NVIDIA TensorRT 10 for your CUDA version (pip install tensorrt) on a "
            "machine with an NVIDIA GPU, or use the onnx / aoti formats"
        ) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: leo_rt uses the TensorRT 10 API")
    return trt


def engine_key(onnx_sha256: str, precision: Precision, profile: Profile) -> dict:
    """The identity an engine is cached under."""
    trt = _trt()
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU; none is visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return {
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt.__version__,
        "compute_capability": f"{major}.{minor}",
        "precision": Precision(precision).value,
        "profile": asdict(profile),
    }


def _key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_engine(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    precision: Precision | str = Precision.FP32,
    profile: Profile,
    batch_inputs: tuple[str, ...],
    workspace_mb: int = 1024,
    force: bool = False,
) -> Path:
    """Build (or reuse from the cache) a serialized engine for `onnx_path`. `workspace_mb` caps the builder's
    scratch memory for edge devices; a timing cache beside the engines makes rebuilds fast."""
    trt = _trt()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    precision = Precision(precision)
    key = engine_key(sha256_file(onnx_path), precision, profile)
    engine_path = out_dir / f"{onnx_path.stem}.{_key_name(key)}.engine"
    meta_path = engine_path.with_suffix(".json")
    if engine_path.is_file() and meta_path.is_file() and not force:
        return engine_path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch only
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision is Precision.FP16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision is Precision.BF16:
        config.set_flag(trt.BuilderFlag.BF16)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if tensor.name in batch_inputs:
            dims = [[b, *shape[1:]] for b in (profile.min_batch, profile.opt_batch, profile.max_batch)]
        else:
            dims = [shape] * 3
        opt_profile.set_shape(tensor.name, *dims)
    config.add_optimization_profile(opt_profile)
    cache_path = out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} ({precision.value})")
    from ..files import atomic_path

    with atomic_path(engine_path) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    with atomic_path(cache_path) as tmp:
        Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))
    with atomic_path(meta_path) as tmp:
        Path(tmp).write_text(json.dumps(key, indent=2) + "\n")
    return engine_path


class TRTEngine:
    """A deserialized engine: load → allocate (once, for the profile's max batch) → infer on torch's current CUDA
    stream, with no host copies per call."""

    def __init__(self, engine_path: str | os.PathLike, onnx_path: str | os.PathLike):
        trt = _trt()
        engine_path = Path(engine_path)
        meta = json.loads(engine_path.with_suffix(".json").read_text())
        profile = Profile(**meta["profile"])
        expected = engine_key(sha256_file(onnx_path), Precision(meta["precision"]), profile)
        if meta != expected:
            diff = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
            raise ManifestError(
                f"{engine_path} was built for {diff} (engine vs this machine/model); rebuild it with "
                "`leo-rt export --format trt --force`"
            )
        self.profile = profile
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ManifestError(f"TensorRT could not deserialize {engine_path}; rebuild it with --force")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._buffers: dict[str, torch.Tensor] = {}
        self._trt = trt

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
        }
        return table[self.engine.get_tensor_dtype(name)]

    def allocate(self, max_batch: int | None = None) -> None:
        """Preallocate every output for the largest batch; later calls use views of these buffers."""
        b = max_batch or self.profile.max_batch
        for name in self.inputs:
            shape = list(self.engine.get_tensor_profile_shape(name, 0)[2])
            self.context.set_input_shape(name, shape)
        for name in self.outputs:
            shape = list(self.context.get_tensor_shape(name))
            shape[0] = max(shape[0], b)
            self._buffers[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on the current torch CUDA stream. Outputs are views into the preallocated buffers (valid until the
        next call)."""
        if not self._buffers:
            self.allocate()
        for name in self.inputs:
            t = feeds[name]
            if not t.is_cuda or not t.is_contiguous():
                raise InputError(f"input {name} must be a contiguous CUDA tensor")
            self.context.set_input_shape(name, list(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = list(self.context.get_tensor_shape(name))
            view = self._buffers[name][: shape[0]]
            self.context.set_tensor_address(name, view.data_ptr())
            outs[name] = view.view(shape)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return outs
