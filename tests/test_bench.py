"""`leo-rt bench`: JSON schema, FLOP count, every field, the plot and the baseline row."""

import json

import jsonschema
import pytest
import torch
from PIL import Image

from leo_rt import Animator
from leo_rt.bench import BENCH_SCHEMA, render_flops
from leo_rt.cli import main


@pytest.mark.full
def test_flop_count_of_the_256_decoder_matches_the_independent_count():
    with torch.random.fork_rng():
        anim = Animator.random("lia-256")
    gflop = render_flops(anim) / 1e9
    assert gflop == pytest.approx(30.1, rel=0.02)  # ARCHITECTURE.md: 30.1 GFLOP a frame, measured on the published code


def test_tiny_bench_run_produces_every_field_the_plot_and_a_baseline_row(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert (
        main(
            [
                "bench",
                "--tiny",
                "--sizes",
                "32",
                "--batches",
                "1,2",
                "--backends",
                "torch",
                "--frames",
                "2",
                "--json",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    jsonschema.validate(result, BENCH_SCHEMA)
    rows = result["rows"]
    assert {(r["backend"], r["batch"]) for r in rows} == {
        ("published", 1),
        ("published", 2),
        ("torch", 1),
        ("torch", 2),
    }
    for r in rows:
        assert r["render_ms_min"] <= r["render_ms_p50"] <= r["render_ms_p95"]
        assert r["fps"] == pytest.approx(1e3 / r["render_ms_p50"])
        assert 0 < r["fraction_of_peak"] < 2 and r["peak_host_mb"] > 0
    assert all(r["speedup_vs_published"] > 0 for r in rows if r["backend"] == "torch")
    assert all(r["speedup_vs_published"] is None for r in rows if r["backend"] == "published")
    m = result["machine"]
    assert m["cores"] >= 1 and m["peak_gflops"] > 0 and m["copy_gbs"] > 0 and m["versions"]["torch"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert "published" in capsys.readouterr().out


def test_schema_rejects_a_row_without_its_fields():
    bad = {"schema_version": 1, "machine": {}, "rows": [{"backend": "torch"}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, BENCH_SCHEMA)
