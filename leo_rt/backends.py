"""Backends: one small interface, a registry of lazy factories, and `auto`.

A backend turns images into source states and motion codes, and (source state, alpha) into frames:

    encode_source(images (1, 3, S, S)) -> SourceState
    encode_motion(images (B, 3, S, S)) -> alpha (B, D)
    render(state, alpha (N, D)) -> frames (N, 3, S, S)

- torch: the eager fast form.
- compile: torch.compile of the render and encode steps (Triton warp op inside on CUDA, CUDA graphs there via
  mode="reduce-overhead"), batches padded to fixed buckets so shapes stay static.
- onnxruntime: the exported ONNX stages in ONNX Runtime (CPU, or CUDA / TensorRT execution providers).
- aoti: the exported AOTInductor packages.
- tensorrt: TensorRT engines built from the ONNX stages (unverified here: TensorRT is not installable).
Heavy dependencies are imported inside the factories. Exported artifacts are cached per checkpoint under
$LEO_RT_CACHE (default ~/.cache/leo_rt/engines).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .animator import Animator
from .errors import BackendUnavailable
from .fast import SourceState

BUCKETS = (1, 2, 4, 8, 16, 32)


class _Backend:
    """What every backend shares: the animator it was made from (config, size, device, relative_alpha)."""

    animator: Animator

    @property
    def config(self):
        return self.animator.config

    @property
    def size(self) -> int:
        return self.animator.size

    @property
    def device(self) -> torch.device:
        return self.animator.device

    def relative_alpha(self, source: SourceState, alpha_drv: torch.Tensor, alpha_start: torch.Tensor):
        return self.animator.relative_alpha(source, alpha_drv, alpha_start)


class TorchBackend(_Backend):
    name = "torch"

    def __init__(self, animator: Animator):
        self.animator = animator

    def encode_source(self, images: torch.Tensor) -> SourceState:
        return self.animator.encode_source(images)

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        return self.animator.encode_motion(images)

    def render(self, state: SourceState, alpha: torch.Tensor) -> torch.Tensor:
        return self.animator.render(state, alpha)


def _bucket(n: int) -> int:
    return next((b for b in BUCKETS if b >= n), n)


class CompileBackend(TorchBackend):
    """torch.compile of the render step (and the encoder) with batches padded to BUCKETS, so that each bucket
    compiles once; on CUDA mode="reduce-overhead" captures CUDA graphs and replays them."""

    name = "compile"

    def __init__(self, animator: Animator):
        super().__init__(animator)
        mode = "reduce-overhead" if animator.device.type == "cuda" else None
        self._render = torch.compile(animator.renderer, mode=mode, dynamic=False)
        self._encode = torch.compile(animator.encoder, mode=mode, dynamic=False)

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        x = self.animator._images(images, "driving images")
        n = x.shape[0]
        if _bucket(n) != n:
            x = torch.cat([x, x[-1:].expand(_bucket(n) - n, -1, -1, -1)])
        with torch.no_grad():
            w_a, _ = self._encode(x)
            return self.animator.encoder.motion_from_wa(w_a[:n]).clone()

    def render(self, state: SourceState, alpha: torch.Tensor) -> torch.Tensor:
        a = alpha.to(self.animator.device, self.animator.dtype)
        n = a.shape[0]
        if state.batch != 1:
            return self.animator.render(state, alpha)  # paired sources: not the streaming case
        if _bucket(n) != n:
            a = torch.cat([a, a[-1:].expand(_bucket(n) - n, -1)])
        with torch.no_grad():
            return self._render(a, state.styles0, state.feats)[:n].clone()


class ExportedBackend(_Backend):
    """Runs exported stages (ONNX Runtime sessions or AOTInductor packages) from a verified manifest."""

    def __init__(self, name: str, animator: Animator, engines_dir: Path, fmt: str):
        from .export import ExportedStage

        self.name, self.animator = name, animator
        self._dev = animator.device
        self._source = ExportedStage(engines_dir, "source_encoder", fmt, {"size": animator.size})
        self._motion = ExportedStage(engines_dir, "motion_encoder", fmt, {"size": animator.size})
        self._render = ExportedStage(engines_dir, "renderer", fmt, {"size": animator.size})
        self._max = self._render.entry["batch"]["max"]
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        self._dtype = dtypes[self._render.entry["precision"]]

    def _in(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._dev, self._dtype).contiguous()  # the stages take contiguous NCHW tensors

    def encode_source(self, images: torch.Tensor) -> SourceState:
        out = self._source(self._in(self.animator._images(images, "source images")))
        w_a, alpha, styles0, *feats = (t.to(self._dev) for t in out)
        return SourceState(w_a, feats, alpha, styles0)

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        x = self._in(self.animator._images(images, "driving images"))
        return torch.cat([self._motion(x[i : i + self._max])[0] for i in range(0, x.shape[0], self._max)]).to(self._dev)

    def render(self, state: SourceState, alpha: torch.Tensor) -> torch.Tensor:
        a = self._in(alpha)
        feats = [self._in(f) for f in state.feats]
        styles0 = state.styles0.to(self._dev, torch.float32).contiguous()  # styles stay fp32 in every stage
        chunks = [self._render(a[i : i + self._max], styles0, *feats)[0] for i in range(0, a.shape[0], self._max)]
        return torch.cat(chunks).to(self._dev)


def cache_dir() -> Path:
    return Path(os.environ.get("LEO_RT_CACHE", Path.home() / ".cache" / "leo_rt" / "engines"))


def _exported(name: str, fmt: str) -> Callable:
    def factory(animator: Animator, checkpoint, engines_dir: Path | None, log, precision="fp32") -> ExportedBackend:
        from .export import export_checkpoint, state_dict_hash

        if fmt == "onnx" and precision != "fp32":
            raise BackendUnavailable(
                "the onnxruntime backend runs the fp32 ONNX files; use --precision fp32, or the "
                "aoti / compile backends for bf16"
            )
        if engines_dir is None:
            if checkpoint is None:
                raise BackendUnavailable(f"the {name} backend needs a checkpoint file or an engines directory")
            digest = state_dict_hash(animator.state_dict())[:16]
            engines_dir = cache_dir() / f"{digest}-{animator.size}"
            export_checkpoint(
                checkpoint, engines_dir, formats=(fmt,), precision=precision, device=str(animator.device), log=log
            )
        return ExportedBackend(name, animator, Path(engines_dir), fmt)

    return factory


def _why_not(name: str, device: torch.device) -> str | None:
    """None when the backend can run on `device`, else the reason and the fix."""
    has = importlib.util.find_spec
    if name in ("torch",):
        return None
    if name == "compile":
        if device.type == "cpu" and not _have_cxx():
            return "torch.compile on CPU needs a C++ compiler (install g++)"
        return None
    if name == "onnxruntime":
        if has("onnxruntime") is None or has("onnx") is None or has("onnxscript") is None:
            return "needs onnxruntime, onnx and onnxscript (pip install onnxruntime onnx onnxscript)"
        if device.type == "cuda":
            return "this leo_rt runs ONNX Runtime on CPU only; use the compile or tensorrt backend on CUDA"
        return None
    if name == "aoti":
        return None if device.type == "cuda" or _have_cxx() else "AOTInductor on CPU needs a C++ compiler (g++)"
    if name == "tensorrt":
        if has("tensorrt") is None:
            return "needs NVIDIA TensorRT 10 (pip install tensorrt) and a CUDA GPU"
        return None if device.type == "cuda" else "TensorRT needs a CUDA device"
    return f"unknown backend {name!r}"


def _have_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


class TensorRTBackend(_Backend):  # pragma: no cover - needs TensorRT and a GPU; unverified here
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
            self._engines[stage].allocate()

    def _run(self, stage: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {k: v.to("cuda", torch.float32).contiguous() for k, v in feeds.items()}
        return {k: v.clone() for k, v in self._engines[stage].infer(feeds).items()}

    def encode_source(self, images: torch.Tensor) -> SourceState:
        out = self._run("source_encoder", {"image": self.animator._images(images, "source images")})
        feats = [out[f"feat_{r}"] for r in self.animator.config.resolutions]
        return SourceState(out["w_a"], feats, out["alpha_src"], out["styles0"])

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("motion_encoder", {"image": self.animator._images(images, "driving images")})["alpha"]

    def render(self, state: SourceState, alpha: torch.Tensor) -> torch.Tensor:
        feeds = {"alpha": alpha, "styles0": state.styles0.float()}
        feeds.update({f"feat_{r}": f for r, f in zip(self.animator.config.resolutions, state.feats, strict=True)})
        return self._run("renderer", feeds)["frames"]


def _tensorrt(animator: Animator, checkpoint, engines_dir, log, precision="fp32"):  # pragma: no cover
    from .export import export_checkpoint, state_dict_hash

    if engines_dir is None:
        digest = state_dict_hash(animator.state_dict())[:16]
        engines_dir = cache_dir() / f"{digest}-{animator.size}"
        export_checkpoint(checkpoint, engines_dir, formats=("trt",), precision=precision, log=log)
    return TensorRTBackend(animator, Path(engines_dir))


BACKENDS: dict[str, Callable] = {
    "torch": lambda animator, checkpoint, engines_dir, log, precision="fp32": TorchBackend(animator),
    "compile": lambda animator, checkpoint, engines_dir, log, precision="fp32": CompileBackend(animator),
    "onnxruntime": _exported("onnxruntime", "onnx"),
    "aoti": _exported("aoti", "aoti"),
    "tensorrt": _tensorrt,
}
# Measured order: on the 2-core CPU the eager fast form renders as fast as ONNX Runtime and encodes faster
# (benchmarks/RESULTS.md, bench_runtime); on CUDA engines and compiled graphs are expected ahead (unmeasured).
PREFERENCE = {"cuda": ("tensorrt", "compile", "torch"), "cpu": ("torch",)}


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """Every backend with None (available) or the reason it is not."""
    device = torch.device(device)
    return {name: _why_not(name, device) for name in BACKENDS}


def choose_backend(name: str, device: torch.device | str) -> str:
    """Resolve 'auto' to the fastest available backend for the device; check a named one is available."""
    device = torch.device(device)
    status = backend_status(device)
    if name == "auto":
        return next(b for b in PREFERENCE.get(device.type, ("torch",)) if status.get(b) is None)
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or auto")
    if status[name] is not None:
        ok = sorted(b for b, why in status.items() if why is None)
        raise BackendUnavailable(
            f"backend {name!r} is not available on {device}: {status[name]}. Available: {', '.join(ok)} (or auto)"
        )
    return name


def make_backend(
    name: str, animator: Animator, checkpoint=None, engines_dir=None, log=lambda s: None, precision: str = "fp32"
):
    return BACKENDS[name](animator, checkpoint, engines_dir, log, precision=precision)
