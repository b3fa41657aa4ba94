"""TensorRT engines built from the exported ONNX files (TensorRT 10 API), cached, and run on torch's CUDA stream.

UNVERIFIED HERE: TensorRT cannot be installed on the machines this project is developed and tested on, and the
lent GPU machines do not have it either, so this module is written against the TensorRT 10 Python API and has
never run; its tests skip with that reason. It imports tensorrt lazily, inside the functions that need it.

Engines are cached under a key of: the ONNX model's SHA-256, the TensorRT version, the GPU's compute capability,
the precision and the batch profile. An engine whose key does not match the current machine is refused with an
error saying how to rebuild.

Precision (leo_rt.precision.Precision): fp32 means IEEE fp32 (TensorRT's default TF32 tactics are turned off),
tf32 allows them, fp16 / bf16 allow those types where TensorRT finds them faster (weakly typed network).

Running: every tensor address handed to TensorRT is 256-byte aligned (inputs that are not, e.g. row slices of a
larger tensor, are copied into aligned staging buffers); batches above the profile's maximum are split; output
buffers grow to the largest batch actually run (a source encoder run at batch 1 holds batch-1 buffers only).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import BackendUnavailable, InputError, ManifestError
from ..precision import Precision
from .manifest import sha256_file

ALIGNMENT = 256  # bytes: TensorRT's requirement for every I/O tensor address
CUSTOM_DOMAIN = "leo_rt"  # the domain of the optional WarpBlend node, which TensorRT has no plugin for


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


def engine_key(onnx_sha256: str, precision: Precision | str, profile: Profile) -> dict:
    """The identity an engine is cached under."""
    trt = _trt()
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU; none is visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return {
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt.__version__,
        "compute_capability": f"{major}.{minor}",
        "precision": Precision.parse(precision).value,
        "profile": asdict(profile),
    }


def _key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def custom_nodes(onnx_path: str | os.PathLike) -> list[str]:
    """The `leo_rt` custom-domain nodes of an ONNX file (the --onnx-warp-node WarpBlend), which TensorRT cannot
    build without a plugin."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == CUSTOM_DOMAIN})


def refuse_custom_nodes(onnx_path: str | os.PathLike) -> None:
    nodes = custom_nodes(onnx_path)
    if nodes:
        raise InputError(
            f"{onnx_path} holds {', '.join(nodes)} (written by --onnx-warp-node), which TensorRT cannot build: leo_rt "
            "has no TensorRT plugin for it. Re-export without --onnx-warp-node for TensorRT engines"
        )


def _builder_flags(trt, config, precision: Precision) -> None:
    # TensorRT enables TF32 tactics by default on Ampere and later: fp32 must turn them off to mean fp32
    if precision is Precision.TF32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision is Precision.FP16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision is Precision.BF16:
        config.set_flag(trt.BuilderFlag.BF16)


def _timing_cache(trt, config, cache_path: Path, log):
    """The builder's timing cache, read from cache_path when that file fits this TensorRT and GPU, else fresh."""
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if data:
        log(f"{cache_path} was written by another TensorRT version or GPU; starting a fresh timing cache")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError("TensorRT refused a fresh timing cache (IBuilderConfig.set_timing_cache returned False)")
    return cache


def build_engine(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    precision: Precision | str = Precision.FP32,
    profile: Profile,
    batch_inputs: tuple[str, ...],
    workspace_mb: int = 1024,
    force: bool = False,
    log=lambda s: None,
) -> Path:
    """Build (or reuse from the cache) a serialized engine for `onnx_path`. `workspace_mb` caps the builder's
    scratch memory for edge devices; a timing cache beside the engines makes rebuilds fast."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    refuse_custom_nodes(onnx_path)  # before TensorRT is needed: the error is the same with or without it
    trt = _trt()
    precision = Precision.parse(precision)
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
    _builder_flags(trt, config, precision)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if tensor.name in batch_inputs:
            dims = [[b, *shape[1:]] for b in (profile.min_batch, profile.opt_batch, profile.max_batch)]
        else:
            dims = [shape] * 3
        opt_profile.set_shape(tensor.name, *dims)
    if config.add_optimization_profile(opt_profile) < 0:
        raise RuntimeError(f"TensorRT refused the batch profile {asdict(profile)} for {onnx_path}")
    cache_path = out_dir / "timing.cache"
    cache = _timing_cache(trt, config, cache_path, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} ({precision.value})")
    from ..files import atomic_path

    with atomic_path(engine_path) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    with atomic_path(cache_path) as tmp:
        Path(tmp).write_bytes(bytes(cache.serialize()))
    with atomic_path(meta_path) as tmp:
        Path(tmp).write_text(json.dumps(key, indent=2) + "\n")
    return engine_path


def is_aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    return t.data_ptr() % alignment == 0


def batch_chunks(batch: int, max_batch: int) -> list[tuple[int, int]]:
    """[start, stop) ranges that cover `batch` rows in pieces of at most `max_batch`."""
    if max_batch < 1:
        raise InputError(f"max_batch must be at least 1, got {max_batch}")
    return [(i, min(i + max_batch, batch)) for i in range(0, batch, max_batch)]


class TRTEngine:
    """A deserialized engine run on the current torch CUDA stream, without host copies per call.

    `infer(feeds)` takes CUDA tensors by input name; inputs whose address TensorRT cannot take (not 256-byte
    aligned, not contiguous, another dtype) go through staging buffers. Batches above the profile maximum are split
    into several runs. Outputs are views of buffers this engine owns, valid until its next call (copy them to keep
    them); a split batch returns fresh tensors."""

    def __init__(self, engine_path: str | os.PathLike, onnx_path: str | os.PathLike):
        trt = _trt()
        engine_path = Path(engine_path)
        meta = json.loads(engine_path.with_suffix(".json").read_text())
        profile = Profile(**meta["profile"])
        expected = engine_key(sha256_file(onnx_path), meta["precision"], profile)
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
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {engine_path} (out of memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # the dynamic batch axis shows as -1 in the engine's shapes
        self.batch_inputs = {n for n in self.inputs if self.engine.get_tensor_shape(n)[0] == -1}
        self.batch_outputs = {n for n in self.outputs if self.engine.get_tensor_shape(n)[0] == -1}
        self._trt = trt
        self._capacity = 0  # the batch the output and staging buffers hold
        self._outputs: dict[str, torch.Tensor] = {}
        self._staging: dict[str, torch.Tensor] = {}

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

    def _input_shape(self, name: str, batch: int) -> list[int]:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        shape = list(hi)
        if name in self.batch_inputs:
            shape[0] = batch
        elif list(lo) != shape:  # only axis 0 of the batch inputs is dynamic in leo_rt's engines
            raise RuntimeError(f"input {name} of this engine has a dynamic shape {list(lo)}…{shape} besides the batch")
        return shape

    def _set_shape(self, name: str, shape: list[int]) -> None:
        if not self.context.set_input_shape(name, shape):
            p = self.profile
            raise InputError(
                f"TensorRT refused shape {shape} for input {name} (profile batch {p.min_batch}…{p.max_batch}, "
                "other axes as exported)"
            )

    def allocate(self, batch: int | None = None) -> None:
        """Size the output and staging buffers for `batch` (default: the profile's opt batch); they also grow by
        themselves to the largest batch run. A source encoder needs batch 1 only."""
        b = self.profile.opt_batch if batch is None else batch
        b = max(self.profile.min_batch, min(b, self.profile.max_batch))
        for name in self.inputs:
            shape = self._input_shape(name, b)
            self._set_shape(name, shape)
            self._staging[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
        for name in self.outputs:
            shape = list(self.context.get_tensor_shape(name))
            if any(s < 0 for s in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of output {name}: {shape}")
            self._outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
        self._capacity = b

    def _batch(self, feeds: dict[str, torch.Tensor]) -> int:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InputError(f"missing engine inputs {missing}; this engine takes {self.inputs}")
        sizes = {feeds[n].shape[0] for n in self.batch_inputs}
        if len(sizes) > 1:
            raise InputError(f"the batch inputs {sorted(self.batch_inputs)} have different batch sizes {sorted(sizes)}")
        return sizes.pop() if sizes else 1

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on the current torch CUDA stream; a batch above the profile's maximum runs in pieces."""
        batch = self._batch(feeds)
        if batch < self.profile.min_batch:
            raise InputError(f"batch {batch} is below this engine's profile minimum {self.profile.min_batch}")
        chunks = batch_chunks(batch, self.profile.max_batch)
        if len(chunks) == 1:
            return self._run(feeds, batch)
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.outputs}
        last: dict[str, torch.Tensor] = {}
        for lo, hi in chunks:
            piece = {n: (t[lo:hi] if n in self.batch_inputs else t) for n, t in feeds.items()}
            out = self._run(piece, hi - lo)
            for n, t in out.items():
                if n in self.batch_outputs:
                    parts[n].append(t.clone())  # the next piece overwrites the engine's buffers
                else:
                    last[n] = t.clone()
        return {n: (torch.cat(parts[n]) if n in self.batch_outputs else last[n]) for n in self.outputs}

    def _address(self, name: str, t: torch.Tensor, batch: int) -> int:
        """An address TensorRT can read `t` from: its own, or that of an aligned staging copy."""
        want = self._torch_dtype(name)
        if not t.is_cuda:
            raise InputError(f"input {name} must be a CUDA tensor, got one on {t.device}")
        if t.dtype == want and t.is_contiguous() and is_aligned(t):
            return t.data_ptr()
        stage = self._staging[name][:batch] if name in self.batch_inputs else self._staging[name]
        stage.copy_(t)  # converts the dtype and gathers a strided view in one device copy
        return stage.data_ptr()

    def _run(self, feeds: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        if batch > self._capacity:
            self.allocate(batch)
        for name in self.inputs:
            t = feeds[name]
            shape = self._input_shape(name, batch)
            if list(t.shape) != shape:
                raise InputError(f"input {name} must have shape {shape}, got {list(t.shape)}")
            self._set_shape(name, shape)
            if not self.context.set_tensor_address(name, self._address(name, t, batch)):
                raise RuntimeError(f"TensorRT refused the address of input {name}")
        outs = {}
        for name in self.outputs:
            shape = list(self.context.get_tensor_shape(name))
            buf = self._outputs[name]
            view = buf[: shape[0]] if name in self.batch_outputs else buf
            view = view.view(shape)  # a leading slice of a fresh buffer: as aligned as the buffer itself
            if not self.context.set_tensor_address(name, view.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of output {name}")
            outs[name] = view
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
        return outs


__all__ = [
    "ALIGNMENT",
    "Precision",
    "Profile",
    "TRTEngine",
    "TensorRTUnavailable",
    "batch_chunks",
    "build_engine",
    "custom_nodes",
    "engine_key",
    "is_aligned",
    "refuse_custom_nodes",
]
