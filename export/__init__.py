"""leo_rt.export: the animator and LMDM stages as ONNX files, AOTInductor packages and TensorRT engines, with a
manifest that records and verifies what each file is.

    manifest = leo_rt.export.export_checkpoint("vox.pt", "engines/", formats=("onnx", "aoti"))
    leo_rt.export.check_engines("engines/", "vox.pt")      # refuses engines made from another checkpoint
    renderer = leo_rt.export.ExportedStage("engines/", "renderer", "onnx")

An export holds a file lock on its folder (several processes may share one, e.g. the backend cache under
$LEO_RT_CACHE): a second export into the same folder waits for the first and then finds its artifacts up to date.
"""

from __future__ import annotations

import os

from ..errors import InputError
from .exporter import FORMATS, OPSET, ExportedStage, check_formats, export_stages
from .manifest import (
    ManifestError,
    artifact_lock,
    check_engines,
    checkpoint_hash,
    export_lock,
    is_engines_dir,
    read_manifest,
    state_dict_hash,
    update_manifest,
    verify_artifact,
)
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
    renderer's packages hold the fused Triton warp kernel, compiled into the package (a triton_op, so the C++ runner
    needs no Python); `decomposed_warp=True` exports standard aten ops instead (on CPU the warp is always
    decomposed).
    `onnx_warp_node=True` writes the renderer's warp as one `leo_rt::WarpBlend` node in the ONNX files (for a
    runtime that implements it, e.g. a TensorRT plugin) instead of standard GridSample and element-wise ops."""
    import torch

    from ..animator import load_animator
    from ..kernels import kernels_enabled, onnx_custom_op, set_kernels_enabled, triton_available
    from ..lmdm import load_lmdm
    from .manifest import _canonical_hash

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if max_batch < 1:
        raise InputError(f"max_batch must be at least 1, got {max_batch}")
    check_formats(tuple(formats), onnx_warp_node)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    groups = [(tuple(f for f in formats if f != "aoti"), "fp32"), (tuple(f for f in formats if f == "aoti"), precision)]

    was_enabled = kernels_enabled()
    if decomposed_warp:
        set_kernels_enabled(False)
    manifest = None
    try:
        with export_lock(out_dir, log=log):
            # one identity for the checkpoint, whatever dtype each group loads it in (check_engines compares it)
            digest = checkpoint_hash(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
            lmdm_digest = None
            for fmts, stage_precision in groups:
                if not fmts:
                    continue
                anim = load_animator(checkpoint, device=device, dtype=dtypes[stage_precision])
                stages = animator_stages(anim, max_batch)
                if digest is None:
                    digest = _canonical_hash(anim.reference.state_dict())
                full = digest
                if lmdm_dir is not None:
                    lmdm = load_lmdm(lmdm_dir, device=device)
                    stages["lmdm_denoiser"] = lmdm_stage(lmdm, max_batch)
                    lmdm_digest = lmdm_digest or state_dict_hash(lmdm.state_dict())
                    full = f"{digest}+{lmdm_digest}"
                if "aoti" in fmts:  # the packages hold the Triton op on CUDA (unless told to decompose)
                    fused = anim.device.type == "cuda" and kernels_enabled() and triton_available()
                    warp = "triton-op" if fused else "decomposed"
                else:  # ONNX (and the TensorRT engines built from it): decomposed always, or one custom node
                    warp = "onnx-node" if onnx_warp_node else "decomposed"
                with onnx_custom_op(warp == "onnx-node"):
                    manifest = export_stages(
                        stages,
                        out_dir,
                        formats=fmts,
                        precision=stage_precision,
                        trt_precision=precision,
                        checkpoint_sha256=full,
                        extra={"size": anim.size, "warp": warp},
                        force=force,
                        log=log,
                    )
            if isinstance(checkpoint, (str, os.PathLike)) and manifest is not None:
                # lets a session started from the engines find the model (check_engines still compares hashes)
                path = str(os.path.abspath(checkpoint))
                manifest = update_manifest(out_dir, lambda m: m.__setitem__("checkpoint_path", path))
    finally:
        set_kernels_enabled(was_enabled)
    return manifest


__all__ = [
    "FORMATS",
    "artifact_lock",
    "check_engines",
    "checkpoint_hash",
    "export_lock",
    "is_engines_dir",
    "update_manifest",
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
