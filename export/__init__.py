"""leo_rt.export: the animator and LMDM stages as ONNX files, AOTInductor packages and TensorRT engines, with a
manifest that records and verifies what each file is.

    manifest = leo_rt.export.export_checkpoint("vox.pt", "engines/", formats=("onnx", "aoti"))
    renderer = leo_rt.export.ExportedStage("engines/", "renderer", "onnx")
"""

from __future__ import annotations

import os

from ..errors import InputError
from .exporter import FORMATS, OPSET, ExportedStage, export_stages
from .manifest import ManifestError, read_manifest, state_dict_hash, verify_artifact
from .stages import StageSpec, animator_stages, lmdm_stage

PRECISIONS = ("fp32", "fp16", "bf16")


def export_checkpoint(
    checkpoint,
    out_dir: str | os.PathLike,
    *,
    lmdm_dir: str | os.PathLike | None = None,
    formats: tuple[str, ...] = ("onnx",),
    precision: str = "fp32",
    max_batch: int = 32,
    device: str = "cpu",
    decomposed_warp: bool = False,
    onnx_warp_node: bool = False,
    force: bool = False,
    log=lambda s: None,
) -> dict:
    """Export every stage of an animator checkpoint (and of an LMDM, when given). ONNX files are always fp32
    (TensorRT applies fp16/bf16 when it builds from them); AOTInductor packages use `precision`. On CUDA the
    renderer's packages hold the Triton warp op, which only a Python process can run; `decomposed_warp=True`
    exports standard aten ops instead, for the C++ runner (on CPU the warp is always decomposed).
    `onnx_warp_node=True` writes the renderer's warp as one `leo_rt::WarpBlend` node in the ONNX files (for a
    runtime that implements it, e.g. a TensorRT plugin) instead of standard GridSample and element-wise ops."""
    import torch

    from ..animator import load_animator
    from ..kernels import kernels_enabled, onnx_custom_op, set_kernels_enabled, triton_available
    from ..lmdm import load_lmdm

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if max_batch < 1:
        raise InputError(f"max_batch must be at least 1, got {max_batch}")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    groups = [(tuple(f for f in formats if f != "aoti"), "fp32"), (tuple(f for f in formats if f == "aoti"), precision)]
    was_enabled = kernels_enabled()
    if decomposed_warp:
        set_kernels_enabled(False)
    manifest = None
    try:
        for fmts, stage_precision in groups:
            if not fmts:
                continue
            anim = load_animator(checkpoint, device=device, dtype=dtypes[stage_precision])
            stages = animator_stages(anim, max_batch)
            digest = state_dict_hash(anim.state_dict())
            if lmdm_dir is not None:
                lmdm = load_lmdm(lmdm_dir, device=device)
                stages["lmdm_denoiser"] = lmdm_stage(lmdm, max_batch)
                digest = f"{digest}+{state_dict_hash(lmdm.state_dict())}"
            fused = anim.device.type == "cuda" and kernels_enabled() and triton_available()
            warp = "onnx-node" if onnx_warp_node and "onnx" in fmts else "triton-op" if fused else "decomposed"
            with onnx_custom_op(onnx_warp_node and "onnx" in fmts):
                manifest = export_stages(
                    stages,
                    out_dir,
                    formats=fmts,
                    precision=stage_precision,
                    trt_precision=precision,
                    checkpoint_sha256=digest,
                    extra={"size": anim.size, "warp": warp},
                    force=force,
                    log=log,
                )
    finally:
        set_kernels_enabled(was_enabled)
    if isinstance(checkpoint, (str, os.PathLike)):  # lets a session started from the engines find the model
        from .manifest import write_manifest

        manifest["checkpoint_path"] = str(os.path.abspath(checkpoint))
        write_manifest(out_dir, manifest)
    return manifest


__all__ = [
    "FORMATS",
    "OPSET",
    "PRECISIONS",
    "ExportedStage",
    "ManifestError",
    "StageSpec",
    "animator_stages",
    "export_checkpoint",
    "export_stages",
    "lmdm_stage",
    "read_manifest",
    "state_dict_hash",
    "verify_artifact",
]
