"""What the compiled paths need besides Python packages, looked up the way the tools themselves look, so that a
backend is reported unavailable (with the fix) instead of failing at its first call.

    missing = leo_rt.prereqs.check("aoti", "cuda")   # [] when nothing is missing, else one line per problem

- Triton (the fused warp kernel on CUDA, and torch.compile's CUDA kernels) builds a small C launcher the first
  time it runs: a C compiler ($CC, else gcc, else clang), Python's headers (Python.h in sysconfig's include
  directory) and the driver library libcuda.so.1 (ldconfig's cache, $LD_LIBRARY_PATH or $TRITON_LIBCUDA_PATH).
- torch.compile on CPU writes C++: a C++ compiler ($CXX, else g++; Inductor tries no other name) and Python.h.
- AOTInductor compiles and links a shared library with the same C++ compiler; for CUDA also the CUDA toolkit's
  headers (cuda.h, cuda_runtime_api.h under CUDA_HOME/include) and the driver library under its link name
  libcuda.so (in a directory the linker searches), plus Triton's needs for its kernels. torch finds CUDA_HOME as
  $CUDA_HOME, $CUDA_PATH, the folder above `nvcc` on $PATH, or /usr/local/cuda. The pip `cuda-toolkit`
  packages (nvidia-cuda-runtime, nvidia-cuda-nvcc …) put a toolkit in site-packages/nvidia/cu13 (bin/nvcc,
  include/, lib/) that torch does not look at: point CUDA_HOME there. Since nvcc itself is not needed by
  AOTInductor's default settings (Triton's own ptxas makes the kernels), it is reported by `describe`, not
  required.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from .errors import InputError

FEATURES = ("torch", "triton", "compile", "aoti", "onnxruntime", "tensorrt")
CUDA_HEADERS = ("cuda.h", "cuda_runtime_api.h")


# ------------------------------------------------------------------------------------------------ compilers


def c_compiler() -> str | None:
    """The C compiler Triton's launcher build uses: $CC, else gcc, else clang (None when there is none)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor (torch.compile on CPU, AOTInductor) uses: $CXX, else g++."""
    return os.environ.get("CXX") or shutil.which("g++")


@functools.lru_cache(maxsize=32)
def _runs(compiler: str, path: str) -> bool:
    """`compiler --version` succeeds (what Inductor itself checks). `path` keys the cache on $PATH."""
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def python_include() -> Path:
    """The folder where Triton (and Inductor) look for Python.h."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":  # Debian's scheme; Triton maps it back the same way
        scheme = "posix_prefix"
    return Path(sysconfig.get_paths(scheme=scheme)["include"])


def _python_h_fix(inc: Path) -> str:
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        f"Python's C headers (Python.h) are not in {inc}: install them for this Python (Debian/Ubuntu: apt-get install "
        f"python{ver}-dev; Fedora: dnf install python3-devel), or use a Python build that ships them"
    )


# ----------------------------------------------------------------------------------------------------- CUDA


def cuda_home() -> str | None:
    """CUDA_HOME as torch.utils.cpp_extension finds it (without importing it): $CUDA_HOME, $CUDA_PATH, the folder
    above `nvcc` on $PATH, or /usr/local/cuda when it exists."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        nvcc = shutil.which("nvcc")
        if nvcc is not None:
            home = os.path.dirname(os.path.dirname(nvcc))  # as torch does: no symlink resolution
        elif os.path.exists("/usr/local/cuda"):
            home = "/usr/local/cuda"
    return home


def pip_cuda_homes() -> list[Path]:
    """Toolkits the pip `cuda-toolkit` packages installed (site-packages/nvidia/cuNN with include/cuda.h)."""
    found: list[Path] = []
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if not nvidia.is_dir():
            continue
        for home in sorted(nvidia.glob("cu[0-9]*"), reverse=True):
            if (home / "include" / "cuda.h").is_file() and home not in found:
                found.append(home)
    return found


def nvcc() -> str | None:
    """The nvcc torch would use (CUDA_HOME/bin/nvcc, else one on $PATH)."""
    home = cuda_home()
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _toolkit_problem() -> str | None:
    home = cuda_home()
    if home and all((Path(home) / "include" / h).is_file() for h in CUDA_HEADERS):
        return None
    pip = pip_cuda_homes()
    hint = (
        f"point torch at the toolkit pip installed: export CUDA_HOME={pip[0]}"
        if pip
        else "install the CUDA toolkit (apt-get install cuda-toolkit-13-0, or pip install 'cuda-toolkit[cudart,nvcc]' "
        "then export CUDA_HOME=<site-packages>/nvidia/cu13)"
    )
    if home is None:
        where = "no CUDA toolkit found (CUDA_HOME and CUDA_PATH unset, no nvcc on PATH, no /usr/local/cuda)"
    else:
        where = f"CUDA_HOME={home} has no {' / '.join(CUDA_HEADERS)} under include/"
    return f"CUDA AOTInductor needs the CUDA toolkit's headers: {where}; {hint}"


@functools.lru_cache(maxsize=8)
def _ldconfig() -> str:
    for exe in ("/sbin/ldconfig", "/usr/sbin/ldconfig", shutil.which("ldconfig")):
        if exe and os.path.exists(exe):
            try:
                return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError):
                continue
    return ""


def libcuda_runtime_dirs() -> list[str]:
    """Folders holding libcuda.so.1 where Triton looks: $TRITON_LIBCUDA_PATH, ldconfig's cache, $LD_LIBRARY_PATH."""
    if os.environ.get("TRITON_LIBCUDA_PATH"):
        return [os.environ["TRITON_LIBCUDA_PATH"]]
    dirs = [line.split()[-1].rsplit("/", 1)[0] for line in _ldconfig().splitlines() if "libcuda.so.1" in line]
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    return [d for d in dict.fromkeys(dirs) if os.path.exists(os.path.join(d, "libcuda.so.1"))]


@functools.lru_cache(maxsize=16)
def _linker_dirs(cxx: str | None, path: str) -> tuple[str, ...]:
    """The folders the C++ compiler's linker searches by default (`cxx -print-search-dirs`)."""
    if not cxx:
        return ()
    try:
        out = subprocess.run([cxx, "-print-search-dirs"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    for line in out.splitlines():
        if line.startswith("libraries:"):
            return tuple(os.path.normpath(p) for p in line.split("=", 1)[-1].split(":") if p)
    return ()


def libcuda_link_dirs() -> list[str]:
    """Folders holding libcuda.so (the link name `-lcuda` needs) among those AOTInductor's link searches: the CUDA
    toolkit's lib folders and stubs, $LIBRARY_PATH and the compiler's own search path."""
    dirs: list[str] = []
    home = cuda_home()
    if home:
        for sub in ("lib64", "lib", "lib64/stubs", "lib/stubs", "targets/x86_64-linux/lib/stubs"):
            dirs.append(os.path.join(home, sub))
    dirs += [d for d in os.environ.get("LIBRARY_PATH", "").split(":") if d]
    dirs += _linker_dirs(cxx_compiler(), os.environ.get("PATH", ""))
    return [d for d in dict.fromkeys(dirs) if os.path.exists(os.path.join(d, "libcuda.so"))]


def _libcuda_link_fix() -> str:
    runtime = libcuda_runtime_dirs()
    home = cuda_home()
    fixes = []
    if home:
        fixes.append(f"install the toolkit's stubs ({home}/lib64/stubs/libcuda.so)")
    if runtime:
        fixes.append(f"ln -s {runtime[0]}/libcuda.so.1 {runtime[0]}/libcuda.so and export LIBRARY_PATH={runtime[0]}")
    fixes.append("or set LIBRARY_PATH to a folder that holds libcuda.so")
    return "linking a CUDA AOTInductor package needs libcuda.so (the driver's link name) where the linker looks; " + (
        "; ".join(fixes)
    )


# ----------------------------------------------------------------------------------------------------- checks


def _compiler_problems(kind: str) -> list[str]:
    if kind == "c":
        cc, var, what, names = c_compiler(), "CC", "Triton builds its launcher with a C compiler", "gcc"
    else:
        cc, var, what, names = cxx_compiler(), "CXX", "Inductor compiles C++", "g++"
    if cc is None:
        return [f"{what}, and none was found ({var} unset, no {names} on PATH): install {names} or set {var}"]
    if not _runs(cc, os.environ.get("PATH", "")):
        return [f"{what}: {cc} (from ${var} or PATH) does not run (`{cc} --version` failed): fix it or set {var}"]
    return []


def _python_h_problems() -> list[str]:
    inc = python_include()
    return [] if (inc / "Python.h").is_file() else [_python_h_fix(inc)]


def _triton_problems(device: torch.device) -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["Triton is not installed (pip install triton)"]
    if device.type != "cuda":
        return []  # on the CPU Triton only runs in its interpreter, which compiles nothing
    problems = _compiler_problems("c") + _python_h_problems()
    if not libcuda_runtime_dirs():
        problems.append(
            "Triton's launcher links libcuda.so.1, which is neither in ldconfig's cache nor on LD_LIBRARY_PATH: "
            "run ldconfig after installing the NVIDIA driver, or set TRITON_LIBCUDA_PATH to its folder"
        )
    return problems


def _cuda_device_problems(device: torch.device) -> list[str]:
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["torch sees no CUDA device (torch.cuda.is_available() is False)"]
    return []


def _kernels_on() -> bool:
    """The eager renderer's switch for the Triton kernels (LEO_RT_KERNELS, or set_kernels_enabled at run time)."""
    from .kernels.warp import kernels_enabled

    return kernels_enabled()


def check(feature: str, device: str | torch.device = "cpu") -> list[str]:
    """The missing prerequisites of a backend or feature on a device, each one line that names what is missing
    and how to fix it; [] when nothing is missing.

    feature: "torch" (the eager renderer: on CUDA it runs the Triton warp kernel, unless LEO_RT_KERNELS=0),
    "triton", "compile" (torch.compile), "aoti" (AOTInductor), "onnxruntime", "tensorrt"."""
    if feature not in FEATURES:
        raise InputError(f"unknown feature {feature!r} for a prerequisite check; choose one of {FEATURES}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return [f"leo_rt runs on cpu or cuda devices, not {device.type}"]
    problems = _cuda_device_problems(device)
    if feature == "torch":
        if device.type == "cuda" and _kernels_on() and importlib.util.find_spec("triton") is not None:
            problems += [f"{p} (or set LEO_RT_KERNELS=0 to render without the Triton kernels)" for p in
                         _triton_problems(device)]  # fmt: skip
    elif feature == "triton":
        problems += _triton_problems(device)
    elif feature == "compile":
        if device.type == "cuda":
            problems += _triton_problems(device)
        else:
            problems += _compiler_problems("cxx") + _python_h_problems()
    elif feature == "aoti":
        problems += _compiler_problems("cxx")
        if device.type == "cuda":
            problems += _triton_problems(device)
            toolkit = _toolkit_problem()
            if toolkit:
                problems.append(toolkit)
            if not libcuda_link_dirs():
                problems.append(_libcuda_link_fix())
    elif feature == "onnxruntime":
        missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            problems.append(f"needs {', '.join(missing)} (pip install onnxruntime onnx onnxscript)")
    elif feature == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            problems.append("needs NVIDIA TensorRT 10 (pip install tensorrt) and a CUDA GPU")
        if device.type != "cuda":
            problems.append("TensorRT runs on CUDA devices only")
    return problems


def describe() -> dict:
    """What was found, for `leo-rt doctor` and the GPU check's preflight."""
    cc, cxx, inc, home = c_compiler(), cxx_compiler(), python_include(), cuda_home()
    return {
        "c_compiler": cc,
        "c_compiler_runs": bool(cc) and _runs(cc, os.environ.get("PATH", "")),
        "cxx_compiler": cxx,
        "cxx_compiler_runs": bool(cxx) and _runs(cxx, os.environ.get("PATH", "")),
        "python_include": str(inc),
        "python_h": (inc / "Python.h").is_file(),
        "cuda_home": home,
        "cuda_home_headers": bool(home) and all((Path(home) / "include" / h).is_file() for h in CUDA_HEADERS),
        "pip_cuda_homes": [str(p) for p in pip_cuda_homes()],
        "nvcc": nvcc(),
        "libcuda_so_1_dirs": libcuda_runtime_dirs(),
        "libcuda_so_link_dirs": libcuda_link_dirs(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


__all__ = [
    "FEATURES",
    "c_compiler",
    "check",
    "cuda_home",
    "cxx_compiler",
    "describe",
    "libcuda_link_dirs",
    "libcuda_runtime_dirs",
    "nvcc",
    "pip_cuda_homes",
    "python_include",
]
