"""leo_rt.kernels: the warp + occlusion blend and its building blocks.

`warp.warp_blend` is the PyTorch reference of ARCHITECTURE.md §2 (ToFlow) that the fast renderer calls.
"""

from .warp import warp_blend

__all__ = ["warp_blend"]
