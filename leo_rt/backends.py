"""Backends: runners (leo_rt.runner.Runner) behind one registry of named, lazily imported factories.

- torch: the eager fast form (the Animator itself).
- compile: torch.compile of the render and encode steps, batches padded to fixed buckets (split above the largest)
  so each bucket compiles once; on CUDA mode="reduce-overhead" captures CUDA graphs and replays them.
- compile-no-graphs: the same compiled code without CUDA graphs (the fallback where graph capture fails).
- onnxruntime: the exported ONNX stages in ONNX Runtime (CPU).
- aoti: the exported AOTInductor packages.
- tensorrt: TensorRT engines built from the ONNX stages (unverified: TensorRT is not installable where leo_rt is
  tested, so `auto` never picks it).
Heavy dependencies are imported inside the factories. Exported artifacts are cached per checkpoint under
$LEO_RT_CACHE (default ~/.cache/leo_rt/engines). Every backend runs on the frame core's device worker
(leo_rt.core), never from two threads. How to add one: docs/ARCHITECTURE.md §5.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .animator import Animator
from .errors import BackendUnavailable, InputError
from .fast import SourceState
from .precision import Precision
from .runner import relative_alpha, render_by_source

BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket(n: int) -> int:
    """The smallest bucket holding n frames (n ≤ the largest bucket)."""
    return next(b for b in BUCKETS if b >= n)


def split(t: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Rows of t in consecutive chunks of at most `size` (the one batching helper of the library)."""
    return [t[i : i + size] for i in range(0, t.shape[0], size)] or [t]


class _Wrapped:
    """What a backend shares with the animator it was made from: config, size, device, relative mode, and the
    eager source encoder (a source is encoded once per stream, so compiling it buys nothing)."""

    animator: Animator
    name: str

    @property
    def config(self):
        return self.animator.config

    @property
    def size(self) -> int:
        return self.animator.size

    @property
    def device(self) -> torch.device:
        return self.animator.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the runner computes in (the frame core checks it against its precision)."""
        return self.animator.dtype

    def encode_source(self, images: torch.Tensor) -> SourceState:
        return self.animator.encode_source(images)

    def relative_alpha(self, source: SourceState, alpha_drv: torch.Tensor, alpha_start: torch.Tensor):
        return relative_alpha(source, alpha_drv, alpha_start)


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """t with its last row repeated up to n rows."""
    return t if t.shape[0] == n else torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


class CompileBackend(_Wrapped):
    """torch.compile of the render step (and the motion encoder) with batches padded to BUCKETS and split above the
    largest, so each bucket compiles once (in `warmup`, not mid-stream). With CUDA graphs every output is copied out
    of the graph's memory before the call returns: the next replay overwrites it."""

    def __init__(self, animator: Animator, cuda_graphs: bool = True):
        self.animator = animator
        self.cuda_graphs = cuda_graphs and animator.device.type == "cuda"
        self.name = "compile" if cuda_graphs else "compile-no-graphs"
        mode = "reduce-overhead" if self.cuda_graphs else None
        self._render = torch.compile(animator.renderer, mode=mode, dynamic=False)
        self._encode = torch.compile(animator.encoder, mode=mode, dynamic=False)

    def _step(self, fn, *args):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        x = self.animator._images(images, "driving images")
        out = []
        with torch.no_grad():
            for part in split(x, BUCKETS[-1]):
                w_a, _ = self._step(self._encode, _pad(part, bucket(part.shape[0])))
                out.append(self.animator.encoder.motion_from_wa(w_a[: part.shape[0]]).clone())
        return torch.cat(out)

    def render(self, state: SourceState, alpha: torch.Tensor, src_index: torch.Tensor | None = None) -> torch.Tensor:
        if src_index is None and state.batch != 1:
            return self.animator.render(state, alpha)  # paired sources: not the streaming case
        a = alpha.to(self.animator.device, self.animator.dtype)
        if src_index is not None:
            src_index = src_index.to(a.device)
        out = []
        with torch.no_grad():
            for i in range(0, max(a.shape[0], 1), BUCKETS[-1]):
                part = a[i : i + BUCKETS[-1]]
                n, b = part.shape[0], bucket(max(part.shape[0], 1))
                if n == 0:
                    return self.animator.render(state, alpha, src_index)
                idx = None if src_index is None else _pad(src_index[i : i + n], b)
                extra = () if idx is None else (idx,)
                frames = self._step(self._render, _pad(part, b), state.styles0, state.feats, *extra)
                out.append(frames[:n].clone())
        return torch.cat(out)

    def warmup(self, batches: tuple[int, ...] | None = None) -> None:
        """Compile (and capture) every bucket a stream of the given batch sizes can meet: each batch's bucket and
        the smaller ones (a stream's last batch may be short). All buckets by default."""
        top = bucket(min(max(batches or BUCKETS), BUCKETS[-1]))
        buckets = [b for b in BUCKETS if b <= top]
        s = self.size
        state = self.encode_source(torch.zeros(1, 3, s, s, device=self.device))
        for b in buckets:
            alpha = torch.zeros(b, self.config.motion_dim, device=self.device)
            self.render(state, alpha)
            self.render(state, alpha)  # a second call: CUDA-graph trees record on the first, capture after


class ExportedBackend(_Wrapped):
    """Runs exported stages (ONNX Runtime sessions or AOTInductor packages) from a verified manifest."""

    def __init__(self, name: str, animator: Animator, engines_dir: Path, fmt: str):
        from .export import ExportedStage

        self.name, self.animator = name, animator
        self._dev = animator.device
        self._source = ExportedStage(engines_dir, "source_encoder", fmt, {"size": animator.size})
        self._motion = ExportedStage(engines_dir, "motion_encoder", fmt, {"size": animator.size})
        self._render = ExportedStage(engines_dir, "renderer", fmt, {"size": animator.size})
        self._max = self._render.entry["batch"]["max"]
        self._dtype = Precision.parse(self._render.entry["precision"]).dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype  # the artifacts' precision (the eager animator beside them stays fp32)

    def _in(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._dev, self._dtype).contiguous()  # the stages take contiguous NCHW tensors

    def encode_source(self, images: torch.Tensor) -> SourceState:
        out = self._source(self._in(self.animator._images(images, "source images")))
        w_a, alpha, styles0, *feats = (t.to(self._dev) for t in out)
        return SourceState(w_a, feats, alpha, styles0)

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        x = self._in(self.animator._images(images, "driving images"))
        return torch.cat([self._motion(part)[0] for part in split(x, self._max)]).to(self._dev)

    def render(self, state: SourceState, alpha: torch.Tensor, src_index: torch.Tensor | None = None) -> torch.Tensor:
        if src_index is not None:
            return render_by_source(self.render, state, alpha, src_index)
        feats = [self._in(f) for f in state.feats]
        styles0 = state.styles0.to(self._dev, torch.float32).contiguous()  # styles stay fp32 in every stage
        chunks = [self._render(part, styles0, *feats)[0] for part in split(self._in(alpha), self._max)]
        return torch.cat(chunks).to(self._dev)


class TensorRTBackend(_Wrapped):  # pragma: no cover - needs TensorRT and a GPU; unverified here
    """Engines from the export cache, run on torch's CUDA stream with preallocated outputs."""

    name = "tensorrt"

    def __init__(self, animator: Animator, engines_dir: Path):
        from .export import verify_artifact
        from .export.tensorrt import TRTEngine

        self.animator = animator
        self._engines = {}
        for stage in ("source_encoder", "motion_encoder", "renderer"):
            entry = verify_artifact(engines_dir, f"{stage}/trt", {"size": animator.size})
            onnx_file = verify_artifact(engines_dir, f"{stage}/onnx")["file"]
            self._engines[stage] = TRTEngine(engines_dir / entry["file"], engines_dir / onnx_file)
            self._engines[stage].allocate(1 if stage == "source_encoder" else None)  # one source per stream

    def _run(self, stage: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {k: v.to("cuda", torch.float32).contiguous() for k, v in feeds.items()}
        return {k: v.clone() for k, v in self._engines[stage].infer(feeds).items()}

    def encode_source(self, images: torch.Tensor) -> SourceState:
        out = self._run("source_encoder", {"image": self.animator._images(images, "source images")})
        feats = [out[f"feat_{r}"] for r in self.animator.config.resolutions]
        return SourceState(out["w_a"], feats, out["alpha_src"], out["styles0"])

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("motion_encoder", {"image": self.animator._images(images, "driving images")})["alpha"]

    def render(self, state: SourceState, alpha: torch.Tensor, src_index: torch.Tensor | None = None) -> torch.Tensor:
        if src_index is not None:
            return render_by_source(self.render, state, alpha, src_index)
        feeds = {"alpha": alpha, "styles0": state.styles0.float()}
        feeds.update({f"feat_{r}": f for r, f in zip(self.animator.config.resolutions, state.feats, strict=True)})
        return self._run("renderer", feeds)["frames"]


# ------------------------------------------------------------------------------------------------- registry


def cache_dir() -> Path:
    return Path(os.environ.get("LEO_RT_CACHE", Path.home() / ".cache" / "leo_rt" / "engines"))


@dataclass(frozen=True)
class BuildRequest:
    """What a backend factory gets: the animator (built in the backend's precision), the checkpoint it came from
    (None for an in-memory animator), an engines folder when given, the precision and a log callback."""

    animator: Animator
    checkpoint: object
    engines_dir: Path | None
    precision: Precision
    log: Callable[[str], None]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    summary: str
    factory: Callable[[BuildRequest], object]
    why_not: Callable[[torch.device], str | None]
    eager_precision: bool = True  # the animator it wraps runs in the session's precision (else fp32 + artifacts)
    verified: bool = True  # has run where leo_rt is tested; `auto` picks only verified backends


def _needs(feature: str, refuse: Callable[[torch.device], str | None] | None = None):
    """A backend's `why_not`: its own refusal first, then the missing prerequisites of `feature` (compilers,
    Python.h, CUDA toolkit, libcuda, packages: leo_rt.prereqs), joined into one line that names each fix."""
    from . import prereqs

    def why_not(device: torch.device) -> str | None:
        own = refuse(device) if refuse is not None else None
        problems = ([own] if own else []) + prereqs.check(feature, device)
        return "; ".join(problems) or None

    return why_not


def _onnxruntime_on_cpu(device: torch.device) -> str | None:
    if device.type == "cuda":
        return "this leo_rt runs ONNX Runtime on CPU only; use the compile backend on CUDA"
    return None


def _engines_for(req: BuildRequest, fmt: str) -> Path:
    """The engines folder to run: the one given, else the cache entry of this checkpoint (exported when missing)."""
    from .export import export_checkpoint, state_dict_hash

    if req.engines_dir is not None:
        return req.engines_dir
    if req.checkpoint is None:
        raise BackendUnavailable(f"the {fmt} artifacts need a checkpoint file or an engines directory")
    digest = state_dict_hash(req.animator.state_dict())[:16]
    engines_dir = cache_dir() / f"{digest}-{req.animator.size}"
    export_checkpoint(
        req.checkpoint,
        engines_dir,
        formats=(fmt,),
        precision=req.precision.value if req.precision is not Precision.TF32 else "fp32",
        device=str(req.animator.device),
        log=req.log,
    )
    return engines_dir


def _onnxruntime(req: BuildRequest) -> ExportedBackend:
    if req.precision not in (Precision.FP32, Precision.TF32):
        raise BackendUnavailable(
            "the onnxruntime backend runs the fp32 ONNX files; use --precision fp32, or the aoti / compile "
            "backends for 16-bit precisions"
        )
    return ExportedBackend("onnxruntime", req.animator, _engines_for(req, "onnx"), "onnx")


def _tensorrt(req: BuildRequest) -> TensorRTBackend:  # pragma: no cover - needs TensorRT and a GPU
    return TensorRTBackend(req.animator, _engines_for(req, "trt"))


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("torch", "the eager fast form", lambda req: req.animator, _needs("torch")),
        BackendSpec(
            "compile",
            "torch.compile, buckets of 1…32 frames, CUDA graphs on CUDA",
            lambda req: CompileBackend(req.animator),
            _needs("compile"),
        ),
        BackendSpec(
            "compile-no-graphs",
            "torch.compile without CUDA graphs (fallback)",
            lambda req: CompileBackend(req.animator, cuda_graphs=False),
            _needs("compile"),
        ),
        BackendSpec(
            "onnxruntime",
            "exported ONNX stages in ONNX Runtime (CPU)",
            _onnxruntime,
            _needs("onnxruntime", _onnxruntime_on_cpu),
            eager_precision=False,
        ),  # fmt: skip
        BackendSpec(
            "aoti",
            "exported AOTInductor packages",
            lambda req: ExportedBackend("aoti", req.animator, _engines_for(req, "aoti"), "aoti"),
            _needs("aoti"),
            eager_precision=False,
        ),
        BackendSpec(
            "tensorrt",
            "TensorRT 10 engines (unverified, opt-in)",
            _tensorrt,
            _needs("tensorrt"),
            eager_precision=False,
            verified=False,
        ),  # fmt: skip
    )
}
# Measured order: on the 2-core CPU the eager fast form renders as fast as ONNX Runtime and encodes faster
# (benchmarks/RESULTS.md); on CUDA compiled graphs are expected ahead (the GPU check measures it).
PREFERENCE = {"cuda": ("compile", "torch"), "cpu": ("torch",)}


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """Every backend with None (available) or the reason it is not."""
    device = torch.device(device)
    return {name: spec.why_not(device) for name, spec in BACKENDS.items()}


def choose_backend(name: str, device: torch.device | str) -> str:
    """Resolve 'auto' to the preferred available backend for the device; check a named one is available."""
    device = torch.device(device)
    status = backend_status(device)
    if name == "auto":
        order = PREFERENCE.get(device.type, ("torch",))
        usable = [b for b in order if status.get(b) is None and BACKENDS[b].verified]
        if not usable:
            reasons = "; ".join(f"{b}: {status[b]}" for b in order)
            raise BackendUnavailable(f"no backend can run on {device}: {reasons}")
        return usable[0]
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
    if status[name] is not None:
        ok = [b for b, why in status.items() if why is None]
        raise BackendUnavailable(
            f"backend {name!r} is not available on {device}: {status[name]}. Available: {', '.join(ok)} (or auto)"
        )
    return name


def make_backend(
    name: str,
    animator: Animator,
    checkpoint=None,
    engines_dir=None,
    log: Callable[[str], None] = lambda s: None,
    precision: Precision | str = "fp32",
):
    """The runner of a named (not 'auto') backend over an animator."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    engines = Path(engines_dir) if engines_dir is not None else None
    return BACKENDS[name].factory(BuildRequest(animator, checkpoint, engines, Precision.parse(precision), log))


def resolve_device(spec: str | torch.device) -> torch.device:
    """'auto' → cuda when available else cpu; an unknown or absent device is a clear error."""
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {spec!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {spec!r} is not supported by leo_rt; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {spec!r} was asked for but this torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def open_runner(
    source,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    precision: Precision | str = "fp32",
    size: int | None = None,
    engines=None,
    log: Callable[[str], None] | None = None,
):
    """(runner, backend name) for a checkpoint path, an Animator, or an engines folder (whose manifest records its
    checkpoint), optionally with an engines folder given beside the checkpoint."""
    from .animator import load_animator

    log = log or (lambda s: None)
    precision = Precision.parse(precision)
    dev = resolve_device(device) if not isinstance(source, Animator) else source.device
    animator, checkpoint, engines_dir = None, source, Path(engines) if engines is not None else None
    if isinstance(source, Animator):
        animator, checkpoint = source, None
    elif isinstance(source, (str, os.PathLike)) and (Path(source) / "manifest.json").is_file():
        engines_dir, checkpoint = Path(source), _engines_checkpoint(Path(source))
    name = choose_backend(backend, dev)
    if backend == "auto":
        log(f"backend: {name} (auto, preferred available on {dev})")
    spec = BACKENDS[name]
    if animator is None:
        if checkpoint is None:
            raise BackendUnavailable(
                f"{engines_dir} holds no readable record of its checkpoint; pass the checkpoint as well "
                "(--checkpoint CKPT --engines DIR)"
            )
        dtype = precision.dtype if spec.eager_precision else torch.float32
        animator = load_animator(checkpoint, size=size, device=dev, dtype=dtype)
    if engines_dir is not None:
        _check_engines(engines_dir, animator, checkpoint)
    return make_backend(name, animator, checkpoint, engines_dir, log, precision), name


def _check_engines(engines_dir: Path, animator: Animator, checkpoint=None) -> None:
    """Refuse an engines folder exported from another checkpoint (hash cached by path, size and mtime)."""
    from .export import check_engines

    check_engines(engines_dir, checkpoint if checkpoint is not None else animator)


def _engines_checkpoint(engines_dir: Path):
    """The checkpoint an engines directory was exported from, when the manifest records a readable path."""
    from .export import read_manifest

    path = read_manifest(engines_dir).get("checkpoint_path")
    return path if path and Path(path).exists() else None
