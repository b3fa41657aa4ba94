"""leo_rt: a deployment runtime for LEO / LIA image animation.

animator = leo_rt.load_animator("vox.pt")            # official checkpoint, size inferred
source = animator.encode_source(leo_rt.io.load_image("face.png", animator.size))
frames = animator.render(source, alpha)              # alpha (N, 20) → (N, 3, S, S) in [-1, 1]
"""

from . import io
from .animator import Animator, load_animator
from .checkpoint import CheckpointError
from .fast import SourceState
from .io import MediaError
from .lmdm import LMDM, LMDMConfig, load_lmdm, save_lmdm
from .model import LIA, LIAConfig
from .motion import MotionSampler, edit, generate, video_codes
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
