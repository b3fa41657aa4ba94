"""End to end on CPU at a small size: `leo-rt demo`, `leo-rt reenact`, `leo-rt info`, and the reenact pipeline."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_lia, rel_err
from leo_rt import load_animator
from leo_rt.cli import main
from leo_rt.io import VideoWriter, load_image, read_video, square_resize, to_model, to_uint8
from leo_rt.pipelines import reenact


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    lia = make_lia("lia-64-tiny", seed=5)
    torch.save({"gen": lia.state_dict()}, d / "tiny.pt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "source.png")
    yy, xx = np.mgrid[0:48, 0:80]  # not square: the resize policy crops it to 48×48, then resizes to 64
    frames = np.stack(
        [np.stack([(xx * 3 + 11 * t) % 256, (yy * 5) % 256, np.full_like(xx, 30 * t)], -1) for t in range(6)]
    ).astype(np.uint8)
    with VideoWriter(d / "driving.mp4", fps=15) as w:
        w.write(frames)
    return d


def _reenact_args(assets, out, *extra):
    return ["reenact", "--checkpoint", str(assets / "tiny.pt"), "--source", str(assets / "source.png"),
            "--driving", str(assets / "driving.mp4"), "--out", str(out), *extra]  # fmt: skip


def test_reenact_end_to_end_matches_the_api(assets, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = main(_reenact_args(assets, out, "--batch", "4"))
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    video, fps = read_video(out)
    assert video.shape == (6, 64, 64, 3) and fps == pytest.approx(15.0)
    # the same frames through the API (relative mode, the default)
    anim = load_animator(assets / "tiny.pt")
    driving, _ = read_video(assets / "driving.mp4", size=64)
    frames = torch.cat(list(reenact(anim, load_image(assets / "source.png", 64), driving, batch=4)))
    expect = to_uint8(frames).astype(float)

    def pooled(a):  # H.264 (4:2:0, quantised) is lossy on these noisy random-weight frames: compare 4×4 means
        return a.astype(float).reshape(6, 16, 4, 16, 4, 3).mean((2, 4))

    err = np.abs(pooled(video) - pooled(expect)).mean()
    assert err < 3
    assert np.abs(pooled(video) - pooled(expect[::-1])).mean() > 2 * err  # frames in order, not just similar


def test_reenact_options_and_relative_mode(assets, tmp_path):
    out = tmp_path / "abs.mp4"
    args = _reenact_args(assets, out, "--max-frames", "3", "--absolute")
    assert main(args) == 0
    assert read_video(out)[0].shape[0] == 3
    # relative mode: the first driving frame reproduces the source's own motion code
    anim = load_animator(assets / "tiny.pt")
    src = load_image(assets / "source.png", 64)
    driving, _ = read_video(assets / "driving.mp4", size=64)
    first = next(reenact(anim, src, driving, relative=True, batch=2))
    state = anim.encode_source(src)
    # (batch 2 against batch 1: oneDNN may pick another conv kernel, so agreement is to fp32 rounding)
    assert rel_err(first[:1], anim.render(state, state.alpha_src)) < 1e-5
    absolute = next(reenact(anim, src, driving, relative=False, batch=2))
    assert rel_err(absolute, anim.render(state, anim.encode_motion(to_model(driving[:2])))) < 1e-5
    assert rel_err(absolute, first) > 1e-3  # and the two modes really differ


def test_reenact_bad_inputs_fail_cleanly(assets, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    out = tmp_path / "out.mp4"
    assert main([*_reenact_args(assets, out), "--driving", str(bad)]) == 2  # the last --driving wins
    assert "bad.mp4" in capsys.readouterr().err
    assert main(_reenact_args(assets, out, "--size", "128")) == 2
    assert "the keys fit size 64" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_reenact_args(assets, out, "--device", "cuda")) == 2
        assert "--device cpu" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4"]


def test_demo_runs_with_random_weights(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--preset", "lia-64-tiny", "--frames", "5", "--batch", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random weights — pass --checkpoint for real output" in text
    assert "render" in text and "frames/s" in text
    video, fps = read_video(out)
    assert video.shape == (5, 64, 64, 3) and fps == pytest.approx(10.0)


def test_demo_without_shared_data_draws_its_own_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("leo_rt.pipelines.find_shared_data", lambda: None)
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--preset", "lia-32-tiny", "--frames", "3", "--out", str(out)]) == 0
    assert "drawn portrait" in capsys.readouterr().out
    assert read_video(out)[0].shape == (3, 32, 32, 3)


def test_demo_with_shared_assets(shared_data, tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--preset", "lia-64-tiny", "--frames", "3", "--out", str(out)]) == 0
    assert "mona_lisa.png" in capsys.readouterr().out
    video, _ = read_video(out)
    assert video.shape == (3, 64, 64, 3)


@pytest.mark.skipif(shutil.which("leo-rt") is None, reason="the leo-rt console script is not installed")
def test_installed_console_script(assets):
    r = subprocess.run(["leo-rt", "info", str(assets / "tiny.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "64×64" in r.stdout
    r = subprocess.run(["leo-rt", "reenact", "--help"], capture_output=True, text=True, timeout=120)
    assert "center-crop" in r.stdout


def test_source_images_that_are_not_square(assets, tmp_path):
    wide = np.zeros((40, 100, 3), np.uint8)
    wide[:, 30:70] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 64)
    assert torch.equal(x, to_model(square_resize(wide, 64)))
    assert (x == 1).all()  # only the centred white square survives the crop
