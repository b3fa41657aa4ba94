"""leo_rt: a deployment runtime for LEO / LIA image animation.

animator = leo_rt.load_animator("vox.pt")            # official checkpoint, size inferred
source = animator.encode_source(leo_rt.io.load_image("face.png", animator.size))
frames = animator.render(source, alpha)              # alpha (N, 20) → (N, 3, S, S) in [-1, 1]
"""

import os as _os

# In a checkout, kernels/ and export/ sit beside leo_rt/ and install as leo_rt.kernels and leo_rt.export
# (pyproject's package-dir): let `PYTHONPATH=.` find them there too, so the tree runs without installing.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and all(
    _os.path.isfile(_os.path.join(_root, sub, "__init__.py")) for sub in ("kernels", "export")
):
    __path__.append(_root)  # noqa: F821 - the package's own search path

from . import io
from .animator import Animator, load_animator
from .checkpoint import CheckpointError
from .core import FrameCore
from .errors import LeoError
from .fast import SourceState
from .io import MediaError
from .lmdm import LMDM, LMDMConfig, load_lmdm, save_lmdm
from .model import LIA, LIAConfig
from .motion import MotionSampler
from .pipelines import edit, generate, reenact, video_codes
from .precision import Precision
from .runner import Runner
from .session import Session

__version__ = "0.1.0"
__all__ = [
    "LIA",
    "LMDM",
    "Animator",
    "CheckpointError",
    "LIAConfig",
    "LMDMConfig",
    "MediaError",
    "MotionSampler",
    "FrameCore",
    "LeoError",
    "Precision",
    "Runner",
    "reenact",
    "Session",
    "SourceState",
    "edit",
    "generate",
    "io",
    "load_animator",
    "load_lmdm",
    "save_lmdm",
    "video_codes",
]
