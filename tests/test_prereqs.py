"""Prerequisite checks (leo_rt.prereqs): real look-ups in a changed environment (PATH, CC/CXX, CUDA_HOME,
sysconfig's include folder, LIBRARY_PATH), never a faked answer."""

import shutil
import sys
import sysconfig

import pytest

from leo_rt import prereqs
from leo_rt.errors import InputError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the checks describe Linux toolchains")


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    """No compilers: an empty PATH folder and no CC/CXX/CUDA variables."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for var in ("CC", "CXX", "CUDA_HOME", "CUDA_PATH", "LIBRARY_PATH", "TRITON_LIBCUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_unknown_feature_is_refused():
    with pytest.raises(InputError, match="unknown feature 'jit'"):
        prereqs.check("jit", "cpu")


def test_no_compiler_is_reported_with_the_fix(bare_env):
    assert prereqs.cxx_compiler() is None and prereqs.c_compiler() is None
    (problem,) = prereqs.check("compile", "cpu")
    assert "C++" in problem and "g++" in problem and "CXX" in problem
    (problem,) = prereqs.check("aoti", "cpu")
    assert "g++" in problem
    assert prereqs.check("torch", "cpu") == []  # the eager renderer compiles nothing


def test_a_compiler_that_does_not_run_is_reported(bare_env, monkeypatch):
    fake = bare_env / "broken-g++"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    (problem,) = prereqs.check("compile", "cpu")
    assert str(fake) in problem and "does not run" in problem


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")
def test_compiler_found_on_path_but_python_headers_missing(monkeypatch, tmp_path):
    real = sysconfig.get_paths

    def without_headers(*args, **kwargs):  # Python.h looked up in an empty folder
        return {**real(*args, **kwargs), "include": str(tmp_path)}

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(sysconfig, "get_paths", without_headers)
    (problem,) = prereqs.check("compile", "cpu")
    assert "Python.h" in problem and str(tmp_path) in problem and "-dev" in problem
    assert prereqs.check("aoti", "cpu") == []  # AOTInductor's library does not include Python.h


@pytest.mark.skipif(
    shutil.which("g++") is None or not (prereqs.python_include() / "Python.h").is_file(),
    reason="this machine lacks g++ or Python.h",
)
def test_this_machine_can_compile_on_cpu(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    assert prereqs.check("compile", "cpu") == []
    assert prereqs.check("aoti", "cpu") == []
    assert prereqs.check("triton", "cpu") == [] or "Triton is not installed" in prereqs.check("triton", "cpu")[0]


def _toolkit(root, headers=True):
    (root / "include").mkdir(parents=True)
    (root / "bin").mkdir()
    if headers:
        for h in prereqs.CUDA_HEADERS:
            (root / "include" / h).write_text("/* header */\n")
    return root


def test_cuda_toolkit_is_found_the_way_torch_finds_it(bare_env, monkeypatch):
    kit = _toolkit(bare_env / "cuda")
    nvcc = kit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{kit / 'bin'}:{bare_env / 'empty_bin'}")
    assert prereqs.cuda_home() == str(kit)  # the folder above nvcc on PATH
    assert prereqs.nvcc() == str(nvcc)
    monkeypatch.setenv("CUDA_PATH", str(bare_env / "elsewhere"))
    assert prereqs.cuda_home() == str(bare_env / "elsewhere")  # CUDA_PATH before nvcc
    monkeypatch.setenv("CUDA_HOME", str(kit))
    assert prereqs.cuda_home() == str(kit)  # CUDA_HOME first


def test_cuda_aoti_names_the_missing_toolkit_and_the_pip_one(bare_env, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(_toolkit(bare_env / "cuda", headers=False)))
    problems = prereqs.check("aoti", "cuda")
    toolkit = [p for p in problems if "toolkit's headers" in p]
    assert len(toolkit) == 1 and "cuda.h" in toolkit[0] and "CUDA_HOME=" in toolkit[0]
    # a toolkit from the pip `cuda-toolkit` packages, as their wheels lay it out: site-packages/nvidia/cu13
    site = bare_env / "site"
    _toolkit(site / "nvidia" / "cu13")
    monkeypatch.syspath_prepend(str(site))
    assert prereqs.pip_cuda_homes() == [site / "nvidia" / "cu13"]
    toolkit = [p for p in prereqs.check("aoti", "cuda") if "toolkit's headers" in p]
    assert f"export CUDA_HOME={site / 'nvidia' / 'cu13'}" in toolkit[0]
    monkeypatch.setenv("CUDA_HOME", str(site / "nvidia" / "cu13"))  # the fix the message gives
    assert not [p for p in prereqs.check("aoti", "cuda") if "toolkit's headers" in p]


def test_libcuda_link_name_is_looked_for_where_the_linker_looks(bare_env, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(_toolkit(bare_env / "cuda")))
    assert prereqs.libcuda_link_dirs() == []
    assert any("libcuda.so" in p for p in prereqs.check("aoti", "cuda"))
    lib = bare_env / "driver"
    lib.mkdir()
    (lib / "libcuda.so").write_bytes(b"")
    monkeypatch.setenv("LIBRARY_PATH", str(lib))
    assert prereqs.libcuda_link_dirs() == [str(lib)]
    assert not any("link name" in p for p in prereqs.check("aoti", "cuda"))
    stubs = bare_env / "cuda" / "lib64" / "stubs"
    stubs.mkdir(parents=True)
    (stubs / "libcuda.so").write_bytes(b"")
    monkeypatch.delenv("LIBRARY_PATH")
    assert prereqs.libcuda_link_dirs() == [str(stubs)]  # the toolkit's stubs, which torch adds to the link


def test_triton_launcher_needs_libcuda_so_1(bare_env, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    have = prereqs.libcuda_runtime_dirs()
    lib = bare_env / "drv"
    lib.mkdir()
    (lib / "libcuda.so.1").write_bytes(b"")
    monkeypatch.setenv("TRITON_LIBCUDA_PATH", str(lib))
    assert prereqs.libcuda_runtime_dirs() == [str(lib)]
    assert not any("libcuda.so.1" in p for p in prereqs.check("triton", "cuda"))
    monkeypatch.delenv("TRITON_LIBCUDA_PATH")
    if not have:  # a machine without the NVIDIA driver: the problem is named
        assert any("libcuda.so.1" in p for p in prereqs.check("triton", "cuda"))


def test_kernels_off_drop_the_eager_renderers_triton_needs(bare_env, monkeypatch):
    pytest.importorskip("triton")
    on = prereqs.check("torch", "cuda")
    assert any("C compiler" in p and "LEO_RT_KERNELS=0" in p for p in on)
    from leo_rt.kernels import warp

    monkeypatch.setitem(warp._STATE, "enabled", False)  # what LEO_RT_KERNELS=0 sets at import
    assert not any("C compiler" in p for p in prereqs.check("torch", "cuda"))


def test_describe_lists_what_was_found():
    info = prereqs.describe()
    for key in ("c_compiler", "cxx_compiler", "python_h", "cuda_home", "pip_cuda_homes", "nvcc", "libcuda_so_1_dirs"):
        assert key in info
    assert info["python_include"] == str(prereqs.python_include())


# ------------------------------------------------------------------------ the backend registry and `leo-rt doctor`


def test_registry_reports_a_missing_compiler_instead_of_failing_later(bare_env):
    from leo_rt.backends import BackendUnavailable, backend_status, choose_backend

    status = backend_status("cpu")
    assert status["torch"] is None  # the eager renderer compiles nothing
    for name in ("compile", "compile-no-graphs", "aoti"):
        assert "g++" in status[name] and "CXX" in status[name], (name, status[name])
    fix = r"'compile' is not available on cpu: .*install g\+\+.*Available: torch"
    with pytest.raises(BackendUnavailable, match=fix):
        choose_backend("compile", "cpu")
    assert choose_backend("auto", "cpu") == "torch"


def test_registry_without_cuda_names_the_reason_for_every_backend():
    import torch

    from leo_rt.backends import BackendUnavailable, backend_status, choose_backend

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for name, why in backend_status("cuda").items():
        assert why is not None and "no CUDA device" in why, (name, why)
    with pytest.raises(BackendUnavailable, match="no backend can run on cuda: compile: torch sees no CUDA device"):
        choose_backend("auto", "cuda")


def test_doctor_reports_prerequisites_and_unavailable_backends(bare_env, capsys):
    from leo_rt.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = {line[:12].strip(): line[12:] for line in out.splitlines()}
    assert lines["c++"].startswith("not found") and lines["c compiler"].startswith("not found")
    assert lines["CUDA_HOME"].startswith(prereqs.cuda_home() or "none found")  # /usr/local/cuda where it exists
    python_h = "found" if (prereqs.python_include() / "Python.h").is_file() else "missing"
    assert lines["Python.h"].startswith(python_h)
    compile_cpu = [line for line in out.splitlines() if line.split()[1:3] == ["compile", "cpu"]]
    assert len(compile_cpu) == 1 and "unavailable: " in compile_cpu[0] and "install g++" in compile_cpu[0]
