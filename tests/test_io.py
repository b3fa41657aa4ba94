"""Image and video I/O: odd image modes, the resize policy, real driving videos, mp4 round trips, failures."""

import numpy as np
import pytest
import torch
from PIL import Image

from leo_rt.io import (
    MediaError,
    VideoWriter,
    iter_video,
    load_image,
    read_image,
    read_video,
    square_resize,
    to_uint8,
    video_info,
)


def _save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_grey_and_one_bit_images_become_grey_rgb(tmp_path):
    p = _save(tmp_path, "g.png", Image.new("L", (5, 4), 100))
    arr = read_image(p)
    assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8 and (arr == 100).all()
    one = Image.new("1", (3, 3), 0)
    one.putpixel((1, 1), 1)
    arr = read_image(_save(tmp_path, "b.png", one))
    assert arr[1, 1].tolist() == [255, 255, 255] and arr[0, 0].tolist() == [0, 0, 0]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    data = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    im = Image.fromarray(data)
    assert im.mode.startswith("I")
    arr = read_image(_save(tmp_path, "g16.png", im))
    assert arr[0, :, 0].tolist() == [0, 128, 255]
    assert (arr[..., 0] == arr[..., 2]).all()


def test_alpha_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    im.putpixel((1, 0), (200, 0, 0, 0))  # fully transparent: the hidden red must not show
    arr = read_image(_save(tmp_path, "a.png", im))
    assert arr[0, 0].tolist() == [10, 20, 30] and arr[0, 1].tolist() == [255, 255, 255]
    la = Image.new("LA", (1, 1), (0, 128))  # half-transparent black over white
    assert abs(int(read_image(_save(tmp_path, "la.png", la))[0, 0, 0]) - 127) <= 1


def test_palette_images_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    arr = read_image(_save(tmp_path, "p.png", p))
    assert arr[0, 0].tolist() == [255, 0, 0] and arr[0, 1].tolist() == [0, 0, 255]
    arr = read_image(_save(tmp_path, "pt.png", p, transparency=1))
    assert arr[0, 1].tolist() == [255, 255, 255]


def test_cmyk_jpeg_and_exif_orientation(tmp_path):
    arr = read_image(_save(tmp_path, "c.jpg", Image.new("CMYK", (4, 4), (0, 0, 0, 0)), quality=95))
    assert arr.shape == (4, 4, 3) and arr.min() > 240  # no ink is white
    im = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    arr = read_image(_save(tmp_path, "o.jpg", im, exif=exif))
    assert arr.shape == (6, 2, 3)


def test_resize_policy_center_crops_then_resizes(tmp_path):
    wide = np.zeros((200, 300, 3), np.uint8)
    wide[:, :50] = (255, 0, 0)  # left band: cropped away
    wide[:, 250:] = (0, 0, 255)  # right band: cropped away
    wide[:, 50:250] = (0, 255, 0)
    out = square_resize(wide, 64)
    assert out.shape == (64, 64, 3)
    assert (out[..., 1] == 255).all() and out[..., 0].max() == 0 and out[..., 2].max() == 0
    tall = np.zeros((90, 30, 3), np.uint8)
    tall[30:60] = 200
    assert (square_resize(tall, 30) == 200).all()
    x = load_image(_save(tmp_path, "w.png", Image.fromarray(wide)), 64)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0, 1], torch.ones(64, 64))  # green channel 255 → 1


def test_square_input_passes_through_untouched():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert square_resize(img, 32) is img


def test_fixed_linear_map_to_uint8():
    frames = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(frames)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    # no per-clip min-max stretch: a dim clip stays dim
    assert to_uint8(torch.full((1, 3, 2, 2), -0.5)).max() == 64


def _smooth_frames(n, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [np.stack([(xx * 4 + 9 * t) % 256, (yy * 4) % 256, np.full_like(xx, 40 * (t % 5))], -1) for t in range(n)]
    ).astype(np.uint8)


def test_mp4_round_trip_frame_count_fps_and_pixels(tmp_path):
    frames = _smooth_frames(7, 48, 64)
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, fps=12.5) as w:
        w.write(frames[:3])
        w.write(torch.from_numpy(frames[3:]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert w.frames == 7
    back, fps = read_video(out)
    assert back.shape == (7, 48, 64, 3) and fps == pytest.approx(12.5)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # lossy H.264, but the same pictures
    info = video_info(out)
    assert (info.width, info.height, info.frames) == (64, 48, 7)
    assert list(tmp_path.iterdir()) == [out]  # no temporary left behind


def test_mov_and_webm_driving_videos(tmp_path):
    import av

    frames = _smooth_frames(4, 32, 32)
    with VideoWriter(tmp_path / "clip.mov", fps=24) as w:
        w.write(frames)
    back, fps = read_video(tmp_path / "clip.mov")
    assert back.shape == (4, 32, 32, 3) and fps == pytest.approx(24.0)
    if "libvpx-vp9" not in av.codecs_available:
        pytest.skip("this PyAV build has no VP9 encoder to make a webm with")
    with av.open(str(tmp_path / "clip.webm"), mode="w") as c:
        st = c.add_stream("libvpx-vp9", rate=8)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    back, fps = read_video(tmp_path / "clip.webm")
    assert back.shape == (4, 32, 32, 3) and fps == pytest.approx(8.0)


def test_failed_write_leaves_no_output(tmp_path):
    out = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out, fps=10) as w:
            w.write(_smooth_frames(2, 16, 16))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MediaError, match="even frame sizes"):
        with VideoWriter(out, fps=10) as w:
            w.write(np.zeros((1, 15, 16, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MediaError, match=r"must end in \.mp4"):
        VideoWriter(tmp_path / "x.avi", fps=10)


def test_unreadable_video_gives_clear_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    with pytest.raises(MediaError, match="bad.mp4"):
        list(iter_video(bad))
    with pytest.raises(MediaError, match="does not exist"):
        video_info(tmp_path / "nope.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(MediaError):
        read_video(text)


def test_real_driving_video(shared_data):
    path = shared_data / "vox" / "driving1.mp4"
    info = video_info(path)
    assert info.fps == pytest.approx(10.0) and (info.width, info.height) == (256, 256) and info.frames == 652
    frames, fps = read_video(path, size=128, max_frames=5)
    assert frames.shape == (5, 128, 128, 3) and fps == pytest.approx(10.0)
    assert frames.std() > 10  # real picture content
    src = load_image(shared_data / "vox" / "mona_lisa.png", 256)
    assert src.shape == (1, 3, 256, 256) and -1 <= src.min() < src.max() <= 1


# ------------------------------------------------------------------------------------------------ atomic writers


def test_a_writer_that_appends_a_suffix_is_caught_and_nothing_replaced(tmp_path):
    """np.savez given a name without .npz writes name + ".npz": the empty temporary file must never be renamed
    into place (that lost a user's codes once). The stray file is removed and the old target kept."""
    from leo_rt.files import atomic_path

    target = tmp_path / "codes"
    target.write_bytes(b"old codes")
    with pytest.raises(RuntimeError, match=r"appended a suffix.*nothing was replaced"):
        with atomic_path(target) as tmp:
            np.savez(tmp, codes=np.zeros(3))
    assert target.read_bytes() == b"old codes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes"]


def test_atomic_path_verifies_before_replacing(tmp_path):
    from leo_rt.errors import OutputError
    from leo_rt.files import atomic_path

    target = tmp_path / "a.txt"
    target.write_text("old")

    def refuse(tmp):
        raise OutputError(f"{tmp} did not read back")

    with pytest.raises(OutputError, match="did not read back"):
        with atomic_path(target, verify=refuse) as tmp, open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_path(target, verify=lambda tmp: None) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "new"


def test_outputs_through_symlinks_devices_fifos_and_folders(tmp_path):
    import os

    from leo_rt.errors import OutputError
    from leo_rt.files import write_text

    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"
    (tmp_path / "dangling.json").symlink_to("made.json")
    write_text(tmp_path / "dangling.json", "made")  # a dangling link: its target is created
    assert (tmp_path / "dangling.json").is_symlink() and (tmp_path / "made.json").read_text() == "made"
    write_text("/dev/null", "streamed to a device, not replaced")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        write_text(fifo, "through the pipe")
        assert os.read(reader, 100) == b"through the pipe"
    finally:
        os.close(reader)
    assert fifo.is_fifo()
    with pytest.raises(OutputError, match="is a FIFO"):
        with VideoWriter(fifo, fps=5):
            pass
    with pytest.raises(OutputError, match=r"is a folder; the video needs a file name"):
        VideoWriter(tmp_path, fps=5)


def test_read_only_file_is_refused_even_for_root(tmp_path):
    from leo_rt.errors import OutputError
    from leo_rt.files import write_text

    p = tmp_path / "ro.json"
    p.write_text("keep me")
    p.chmod(0o444)
    with pytest.raises(OutputError, match=r"read-only, so it is left as it is.*chmod u\+w"):
        write_text(p, "replaced?")
    assert p.read_text() == "keep me"


def test_write_failures_become_output_errors(tmp_path):
    """ENOSPC and EACCES raised while writing (a patched writer: the fault suite does it with a real full disk
    and a real read-only folder) become OutputError with the reason; the temporary file is removed."""
    import errno

    from leo_rt.errors import OutputError
    from leo_rt.files import atomic_path

    for code, match in ((errno.ENOSPC, r"no space left to write .*full"), (errno.EACCES, "permission denied")):
        with pytest.raises(OutputError, match=match) as e:
            with atomic_path(tmp_path / "x.bin") as tmp, open(tmp, "wb") as f:
                f.write(b"partial")
                raise OSError(code, os_strerror(code))
        assert isinstance(e.value.__cause__, OSError)
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):  # an interrupt stays an interrupt, and still cleans up
        with atomic_path(tmp_path / "x.bin") as tmp:
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def os_strerror(code):
    import os

    return os.strerror(code)


def test_codes_file_without_npz_suffix_round_trips(tmp_path):
    from leo_rt.train import MotionCodes

    data = MotionCodes(np.arange(40, dtype=np.float32).reshape(2, 20), np.array([2]), np.array([25.0]), ["v"])
    data.save(tmp_path / "codes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes"]
    back = MotionCodes.load(tmp_path / "codes")
    assert np.array_equal(back.codes, data.codes) and back.names == ["v"]


# ------------------------------------------------------------------------------------------------ bad inputs


def test_folder_given_as_image_or_video(tmp_path):
    with pytest.raises(MediaError, match="is a folder, not an image"):
        load_image(tmp_path, 32)
    with pytest.raises(MediaError, match="is a folder, not a video"):
        video_info(tmp_path)


def test_decompression_bomb_is_a_media_error_with_the_limit(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    p = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    limit = 2 * Image.MAX_IMAGE_PIXELS / 1e6
    with pytest.raises(MediaError, match=rf"400 megapixels, above the limit of {limit:.0f} megapixels.*shrink it"):
        read_image(p)


def test_small_sources_warn_and_non_finite_tensors_are_refused(tmp_path):
    import warnings

    from leo_rt.errors import InputError
    from leo_rt.io import SmallImageWarning, prepare_image

    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallImageWarning)  # 64 pixels is enough: no warning
        assert prepare_image(np.zeros((64, 80, 3), np.uint8), 128).shape == (1, 3, 128, 128)

    with pytest.warns(SmallImageWarning, match=r"2×3 pixels, below the 64-pixel minimum"):
        x = prepare_image(np.zeros((3, 2, 3), np.uint8), 128)
    assert x.shape == (1, 3, 128, 128)
    with pytest.warns(SmallImageWarning):
        load_image(_save(tmp_path, "tiny.png", Image.new("RGB", (10, 10))), 128)
    bad = torch.zeros(2, 3, 8, 8)
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match=r"source image 0 holds 1 NaN/inf"):
        prepare_image(bad[1:], 8)
    from leo_rt.io import check_finite

    with pytest.raises(InputError, match=r"driving image 1 holds 1 NaN/inf"):  # the first bad one is named
        check_finite(bad, "driving image")
    assert check_finite(bad[:1]) is not None
    with pytest.raises(InputError, match="must be float"):
        prepare_image(torch.zeros(1, 3, 9, 9), 8)


def _damaged_video(tmp_path, n=60):
    frames = _smooth_frames(n, 32, 32)
    with VideoWriter(tmp_path / "ok.mp4", fps=10) as w:
        w.write(frames)
    data = bytearray((tmp_path / "ok.mp4").read_bytes())
    mid = len(data) // 2
    data[mid : mid + 200] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    return tmp_path / "bad.mp4"


def test_video_damaged_mid_file_keeps_the_good_frames_or_fails_when_strict(tmp_path):
    from leo_rt.io import DamagedVideoWarning

    bad = _damaged_video(tmp_path)
    told = []
    with pytest.warns(DamagedVideoWarning, match=r"bad\.mp4 is damaged.*kept (\d+) frames"):
        frames = list(iter_video(bad, on_damage=lambda n, why: told.append((n, why))))
    assert 0 < len(frames) < 60 and told and told[0][0] == len(frames) and "decoding failed" in told[0][1]
    good = list(iter_video(tmp_path / "ok.mp4"))
    assert np.abs(frames[0].astype(int) - good[0].astype(int)).mean() < 1  # the kept frames are the real ones
    with pytest.raises(MediaError, match=rf"bad\.mp4 is damaged: decoding failed after frame {len(frames)}"):
        list(iter_video(bad, strict=True))
