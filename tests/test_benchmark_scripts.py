"""The benchmark scripts in benchmarks/ run (tiny settings: a smoke run so they cannot rot, not a measurement)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# smoke runs of tiny models: one thread each (see conftest.one_thread); the timings they print mean nothing here
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _bench(script: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run benchmarks/<script>.py with args; it must exit 0."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, **env},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_bench_animator_smoke(tmp_path):
    out = tmp_path / "a.json"
    args = ["--tiny", "--sizes", "32", "--batches", "1,2", "--repeats", "1", "--bf16", "no", "--json", str(out)]
    _bench("bench_animator", args)
    rows = json.loads(out.read_text())["rows"]
    assert [(x["size"], x["batch"]) for x in rows] == [(32, 1), (32, 2)]
    for x in rows:
        assert x["reenact_speedup"] > 0 and x["render_gflop_per_frame"] > 0 and x["render_vs_limit"] > 0


def test_bench_lmdm_smoke(tmp_path):
    out = tmp_path / "l.json"
    args = [
        "--preset",
        "lmdm-tiny",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--size",
        "32",
        "--tiny",
        "--frames",
        "5",
        "--e2e-steps",
        "2",
        "--json",
        str(out),
    ]
    _bench("bench_lmdm", args)
    d = json.loads(out.read_text())
    assert {x["sampler"] for x in d["rows"]} == {"ddim", "dpm++", "ddpm"}
    assert d["end_to_end"]["frames"] == 5 and d["end_to_end"]["render_s"] > 0


def test_bench_runtime_smoke():
    args = [
        "--preset",
        "lia-32-tiny",
        "--backends",
        "torch",
        "--repeats",
        "1",
        "--overlap-preset",
        "lia-32-tiny",
        "--overlap-steps",
        "2",
        "--overlap-frames",
        "40",
    ]
    r = _bench("bench_runtime", args)
    assert "overlapped" in r.stdout and "sequential" in r.stdout
    assert any(line.strip().startswith("torch |") for line in r.stdout.splitlines())


def test_bench_serve_smoke(tmp_path):
    """One server, one then two WebSocket clients (the Ray mode, --ray, shares the clients: tests/test_ray.py runs
    the cluster itself)."""
    out = tmp_path / "s.json"
    args = ["--preset", "lia-32-tiny", "--clients", "1,2", "--seconds", "0.5", "--warmup", "0.2", "--min-frames", "2"]
    args += ["--reps", "1", "--steps", "2", "--modes", "batched", "--json", str(out)]
    _bench("bench_serve", args)
    rows = json.loads(out.read_text())["rows"]
    assert [(x["mode"], x["k"]) for x in rows] == [("batched", 1), ("batched", 2)]
    assert all(x["total_fps"] > 0 for x in rows), rows  # frames per call: nan when no drain fell in the window


def test_bench_warp_check_in_the_interpreter():
    """bench_warp's correctness check (float64 reference, fp32 bound from the PyTorch reference's own error) on a
    real decoder map size, run on CPU tensors in Triton's interpreter."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'triton==3.7.1')")
    args = ["--check-only", "--device", "cpu", "--cases", "8x64x64", "--dtypes", "fp32"]
    r = _bench("bench_warp", args, TRITON_INTERPRET="1")
    lines = [line for line in r.stdout.splitlines() if line.startswith("check ")]
    assert len(lines) == 4 + 8 and all(": PASS" in line for line in lines), r.stdout  # 2 layouts × 2 outputs, 8 grids
