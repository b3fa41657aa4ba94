"""extract-motion → train-lmdm → generate, and edit, end to end on CPU at tiny sizes.

fp32 frames and codes are judged against the float64 run of the published network (conftest.assert_fp32_close).
"""

import copy

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_fp32_close, make_lia, rel_err
from leo_rt import load_animator
from leo_rt.cli import main
from leo_rt.io import MediaError, VideoWriter, iter_video, load_image, read_video, to_model
from leo_rt.pipelines import edit, reenact, video_codes
from leo_rt.train import MotionCodes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmdm_assets")
    torch.save({"gen": make_lia("lia-32-tiny", seed=2).state_dict()}, d / "anim.pt")
    yy, xx = np.mgrid[0:32, 0:32]
    for name, n in (("a.mp4", 20), ("b.mp4", 24)):
        frames = np.stack(
            [np.stack([(xx * 6 + 5 * t) % 256, (yy * 7 + 3 * t) % 256, np.full_like(xx, 9 * t)], -1) for t in range(n)]
        ).astype(np.uint8)
        (d / "videos").mkdir(exist_ok=True)
        with VideoWriter(d / "videos" / name, fps=12) as w:
            w.write(frames)
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(d / "source.png")
    return d


def test_extract_train_generate(assets, tmp_path, capsys):
    codes = tmp_path / "codes.npz"
    assert (
        main(
            [
                "extract-motion",
                "--checkpoint",
                str(assets / "anim.pt"),
                "--videos",
                str(assets / "videos"),
                "--out",
                str(codes),
                "--batch",
                "7",
            ]
        )
        == 0
    )
    data = MotionCodes.load(codes, motion_dim=20)
    assert data.lengths.tolist() == [20, 24] and data.fps.tolist() == [12.0, 12.0]
    anim = load_animator(assets / "anim.pt")
    direct = video_codes(anim, iter_video(assets / "videos" / "a.mp4", 32), batch=20)
    # batching does not matter: the codes extracted 7 at a time and 20 at a time are both as close to the float64
    # codes as the published encoder's fp32 codes are
    x = to_model(read_video(assets / "videos" / "a.mp4", size=32)[0])
    with torch.no_grad():
        pub, ref = anim.reference.encode_motion(x), copy.deepcopy(anim.reference).double().encode_motion(x.double())
    assert_fp32_close(torch.from_numpy(data.videos()[0]), pub, ref, "extracted codes, batch 7")
    assert_fp32_close(direct, pub, ref, "codes, batch 20")

    lmdm = tmp_path / "lmdm"
    train = ["train-lmdm", "--codes", str(codes), "--out", str(lmdm), "--preset", "lmdm-tiny", "--batch", "4"]
    assert main([*train, "--steps", "6", "--save-every", "3"]) == 0
    assert "last loss" in capsys.readouterr().out
    assert main([*train, "--steps", "8", "--resume"]) == 0
    out = tmp_path / "gen.mp4"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(assets / "anim.pt"),
                "--lmdm",
                str(lmdm),
                "--source",
                str(assets / "source.png"),
                "--frames",
                "37",
                "--steps",
                "3",
                "--sampler",
                "dpm++",
                "--out",
                str(out),
                "--fps",
                "12",
                "--overlap",
                "2",
                "--chunk",
                "8",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "UNTRAINED" not in text and "sample" in text
    video, fps = read_video(out)
    assert video.shape == (37, 32, 32, 3) and fps == pytest.approx(12.0)


def test_generate_without_lmdm_says_so(assets, tmp_path, capsys):
    out = tmp_path / "gen.mp4"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(assets / "anim.pt"),
                "--source",
                str(assets / "source.png"),
                "--frames",
                "3",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "UNTRAINED LMDM" in capsys.readouterr().out
    assert read_video(out)[0].shape[0] == 3


def test_wrong_kinds_of_checkpoint(assets, tmp_path, capsys):
    from leo_rt.lmdm import LMDM, LMDMConfig, save_lmdm

    save_lmdm(LMDM(LMDMConfig.from_name("lmdm-tiny")), tmp_path / "lmdm")
    args = ["generate", "--source", str(assets / "source.png"), "--frames", "3", "--out", str(tmp_path / "o.mp4")]
    assert main([*args, "--checkpoint", str(tmp_path / "lmdm")]) == 2
    assert "not an animator" in capsys.readouterr().err
    assert main([*args, "--checkpoint", str(assets / "anim.pt"), "--lmdm", str(assets / "anim.pt")]) == 2
    assert "not an LMDM checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_edit_round_trip_equals_absolute_reenactment(assets, tmp_path):
    anim = load_animator(assets / "anim.pt")
    video = assets / "videos" / "a.mp4"
    frames, _ = read_video(video, size=32)
    codes = video_codes(anim, frames, batch=8)
    x = to_model(frames)
    first = x[:1]
    edited = torch.cat(list(edit(anim, codes, first, batch=8)))
    reenacted = torch.cat(list(reenact(anim, first, frames, relative=False, batch=8)))
    assert edited.shape == reenacted.shape == (20, 3, 32, 32)
    # both are the published absolute reenactment of the video by its first frame, within fp32 error of float64
    lia, lia64 = anim.reference, copy.deepcopy(anim.reference).double()
    with torch.no_grad():
        pub = _absolute(lia, first, lia.encode_motion(x))
        ref = _absolute(lia64, first.double(), lia64.encode_motion(x.double()))
    assert_fp32_close(edited, pub, ref, "edit")
    assert_fp32_close(reenacted, pub, ref, "absolute reenactment")
    # relative mode with the unedited first frame moves it by codes − codes[0] from its own code: the same frames,
    # as the published relative call (relative to the first frame) makes them
    relative = torch.cat(list(edit(anim, codes, first, relative=True, batch=8)))
    with torch.no_grad():
        pub_rel = lia(first.expand(20, -1, -1, -1), x, lia.encode_motion(first))
        ref_rel = lia64(first.double().expand(20, -1, -1, -1), x.double(), lia64.encode_motion(first.double()))
    assert rel_err(ref_rel, ref) < 1e-12  # the same frames, in float64
    assert_fp32_close(relative, pub_rel, ref_rel, "relative edit")
    # the CLI: appearance from the edited frame, fps from the video
    out = tmp_path / "edit.mp4"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "edited.png")
    assert (
        main(
            [
                "edit",
                "--checkpoint",
                str(assets / "anim.pt"),
                "--video",
                str(video),
                "--first-frame",
                str(tmp_path / "edited.png"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    got, fps = read_video(out)
    assert got.shape == (20, 32, 32, 3) and fps == pytest.approx(12.0)
    expect = torch.cat(list(edit(anim, codes, load_image(tmp_path / "edited.png", 32))))
    assert rel_err(expect, edited) > 1e-3  # a different appearance really changes the frames


def _absolute(lia, source, codes):
    """The published absolute render of one source with codes (T, D)."""
    w_a, feats = lia.encode_app(source)
    n = codes.shape[0]
    return lia.decode(w_a.expand(n, -1), codes, [f.expand(n, -1, -1, -1) for f in feats])


def test_zero_length_video_is_a_clear_error(assets, tmp_path, capsys):
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), mode="w") as c:  # an mp4 with a header and no frames
        st = c.add_stream("libx264", rate=10)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    assert empty.stat().st_size > 0
    with pytest.raises(MediaError, match="empty.mp4 (has no video stream|holds no decodable frames)"):
        list(iter_video(empty))
    out = tmp_path / "edit.mp4"
    assert (
        main(
            [
                "edit",
                "--checkpoint",
                str(assets / "anim.pt"),
                "--video",
                str(empty),
                "--first-frame",
                str(assets / "source.png"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "empty.mp4" in capsys.readouterr().err and not out.exists()
    assert (
        main(
            [
                "extract-motion",
                "--checkpoint",
                str(assets / "anim.pt"),
                "--videos",
                str(empty),
                "--out",
                str(tmp_path / "c.npz"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "c.npz").exists()
