"""Shared test set-up and helpers.

Triton kernels: on a machine without a CUDA device they can only run in Triton's interpreter (on CPU tensors), so
TRITON_INTERPRET=1 is set here; on a machine with one it is left unset and the tests run the compiled kernels.
Triton reads TRITON_INTERPRET when a function is decorated: ``@triton.jit`` makes a JITFunction or an
InterpretedFunction at that moment. That happens to leo_rt's kernels when their modules are imported, and to
Triton's own library functions (``tl.sum``, ``tl.cdiv`` …) when triton itself is first imported, so the variable
must be set before triton is imported at all. Asking torch whether CUDA is present is safe: importing torch and
``torch.cuda.is_available()`` import neither triton nor leo_rt (checked below). A TRITON_INTERPRET already in the
environment is left as it is. (The triton 3.6 interpreter breaks with numpy >= 2.3; CPU CI uses triton 3.7.1.)
"""

import os
import sys

import torch

CUDA = torch.cuda.is_available()
TRITON_INTERPRET_GIVEN = "TRITON_INTERPRET" in os.environ  # set by the caller: left as it is
if not TRITON_INTERPRET_GIVEN and not CUDA:
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")  # as triton reads it
KERNEL_DEVICE = "cuda" if CUDA and not TRITON_INTERPRETED else "cpu"  # where Triton kernels run in these tests

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from torch import nn  # noqa: E402

from leo_rt.model import LIA, LIAConfig  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lia"
DESIGN_STATE_DICT = Path(__file__).resolve().parent / "data" / "lia_state_dict.txt"

FP32_FLOOR = 1e-5  # relative error an fp32 result may always have against its float64 reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error over the whole output, in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def fp32_bound(published: torch.Tensor, reference: torch.Tensor) -> float:
    """The relative error an fp32 result may have against the float64 `reference` of the same network: twice the
    published code's own fp32 error against that reference (measured now, on this CPU), or FP32_FLOOR, whichever
    is larger (CLARIFICATIONS §2). So the bound follows the machine's arithmetic (AVX2 and AVX-512 alike)."""
    assert reference.dtype == torch.float64, "the reference must be computed in float64"
    assert published.dtype == torch.float32, "the published result is the fp32 one"
    return max(2.0 * rel_err(published, reference), FP32_FLOOR)


def assert_fp32_close(got: torch.Tensor, published: torch.Tensor, reference: torch.Tensor, what: str = "") -> None:
    """`got` (fp32) is within fp32_bound of the float64 `reference`; `published` is the published code's fp32
    result of the same call."""
    assert got.shape == reference.shape == published.shape, (what, got.shape, published.shape, reference.shape)
    err, bound = rel_err(got, reference), fp32_bound(published, reference)
    assert err <= bound, f"{what}: relative error {err:.3g} against float64 exceeds the bound {bound:.3g}"


def perturb_parameters_(model: nn.Module, generator: torch.Generator | None = None, std: float = 0.2) -> nn.Module:
    """Randomise every parameter away from its initial value (biases and modulation offsets included), so a
    comparison exercises every parameter. Blur kernels (buffers) are left as they are."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * std
            if name.endswith("modulation.bias"):
                p.copy_(1.0 + noise)  # modulation offsets stay around their trained value of ~1
            elif name.endswith("bias") or name.endswith("noise.weight"):
                p.copy_(noise)
            else:
                p.copy_(torch.randn(p.shape, generator=generator))
    return model


def make_lia(preset: str, seed: int = 0) -> LIA:
    """A randomised animator: every parameter (biases and modulation offsets too) moved off its init."""
    torch.manual_seed(seed)
    lia = LIA(LIAConfig.from_name(preset)).eval()
    return perturb_parameters_(lia, torch.Generator().manual_seed(seed + 1))


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def one_thread():
    """Run the test with one torch thread: for tiny models a second thread only adds a barrier per op, and on a
    busy machine each barrier waits for a core (an LMDM sampling test measured 6.8 s with two threads under load,
    0.14 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "vox").is_dir():
        pytest.skip(f"shared LIA assets not found at {SHARED}")
    return SHARED


# ---------------------------------------------------------------------------------------------- a trained LMDM

LMDM_TRAIN_STEPS = 150


def rotation_codes(n_videos: int = 40, length: int = 80, d: int = 4, seed: int = 0):
    """Motion codes with a known structure: channel pair k moves on a circle, (a·sin(ω_k t + φ), a·cos(ω_k t + φ)),
    with a fixed angular speed ω_k per pair and a random radius a and phase φ per video. The first code of a window
    fixes a and φ, so the rest of the window follows from it: a small model learns this in a few hundred steps."""
    from leo_rt.train import MotionCodes

    rng = np.random.default_rng(seed)
    omega = np.linspace(0.1, 0.3, d // 2)
    t = np.arange(length)[:, None]
    videos = []
    for _ in range(n_videos):
        radius, phase = rng.uniform(0.5, 2.0, d // 2), rng.uniform(0, 2 * np.pi, d // 2)
        v = np.empty((length, d))
        v[:, 0::2] = radius * np.sin(omega * t + phase)
        v[:, 1::2] = radius * np.cos(omega * t + phase)
        videos.append(v)
    names = [f"v{i}" for i in range(n_videos)]
    return MotionCodes(
        np.concatenate(videos).astype(np.float32), np.full(n_videos, length), np.full(n_videos, 10.0), names
    )


@pytest.fixture(scope="session")
def trained_lmdm(tmp_path_factory):
    """(codes, EMA model, checkpoint directory, per-step losses) of the lmdm-tiny architecture (4-d codes) trained
    once per test session with the real trainer (AdamW, EMA, periodic checkpoints), on one thread (see one_thread).
    Tests must not change the directory (copy it first)."""
    from leo_rt.lmdm import LMDMConfig
    from leo_rt.train import TrainConfig, train_lmdm

    data = rotation_codes()
    cfg = dataclasses.replace(LMDMConfig.from_name("lmdm-tiny"), motion_dim=4)
    out = tmp_path_factory.mktemp("trained_lmdm")
    losses: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_lmdm(
            data,
            out,
            preset=cfg,
            cfg=TrainConfig(steps=LMDM_TRAIN_STEPS, batch=32, lr=5e-3, save_every=LMDM_TRAIN_STEPS // 2),
            on_step=lambda step, loss: losses.append(loss),
        )
    finally:
        torch.set_num_threads(threads)
    return data, model, out, losses


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(folder, export log): a lia-32-tiny checkpoint (anim.pt), an lmdm-tiny (lmdm/) and every stage exported to
    ONNX and AOTInductor (out/, max batch 6), once per test session (AOTInductor compiles are the suite's slowest
    step). Tests must not change the folder (copy it first)."""
    from leo_rt.export import export_checkpoint
    from leo_rt.lmdm import LMDM, LMDMConfig, save_lmdm

    d = tmp_path_factory.mktemp("export")
    torch.save({"gen": make_lia("lia-32-tiny", seed=4).state_dict()}, d / "anim.pt")
    lmdm = LMDM(LMDMConfig.from_name("lmdm-tiny"))
    with torch.no_grad():  # move every weight off its init (the output conv starts at zero)
        for p in lmdm.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    save_lmdm(lmdm, d / "lmdm")
    log = []
    export_checkpoint(
        d / "anim.pt", d / "out", lmdm_dir=d / "lmdm", formats=("onnx", "aoti"), max_batch=6, log=log.append
    )
    return d, log
