"""Export stages to ONNX, AOTInductor and TensorRT, cached and idempotent, with a manifest."""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import InputError
from .manifest import ManifestError, read_manifest, sha256_file, verify_artifact, versions, write_manifest
from .stages import StageSpec

FORMATS = ("onnx", "aoti", "trt")
OPSET = 18
SUFFIX = {"onnx": ".onnx", "aoti": ".pt2"}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _io_record(spec: StageSpec, module: torch.nn.Module) -> dict:
    sample = spec.sample(spec.opt_batch)
    with torch.no_grad():
        outs = module(*sample)
    outs = outs if isinstance(outs, (list, tuple)) else (outs,)

    def shape(t, batch_axis):
        return ["batch", *t.shape[1:]] if batch_axis else list(t.shape)

    # outputs follow the batch of the batch inputs (the renderer's frames follow alpha)
    return {
        "inputs": {
            n: {"shape": shape(t, n in spec.batch_inputs), "dtype": _dtype_name(t)}
            for n, t in zip(spec.input_names, sample, strict=True)
        },
        "outputs": {
            n: {"shape": shape(t, t.shape[0] == spec.opt_batch), "dtype": _dtype_name(t)}
            for n, t in zip(spec.output_names, outs, strict=True)
        },
        "batch": {"min": spec.min_batch, "opt": spec.opt_batch, "max": spec.max_batch},
    }


@contextmanager
def decomposed_warp():
    """While active, the renderer's warp traces as standard ops (the PyTorch reference), never as the
    `leo_rt::warp_blend` op: ONNX has no translation for that op, and `torch.export` captures it (on CUDA, with
    the kernels on) before the ONNX conversion starts, where `torch.onnx.is_in_onnx_export()` is not yet true.
    An active `onnx_custom_op()` still writes its one custom node."""
    from ..kernels import kernels_enabled, set_kernels_enabled

    was = kernels_enabled()
    set_kernels_enabled(False)
    try:
        yield
    finally:
        set_kernels_enabled(was)


def export_onnx(module: torch.nn.Module, spec: StageSpec, path: Path) -> None:
    """One self-contained ONNX file (opset 18, no external data), batch the only dynamic axis. The warp is
    always decomposed into standard ops here (or one custom node under `onnx_custom_op()`), on every device."""
    from ..files import atomic_path

    sample = spec.sample(min(2, spec.max_batch))
    with decomposed_warp(), atomic_path(path) as tmp, warnings.catch_warnings():
        ep = torch.export.export(module, sample, dynamic_shapes=spec.dynamic_shapes())
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ep,
            sample,
            tmp,
            dynamo=True,
            opset_version=OPSET,
            external_data=False,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            verbose=False,
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def export_aoti(module: torch.nn.Module, spec: StageSpec, path: Path) -> None:
    """An AOTInductor package (.pt2) compiled for this machine's device (CPU ISA or CUDA)."""
    from ..files import atomic_path

    sample = spec.sample(min(2, spec.max_batch))
    ep = torch.export.export(module, sample, dynamic_shapes=spec.dynamic_shapes())
    with atomic_path(path) as tmp:
        torch._inductor.aoti_compile_and_package(ep, package_path=tmp)


def check_formats(formats: tuple[str, ...], onnx_warp_node: bool = False) -> None:
    """Refuse unknown formats, and TensorRT with the warp as one custom ONNX node (no plugin implements it)."""
    bad = set(formats) - set(FORMATS)
    if bad:
        raise InputError(f"unknown export formats {sorted(bad)}; choose from {FORMATS}")
    if "trt" in formats and onnx_warp_node:
        raise InputError(
            "--onnx-warp-node writes the warp as one leo_rt::WarpBlend node, which TensorRT cannot build (leo_rt has "
            "no TensorRT plugin for it); export TensorRT engines without --onnx-warp-node"
        )


def export_stages(
    stages: dict[str, tuple[torch.nn.Module, StageSpec]],
    out_dir: str | os.PathLike,
    *,
    formats: tuple[str, ...] = ("onnx",),
    precision: str = "fp32",
    trt_precision: str | None = None,
    checkpoint_sha256: str,
    extra: dict | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Export every stage to every format into out_dir, skipping artifacts whose file still matches the manifest
    and whose recorded checkpoint, precision, batch profile and versions are those asked for. Returns the
    manifest."""
    check_formats(formats, onnx_warp_node=(extra or {}).get("warp") == "onnx-node")
    if "trt" in formats and "onnx" not in formats:
        formats = ("onnx", *formats)  # engines are built from the ONNX files
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir)
    vers = versions()
    for name, (module, spec) in stages.items():
        io = _io_record(spec, module)
        for fmt in formats:
            if fmt == "trt":
                continue  # built from the ONNX files below
            key = f"{name}/{fmt}"
            want = {
                "checkpoint_sha256": checkpoint_sha256,
                "precision": precision,
                "batch": io["batch"],
                "torch": vers["torch"],
                "format": fmt,
                **(extra or {}),
            }
            if not force:
                try:
                    verify_artifact(out_dir, key, want)
                    log(f"skip   {key} (up to date)")
                    continue
                except ManifestError:
                    pass
            path = out_dir / f"{name}{SUFFIX[fmt]}"
            log(f"export {key} → {path.name}")
            (export_onnx if fmt == "onnx" else export_aoti)(module, spec, path)
            manifest["artifacts"][key] = {
                "stage": name,
                "file": path.name,
                "sha256": sha256_file(path),
                "opset": OPSET if fmt == "onnx" else None,
                **want,
                **io,
            }
            write_manifest(out_dir, manifest)  # after every artifact, so an interrupted export keeps what it made
    if "trt" in formats:
        from ..precision import Precision
        from .tensorrt import Profile, build_engine

        for name, (_, spec) in stages.items():
            onnx_entry = verify_artifact(out_dir, f"{name}/onnx")
            engine = build_engine(
                out_dir / onnx_entry["file"],
                out_dir,
                precision=Precision.parse(trt_precision or precision),
                profile=Profile(spec.min_batch, spec.opt_batch, spec.max_batch),
                batch_inputs=spec.batch_inputs,
                force=force,
            )
            manifest["artifacts"][f"{name}/trt"] = {
                **onnx_entry,
                "format": "trt",
                "file": engine.name,
                "sha256": sha256_file(engine),
                "precision": trt_precision or precision,
            }
            write_manifest(out_dir, manifest)
            log(f"engine {name}/trt → {engine.name}")
    manifest.update(
        {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": vers,
            "checkpoint_sha256": checkpoint_sha256,
        }
    )
    write_manifest(out_dir, manifest)
    return manifest


class ExportedStage:
    """A verified exported stage, run from Python: `outputs = stage(*inputs)` (a tuple of tensors)."""

    def __init__(self, out_dir: str | os.PathLike, name: str, fmt: str = "onnx", expect: dict | None = None):
        self.entry = verify_artifact(out_dir, f"{name}/{fmt}", expect)
        self.name, self.fmt = name, fmt
        path = str(Path(out_dir) / self.entry["file"])
        if fmt == "onnx":
            import onnxruntime as ort

            self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self._inputs = [i.name for i in self._session.get_inputs()]
            if sorted(self._inputs) != sorted(self.entry["inputs"]):  # the manifest keeps its keys sorted
                recorded = sorted(self.entry["inputs"])
                raise ManifestError(
                    f"{path} takes inputs {self._inputs} but its manifest entry records {recorded}: the file and "
                    "the manifest disagree; re-export with --force"
                )
        elif fmt == "aoti":
            self._runner = torch._inductor.aoti_load_package(path)
        else:
            raise InputError(f"ExportedStage runs onnx or aoti artifacts; use export.tensorrt.TRTEngine for {fmt}")

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        names = list(self.entry["inputs"])
        if len(inputs) != len(names):
            raise InputError(f"{self.name} takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
        batch = inputs[0].shape[0]
        lo, hi = self.entry["batch"]["min"], self.entry["batch"]["max"]
        if not lo <= batch <= hi:  # checked here: the packages' own input checks are not to be relied on
            raise InputError(
                f"{self.name} was exported for batch {lo}…{hi}, got {batch}; re-export with --max-batch {batch}"
            )
        if self.fmt == "onnx":
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(self._inputs, inputs, strict=True)}
            return tuple(torch.from_numpy(o) for o in self._session.run(None, feeds))
        out = self._runner(*inputs)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)
