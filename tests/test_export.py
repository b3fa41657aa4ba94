"""Exported stages: ONNX (ONNX Runtime) and AOTInductor parity, dynamic batch, manifest, caching, TensorRT."""

import dataclasses
import importlib.util
import shutil

import onnx
import pytest
import torch

from conftest import make_lia, rel_err
from leo_rt.cli import main
from leo_rt.errors import InputError
from leo_rt.export import ExportedStage, ManifestError, animator_stages, export_checkpoint, lmdm_stage

pytestmark = pytest.mark.filterwarnings("ignore")
STAGES = ("source_encoder", "motion_encoder", "renderer", "lmdm_denoiser")


def _reference_stages(d):
    from leo_rt import load_animator
    from leo_rt.lmdm import load_lmdm

    stages = animator_stages(load_animator(d / "anim.pt"), 6)
    stages["lmdm_denoiser"] = lmdm_stage(load_lmdm(d / "lmdm"), 6)
    return stages


@pytest.mark.parametrize("fmt", ["onnx", "aoti"])
def test_every_stage_matches_pytorch_at_unseen_batch_sizes(exported, fmt):
    d, _ = exported
    for name, (module, spec) in _reference_stages(d).items():
        stage = ExportedStage(d / "out", name, fmt)
        for batch in (1, 3):  # traced at batch 2: both are sizes the exporter never saw
            inputs = spec.sample(batch)
            with torch.no_grad():
                want = module(*inputs)
            want = want if isinstance(want, tuple) else (want,)
            got = stage(*inputs)
            assert len(got) == len(want) == len(spec.output_names)
            for name_out, g, w in zip(spec.output_names, got, want, strict=True):
                assert g.shape == w.shape, (name, name_out)
                assert rel_err(g, w) <= 1e-4, (name, name_out, fmt, batch, rel_err(g, w))


def test_onnx_files_are_checked_and_only_batch_is_dynamic(exported):
    d, _ = exported
    for name, (_, spec) in _reference_stages(d).items():
        model = onnx.load(str(d / "out" / f"{name}.onnx"))
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        sample = dict(zip(spec.input_names, spec.sample(2), strict=True))
        for inp in model.graph.input:
            dims = inp.type.tensor_type.shape.dim
            if inp.name in spec.batch_inputs:
                assert dims[0].dim_param and not dims[0].dim_value, (name, inp.name)  # symbolic batch
                assert [x.dim_value for x in dims[1:]] == list(sample[inp.name].shape[1:])  # fixed sizes
            else:
                assert [x.dim_value for x in dims] == list(sample[inp.name].shape)
        if name == "renderer":
            assert "GridSample" in {n.op_type for n in model.graph.node}


def test_batch_outside_the_exported_range_is_refused(exported):
    d, _ = exported
    _, spec = _reference_stages(d)["motion_encoder"]
    with pytest.raises(ValueError, match=r"exported for batch 1…6, got 7"):
        ExportedStage(d / "out", "motion_encoder", "aoti")(*spec.sample(7))


def test_manifest_refuses_tampered_or_mismatched_artifacts(exported, tmp_path):

    d, _ = exported
    copy = tmp_path / "out"
    shutil.copytree(d / "out", copy)
    with pytest.raises(ManifestError, match="exported with size=32, not 64"):
        ExportedStage(copy, "renderer", "onnx", expect={"size": 64})
    path = copy / "renderer.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="does not match its SHA-256.*--force"):
        ExportedStage(copy, "renderer", "onnx")
    (copy / "motion_encoder.pt2").unlink()
    with pytest.raises(ManifestError, match="missing"):
        ExportedStage(copy, "motion_encoder", "aoti")
    with pytest.raises(ManifestError, match="no lmdm_denoiser/trt artifact"):
        ExportedStage(copy, "lmdm_denoiser", "trt")


def test_second_export_skips_and_force_rebuilds(exported, capsys, tmp_path):
    src, first_log = exported
    d = tmp_path  # a copy: this test re-exports, and the fixture is shared with other modules
    for name in ("anim.pt", "lmdm", "out"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, d / name)
    assert sum(line.startswith("export") for line in first_log) == 2 * len(STAGES)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (d / "out").iterdir() if p.suffix in (".onnx", ".pt2")}
    args = [
        "export",
        "--checkpoint",
        str(d / "anim.pt"),
        "--lmdm",
        str(d / "lmdm"),
        "--out",
        str(d / "out"),
        "--format",
        "onnx,aoti",
        "--max-batch",
        "6",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sum(line.startswith("skip ") for line in lines) == 2 * len(STAGES)
    assert not [line for line in lines if line.startswith("export ")]
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (d / "out").iterdir() if p.suffix in (".onnx", ".pt2")}
    assert main([*args[:-4], "--format", "onnx", "--max-batch", "6", "--force"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("export ") for line in out.splitlines()) == len(STAGES)
    # a different checkpoint invalidates every artifact made from the old one
    torch.save({"gen": make_lia("lia-32-tiny", seed=5).state_dict()}, d / "other.pt")
    assert main(["export", "--checkpoint", str(d / "other.pt"), "--out", str(d / "out"), "--max-batch", "6"]) == 0
    assert sum(line.startswith("export ") for line in capsys.readouterr().out.splitlines()) == 3


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None,
    reason="TensorRT cannot be installed on these machines; the TensorRT path is unverified here",
)
def test_tensorrt_engine_matches_pytorch(exported):  # pragma: no cover - needs TensorRT and a GPU
    from leo_rt.export.tensorrt import Precision, Profile, TRTEngine, build_engine

    d, _ = exported
    module, spec = _reference_stages(d)["renderer"]
    engine = build_engine(
        d / "out" / "renderer.onnx",
        d / "out",
        precision=Precision.FP32,
        profile=Profile(1, 2, 6),
        batch_inputs=spec.batch_inputs,
    )
    trt_engine = TRTEngine(engine, d / "out" / "renderer.onnx")
    inputs = [t.cuda() for t in spec.sample(3)]
    got = trt_engine.infer(dict(zip(spec.input_names, inputs, strict=True)))["frames"]
    assert rel_err(got.cpu(), module(*spec.sample(3))) <= 1e-3


def test_tensorrt_missing_is_a_clear_error(exported, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    d, _ = exported
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(d / "anim.pt"),
                "--out",
                str(d / "out"),
                "--format",
                "trt",
                "--max-batch",
                "6",
            ]
        )
        == 2
    )
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_raw_tensor_files_round_trip(tmp_path):
    from leo_rt.export.rawtensor import read_raw, write_raw

    t = torch.randn(2, 3, 4)
    write_raw(tmp_path / "t.leot", t)
    assert torch.equal(read_raw(tmp_path / "t.leot"), t)
    (tmp_path / "bad.leot").write_bytes(b"LEOT" + bytes(8))
    with pytest.raises(ValueError, match="not a leo_rt raw tensor|truncated|unsupported"):
        read_raw(tmp_path / "bad.leot")


@pytest.mark.skipif(
    __import__("shutil").which("cmake") is None or __import__("shutil").which("c++") is None,
    reason="cmake or a C++ compiler is not installed",
)
def test_cpp_runner_matches_python(exported, tmp_path):
    import subprocess
    from pathlib import Path

    import torch.utils

    from leo_rt import load_animator
    from leo_rt.export.rawtensor import read_raw, write_raw

    d, _ = exported
    root = Path(__file__).resolve().parents[1]
    build = tmp_path / "build"
    cfg = subprocess.run(
        ["cmake", "-S", str(root), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    make = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=900)
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    image, codes = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(5, 20, generator=g) * 0.5
    write_raw(tmp_path / "image.leot", image)
    write_raw(tmp_path / "codes.leot", codes)
    out = d / "out"
    run = subprocess.run(
        [
            str(build / "leo_rt_runner"),
            "--source-encoder",
            str(out / "source_encoder.pt2"),
            "--renderer",
            str(out / "renderer.pt2"),
            "--image",
            str(tmp_path / "image.leot"),
            "--codes",
            str(tmp_path / "codes.leot"),
            "--out",
            str(tmp_path / "frames.leot"),
            "--batch",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    frames = read_raw(tmp_path / "frames.leot")
    anim = load_animator(d / "anim.pt")
    want = anim.render(anim.encode_source(image), codes)
    assert frames.shape == want.shape == (5, 3, 32, 32)
    assert rel_err(frames, want) <= 1e-4
    # and the same packages from Python give the same frames
    state = ExportedStage(out, "source_encoder", "aoti")(image)
    py = torch.cat([ExportedStage(out, "renderer", "aoti")(codes[i : i + 2], *state[2:])[0] for i in range(0, 5, 2)])
    assert rel_err(frames, py) <= 1e-6


def test_onnx_warp_node_option(exported, tmp_path):
    d, _ = exported
    from leo_rt.export import read_manifest

    export_checkpoint(d / "anim.pt", tmp_path / "node", formats=("onnx",), max_batch=4, onnx_warp_node=True)
    nodes = onnx.load(str(tmp_path / "node" / "renderer.onnx")).graph.node
    kinds = {(n.domain, n.op_type) for n in nodes}
    assert ("leo_rt", "WarpBlend") in kinds and ("", "GridSample") not in kinds
    assert read_manifest(tmp_path / "node")["artifacts"]["renderer/onnx"]["warp"] == "onnx-node"
    from leo_rt.export.tensorrt import custom_nodes, refuse_custom_nodes

    assert custom_nodes(tmp_path / "node" / "renderer.onnx") == ["leo_rt::WarpBlend"]
    with pytest.raises(ValueError, match="WarpBlend.*--onnx-warp-node"):
        refuse_custom_nodes(tmp_path / "node" / "renderer.onnx")
    refuse_custom_nodes(tmp_path / "node" / "motion_encoder.onnx")  # standard ops only: accepted
    # TensorRT alone (its ONNX files are written as a step) is refused too, before anything is written
    for fmts in (("trt",), ("onnx", "trt")):
        with pytest.raises(InputError, match="TensorRT cannot build"):
            export_checkpoint(d / "anim.pt", tmp_path / "trt", formats=fmts, max_batch=4, onnx_warp_node=True)
        assert not (tmp_path / "trt" / "renderer.onnx").exists()


class _WarpProbe(torch.nn.Module):
    """The renderer's warp call alone, recording whether the kernels were enabled while it was traced."""

    seen: list[bool] = []  # a class attribute: export may trace a copy of the module

    def forward(self, logits, h, feat):
        from leo_rt.kernels import kernels_enabled, warp_blend

        _WarpProbe.seen.append(kernels_enabled())
        return warp_blend(feat, logits, h)


def _probe_spec():
    from leo_rt.export import StageSpec

    def sample(b):
        g = torch.Generator().manual_seed(b)
        return (torch.randn(b, 3, 6, 6, generator=g), torch.randn(b, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6))

    return StageSpec("probe", ("logits", "h", "feat"), ("warped", "out"), ("logits", "h"), sample, 1, 2, 4)


def test_onnx_export_always_traces_the_decomposed_warp(tmp_path):
    """On CUDA with the kernels on, warp_blend dispatches to the leo_rt::warp_blend op, which torch.export captures
    before the ONNX conversion starts and which ONNX cannot express. The exporter traces with the kernels off (on
    every device), and restores the switch afterwards, also when the export fails."""
    from leo_rt.export.exporter import export_onnx
    from leo_rt.kernels import kernels_enabled

    assert kernels_enabled()
    probe, spec = _WarpProbe(), _probe_spec()
    _WarpProbe.seen.clear()
    export_onnx(probe, spec, tmp_path / "probe.onnx")
    assert _WarpProbe.seen and not any(_WarpProbe.seen)  # every trace saw the kernels off
    assert kernels_enabled()
    nodes = onnx.load(str(tmp_path / "probe.onnx")).graph.node
    assert "GridSample" in {n.op_type for n in nodes} and not any(n.domain == "leo_rt" for n in nodes)
    broken = dataclasses.replace(spec, sample=lambda b: (torch.randn(b, 3, 6, 6),))  # one input for three
    with pytest.raises(Exception):  # noqa: B017 - any tracing error: what matters is the switch afterwards
        export_onnx(probe, broken, tmp_path / "broken.onnx")
    assert kernels_enabled()


def test_tensorrt_refuses_the_onnx_warp_node_before_needing_tensorrt(tmp_path, capsys):
    torch.save({"gen": make_lia("lia-32-tiny", seed=4).state_dict()}, tmp_path / "anim.pt")
    with pytest.raises(ValueError, match="onnx-warp-node.*TensorRT|TensorRT.*onnx-warp-node"):
        export_checkpoint(tmp_path / "anim.pt", tmp_path / "out", formats=("onnx", "trt"), onnx_warp_node=True)
    assert not (tmp_path / "out" / "renderer.onnx").exists()  # refused before anything was exported
    args = ["export", "--checkpoint", str(tmp_path / "anim.pt"), "--out", str(tmp_path / "cli")]
    assert main([*args, "--format", "onnx,trt", "--onnx-warp-node"]) == 2
    assert "--onnx-warp-node" in capsys.readouterr().err


def test_tensorrt_batch_split_and_alignment_helpers():
    from leo_rt.export.tensorrt import ALIGNMENT, batch_chunks, is_aligned

    assert batch_chunks(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert batch_chunks(32, 32) == [(0, 32)] and batch_chunks(1, 32) == [(0, 1)]
    with pytest.raises(ValueError):
        batch_chunks(4, 0)
    buf = torch.empty(1024)  # CUDA allocations start 512-byte aligned; on the CPU, find an aligned start
    k = next(i for i in range(64) if buf[i:].data_ptr() % ALIGNMENT == 0)
    codes = buf[k : k + 160].view(8, 20)
    assert is_aligned(codes)
    assert not is_aligned(codes[1:])  # a row slice starts 80 bytes further: TensorRT needs a staging copy


def test_exported_stage_checks_its_inputs_against_the_manifest(exported, tmp_path):

    from leo_rt.export import update_manifest

    d, _ = exported
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    stage = ExportedStage(out, "renderer", "onnx")
    with pytest.raises(InputError, match=r"renderer takes 5 inputs \(alpha, .*styles0\), got 1"):
        stage(torch.zeros(1, 20))

    def rename(m):  # a manifest whose record no longer matches the file's input names
        inputs = m["artifacts"]["renderer/onnx"]["inputs"]
        m["artifacts"]["renderer/onnx"]["inputs"] = {("codes" if k == "alpha" else k): v for k, v in inputs.items()}

    update_manifest(out, rename)
    with pytest.raises(ManifestError, match=r"takes inputs \['alpha', .*records \['codes', .*re-export with --force"):
        ExportedStage(out, "renderer", "onnx")
