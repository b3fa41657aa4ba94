"""The one-shot GPU check (benchmarks/gpu_check.py) rehearsed on the CPU, from a checkout that is not installed, so an
import error, a renamed function or a wrong argument in any step shows here and not on the GPU machine."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("preflight", "kernels", "custom_op", "renderer", "stream", "aoti", "timings", "tensorrt")


def _checkout(tmp_path: Path) -> Path:
    """A copy of the source tree: leo_rt must come from here, not from the installed (editable) package."""
    tree = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sub in ("leo_rt", "kernels", "export", "benchmarks"):
        shutil.copytree(ROOT / sub, tree / sub, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _run(tree: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHONPATH"] = "."
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_rehearsal_runs_every_step_from_a_checkout(tmp_path):
    tree = _checkout(tmp_path)
    out = tmp_path / "gpu_check.json"
    run = _run(tree, "--rehearse", "--out", str(out), "--work", str(tmp_path / "work"), timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "leo_rt.gpu_check/1" and doc["mode"] == "rehearsal"
    # the package and its kernels came from the copy, through the checkout's own search path
    assert Path(doc["machine"]["leo_rt_file"]).resolve().is_relative_to(tree)
    assert Path(doc["machine"]["kernels_file"]).resolve().is_relative_to(tree)
    assert tuple(doc["steps"]) == STEPS
    for name, step in doc["steps"].items():
        assert step["status"] in ("PASS", "NEEDS-GPU"), (name, step)
        assert step["checks"], name
        bad = [c for c in step["checks"] if c["status"] not in ("PASS", "NEEDS-GPU")]
        assert not bad, (name, bad)
    # what needs CUDA is listed as such, never as passed
    by_name = {(s, c["name"]): c["status"] for s, e in doc["steps"].items() for c in e["checks"]}
    for key in (
        ("custom_op", "compile fullgraph cuda graphs"),
        ("custom_op", "replay outputs kept"),
        ("aoti", "load and compare"),
        ("timings", "lmdm chunk cuda graph"),
        ("timings", "compile fp16 b32"),
        ("tensorrt", "tensorrt"),
    ):
        assert by_name[key] == "NEEDS-GPU", key
    # and the code paths that can run on a CPU did run
    for key in (
        ("kernels", "warp fp16 CL indexed"),
        ("kernels", "int32 guard"),
        ("custom_op", "opcheck"),
        ("renderer", "fast vs published bf16"),
        ("stream", "generate pattern twice"),
        ("stream", "serve core two sources"),
        ("timings", "generate end to end"),
    ):
        assert by_name[key] == "PASS", key
    assert [g["status"] for g in doc["goals"]] == ["NEEDS-GPU"] * len(doc["goals"]) and len(doc["goals"]) == 6
    # the table is the last thing printed: one row per step with its status, the goals, the overall line
    tail = run.stdout.strip().splitlines()[-(len(STEPS) + len(doc["goals"]) + 3) :]
    for name in STEPS:
        row = next(line for line in tail if line.startswith(name + " "))
        assert doc["steps"][name]["status"] in row
    assert tail[-1].startswith("OVERALL PASS")


def test_an_overrunning_step_is_stopped_recorded_and_the_check_goes_on(tmp_path):
    """A fresh process per step (the GPU run's way), one limited to half a second: it is killed with its process
    group, recorded as a failure with its unreached checks unmeasured, and the next step still runs."""
    out = tmp_path / "gpu_check.json"
    run = _run(
        ROOT,
        "--rehearse",
        "--spawn",
        "exec",
        "--only",
        "preflight,tensorrt",
        "--limit",
        "preflight=0.5",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        timeout=120,
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    pre = doc["steps"]["preflight"]
    assert pre["status"] == "FAIL" and pre["timed_out"] and pre["returncode"] == -9
    assert any(c["name"] == "time limit" and "overran" in c["detail"] for c in pre["checks"])
    assert doc["steps"]["tensorrt"]["status"] == "NEEDS-GPU"
    assert doc["summary"]["status"] == "FAIL"
    assert run.stdout.strip().splitlines()[-1].startswith("OVERALL FAIL")


def test_fork_is_refused_outside_the_rehearsal(tmp_path):
    run = _run(ROOT, "--spawn", "fork", "--only", "tensorrt", "--out", str(tmp_path / "x.json"), timeout=60)
    assert run.returncode != 0 and "rehearsal only" in run.stderr


def test_unknown_step_names_are_refused():
    run = _run(ROOT, "--rehearse", "--only", "kernel,timings", timeout=60)
    assert run.returncode == 2 and "unknown steps" in run.stderr
