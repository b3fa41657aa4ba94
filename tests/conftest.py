import os

# Triton kernels run on CPU tensors only in the interpreter, and only if this is set before they are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from leo_rt.model import LIA, LIAConfig, perturb_parameters_  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lia"
DESIGN_STATE_DICT = Path(__file__).resolve().parent / "data" / "lia_state_dict.txt"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error over the whole output, in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def make_lia(preset: str, seed: int = 0) -> LIA:
    """A randomised animator: every parameter (biases and modulation offsets too) moved off its init."""
    torch.manual_seed(seed)
    lia = LIA(LIAConfig.from_name(preset)).eval()
    return perturb_parameters_(lia, torch.Generator().manual_seed(seed + 1))


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "vox").is_dir():
        pytest.skip(f"shared LIA assets not found at {SHARED}")
    return SHARED
