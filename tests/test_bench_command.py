"""The `leo-rt bench` command and leo_rt.bench: FLOP counts, the JSON schema, every field, the plot and the
published baseline row. (The benchmark scripts are smoke-run in test_benchmark_scripts.py; the pytest-benchmark
suite is benchmarks/test_bench_suite.py.)"""

import json

import jsonschema
import pytest
import torch
from PIL import Image

from leo_rt import Animator
from leo_rt.bench import BENCH_SCHEMA, count_flops, render_flops
from leo_rt.cli import main
from leo_rt.model import LIA, LIAConfig

# GFLOP per rendered frame that README.md, docs/ARCHITECTURE.md and benchmarks/RESULTS.md quote
QUOTED_GFLOP_PER_FRAME = {128: 22.7, 256: 30.1}


def published_render_flops(preset: str) -> int:
    """FLOPs of the published decoder call (leo_rt.model.LIA.decode) for one frame, counted by
    torch.utils.flop_counter on the meta device (shapes only: no weights, no arithmetic)."""
    cfg = LIAConfig.from_name(preset)
    with torch.device("meta"):
        lia = LIA(cfg)
        w_a, feats = lia.encode_app(torch.zeros(1, 3, cfg.size, cfg.size))
        return count_flops(lambda: lia.decode(w_a, torch.zeros(1, cfg.motion_dim), feats))


@pytest.mark.parametrize("size", sorted(QUOTED_GFLOP_PER_FRAME))
def test_quoted_gflop_per_frame_is_the_flop_count_of_the_published_module(size):
    assert round(published_render_flops(f"lia-{size}") / 1e9, 1) == QUOTED_GFLOP_PER_FRAME[size]


def _fast_over_published(preset: str) -> float:
    with torch.random.fork_rng():
        anim = Animator.random(preset)
    return render_flops(anim) / published_render_flops(preset)


def test_bench_counts_the_fast_forms_flops_which_match_the_published_decoder():
    """What `leo-rt bench` reports per frame: the same convolutions as the published decoder, without the per-call
    QR (so never more, and within 1%)."""
    assert 0.99 < _fast_over_published("lia-64-tiny") <= 1.0


@pytest.mark.full
def test_bench_flops_match_the_published_decoder_at_full_width_256():
    assert 0.99 < _fast_over_published("lia-256") <= 1.0


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
