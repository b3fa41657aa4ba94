"""leo_rt.kernels: the warp + occlusion blend as a fused Triton kernel, with its PyTorch reference.

`warp_blend` is what the fast renderer calls: the `leo_rt::warp_blend` op (fused Triton kernel) on CUDA, the
PyTorch reference on CPU. Modules: `warp` (reference, op, dispatcher), `warp_triton` (the fused kernel),
`sample_triton` (a standalone Triton grid_sample and the sampling helpers), `compile_report` (compiles every
kernel configuration for a GPU target and reads registers and spills, without a GPU). No module shares a name
with a function. Importing this package imports triton only where the op is a triton_op (see `warp`).
"""

from .warp import (
    base_grid,
    check_warp_inputs,
    kernels_enabled,
    onnx_custom_op,
    set_kernels_enabled,
    triton_available,
    warp_blend,
    warp_blend_op,
    warp_blend_reference,
)

__all__ = [
    "base_grid",
    "check_warp_inputs",
    "kernels_enabled",
    "onnx_custom_op",
    "set_kernels_enabled",
    "triton_available",
    "warp_blend",
    "warp_blend_op",
    "warp_blend_reference",
]
