"""The benchmark scripts run (tiny settings: a smoke run so they cannot rot, not a measurement)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_animator_smoke(tmp_path):
    out = tmp_path / "a.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/bench_animator.py"),
            "--tiny",
            "--sizes",
            "32",
            "--batches",
            "1,2",
            "--repeats",
            "1",
            "--bf16",
            "no",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
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
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_lmdm.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
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
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_runtime.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "overlapped" in r.stdout and "sequential" in r.stdout
    assert any(line.strip().startswith("torch |") for line in r.stdout.splitlines())
