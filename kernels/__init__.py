"""leo_rt.kernels: the warp + occlusion blend and grid_sample, as Triton kernels with PyTorch references.

`warp_blend` is what the fast renderer calls: the `leo_rt::warp_blend` custom op (fused Triton kernel) on CUDA,
the PyTorch reference on CPU. Importing this package does not import triton.
"""

from .warp import (
    base_grid,
    check_warp_inputs,
    grid_sample,
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
    "grid_sample",
    "kernels_enabled",
    "onnx_custom_op",
    "set_kernels_enabled",
    "triton_available",
    "warp_blend",
    "warp_blend_op",
    "warp_blend_reference",
]
