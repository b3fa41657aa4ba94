"""The test set-up itself (tests/conftest.py): Triton's interpreter only where there is no CUDA device, and the
test-only helpers kept out of the library."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
import leo_rt.model

TESTS = Path(__file__).resolve().parent


def test_triton_interprets_exactly_when_there_is_no_cuda_device():
    if not conftest.TRITON_INTERPRET_GIVEN:
        assert conftest.TRITON_INTERPRETED == (not conftest.CUDA)
        assert (os.environ.get("TRITON_INTERPRET") == "1") == (not conftest.CUDA)
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from leo_rt.kernels import warp_triton

    # leo_rt's kernels and Triton's own library functions were decorated under the same setting
    for fn in (warp_triton._warp_blend_kernel, triton.language.standard.sum):
        assert isinstance(fn, InterpretedFunction) == conftest.TRITON_INTERPRETED, fn


@pytest.mark.parametrize("cuda", [False, True])
def test_conftest_decides_before_triton_is_imported(cuda):
    """The decision for a machine with and without CUDA (CUDA presence simulated), in a fresh interpreter."""
    code = (
        "import torch\n"
        f"torch.cuda.is_available = lambda: {cuda}\n"
        "import conftest, os\n"
        "print(os.environ.get('TRITON_INTERPRET'), conftest.KERNEL_DEVICE)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == (["None", "cuda"] if cuda else ["1", "cpu"])


def test_test_helpers_are_not_in_the_library():
    assert not hasattr(leo_rt.model, "perturb_parameters_")
    assert callable(conftest.perturb_parameters_)
