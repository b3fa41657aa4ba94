"""Checkpoint loading: the official format, leo_rt's format, bare state dicts, and every kind of bad file."""

import argparse
import os
import pickle

import pytest
import torch

from conftest import make_lia, random_images, rel_err
from leo_rt import CheckpointError, load_animator
from leo_rt.checkpoint import describe_checkpoint, read_checkpoint, size_from_keys
from leo_rt.cli import main


def _official(path, lia, **extra):
    """Write a checkpoint the way the published training script does."""
    args = argparse.Namespace(
        size=lia.cfg.size,
        latent_dim_style=lia.cfg.style_dim,
        latent_dim_motion=20,
        channel_multiplier=1,
        lr=0.002,
        exp_path="./exps",
    )
    torch.save({"gen": lia.state_dict(), "args": args, **extra}, path)
    return path


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tiny():
    return make_lia("lia-64-tiny", seed=11)


def test_official_format_loads_strictly_with_size_inferred(tmp_path, tiny):
    optim = {"state": {}, "param_groups": [{"lr": 0.002, "params": [0, 1]}]}
    path = _official(tmp_path / "vox.pt", tiny, dis={"w": torch.zeros(2)}, g_optim=optim, d_optim=optim)
    anim = load_animator(path)
    assert anim.size == 64 and anim.config == tiny.cfg
    assert _same_state(anim.reference, tiny)
    src, alpha = random_images(1, 64), torch.randn(2, 20)
    with torch.no_grad():
        w_a, feats = tiny.encode_app(src)
        ref = tiny.decode(w_a.expand(2, -1), alpha, [f.expand(2, -1, -1, -1) for f in feats])
    assert rel_err(anim.render(anim.encode_source(src), alpha), ref) < 1e-4
    sd, info = read_checkpoint(path)
    assert info["format"] == "official" and info["args"]["size"] == 64
    assert info["extras"] == ["d_optim", "dis", "g_optim"]


def test_official_full_size_layout_roundtrips_through_the_official_format(tmp_path):
    with torch.device("meta"):
        from leo_rt.model import LIA, LIAConfig

        shapes = {k: v.shape for k, v in LIA(LIAConfig.from_name("lia-128")).state_dict().items()}
    sd = {k: torch.zeros(s) for k, s in shapes.items()}  # official 128 layout, cheap values
    torch.save({"gen": sd}, tmp_path / "ted.pt")
    anim = load_animator(tmp_path / "ted.pt")
    assert anim.config.to_dict() == LIAConfig.from_name("lia-128").to_dict()


def test_weights_only_refuses_arbitrary_objects_and_runs_nothing(tmp_path, tiny):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"gen": tiny.state_dict(), "hook": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_animator(path)
    assert not marker.exists()


def test_truncated_file_gives_clear_error(tmp_path, tiny):
    path = _official(tmp_path / "vox.pt", tiny)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_animator(path)


def test_wrong_size_lists_keys_and_names_the_size_that_fits(tmp_path, tiny):
    path = _official(tmp_path / "vox.pt", tiny)
    with pytest.raises(CheckpointError) as e:
        load_animator(path, size=128)
    msg = str(e.value)
    assert "missing keys (28)" in msg and "dec.to_flows.4.* (5 keys: " in msg and "conv.weight" in msg
    assert "the keys fit size 64" in msg


def test_wrong_shapes_and_unexpected_keys_are_listed(tiny):
    sd = dict(tiny.state_dict())
    sd["dec.direction.weight"] = torch.zeros(64, 19)
    sd["extra.thing"] = torch.zeros(1)
    del sd["enc.fc.4.bias"]
    with pytest.raises(CheckpointError) as e:
        load_animator(sd, size=64)
    msg = str(e.value)
    assert "missing keys (1): enc.fc.4.bias" in msg
    assert "unexpected keys (1): extra.thing" in msg
    # the odd tensor is named, not its neighbours: the motion dim is what most keys (and the default) agree on
    assert "wrong shapes (1): dec.direction.weight (64, 19) vs expected (64, 20)" in msg
    assert "enc.fc.4.weight" not in msg


def test_unrelated_pickles_and_files(tmp_path):
    p = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "name": "resnet"}, p)
    with pytest.raises(CheckpointError, match="does not hold an animator state dict"):
        load_animator(p)
    p = tmp_path / "list.pkl"
    p.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint leo_rt can read"):
        load_animator(p)
    p = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, p)
    with pytest.raises(CheckpointError, match="not an LIA generator"):
        load_animator(p)
    p = tmp_path / "photo.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_animator(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_animator(tmp_path / "missing.pt")


def test_bare_state_dict_mapping_and_prefixed_keys(tmp_path, tiny):
    assert _same_state(load_animator(tiny.state_dict()).reference, tiny)
    prefixed = {f"module.{k}": v for k, v in tiny.state_dict().items()}
    torch.save(prefixed, tmp_path / "dp.pth")
    assert _same_state(load_animator(tmp_path / "dp.pth").reference, tiny)
    assert size_from_keys(tiny.state_dict()) == 64


def test_leo_rt_format_round_trips_exactly(tmp_path, tiny):
    anim = load_animator(tiny.state_dict())
    out = anim.save(tmp_path / "anim")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = load_animator(out)
    assert again.config == anim.config and _same_state(again.reference, anim.reference)
    src, alpha = random_images(1, 64), torch.randn(3, 20)
    assert torch.equal(again.render(again.encode_source(src), alpha), anim.render(anim.encode_source(src), alpha))
    lone = load_animator(out / "model.safetensors")  # the config also travels in the safetensors metadata
    assert _same_state(lone.reference, tiny)
    assert read_checkpoint(out)[1]["format"] == "leo_rt"


def test_bf16_load_and_info(tmp_path, tiny, capsys):
    path = _official(tmp_path / "vox.pt", tiny)
    anim = load_animator(path, dtype=torch.bfloat16)
    assert anim.dtype == torch.bfloat16
    frames = anim.render(anim.encode_source(random_images(1, 64)), torch.randn(2, 20))
    assert frames.dtype == torch.bfloat16 and torch.isfinite(frames.float()).all()
    d = describe_checkpoint(path)
    n = sum(p.numel() for p in tiny.parameters())
    assert d["size"] == 64 and d["parameters"]["total"] == n and d["format"] == "official"
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "64×64" in text and f"{n:,}" in text and "official" in text


def test_misleading_messages_fixed(tmp_path, tiny):
    """A wrongly shaped dec.direction.weight is blamed on itself, a missing decoder block is reported as missing
    (not as another size), and a malicious pickle's refusal says why."""
    sd = dict(tiny.state_dict())
    sd["dec.direction.weight"] = torch.zeros(64, 10)
    with pytest.raises(CheckpointError) as e:
        load_animator(sd)
    assert "wrong shapes (1): dec.direction.weight (64, 10) vs expected (64, 20)" in str(e.value)
    assert "enc.fc" not in str(e.value)
    sd = {k: v for k, v in tiny.state_dict().items() if not k.startswith("dec.to_flows.2.")}
    assert size_from_keys(sd) == 64  # the highest block says the size, not the number of blocks
    with pytest.raises(CheckpointError) as e:
        load_animator(sd)
    msg = str(e.value)
    assert "size 64:" in msg and "missing keys (5): dec.to_flows.2.* (5 keys: " in msg and "size 32" not in msg
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for legacy in (False, True):
        p = tmp_path / f"evil{legacy}.pt"
        torch.save({"gen": tiny.state_dict(), "x": Evil()}, p, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(
            CheckpointError,
            match=r"Python objects other than tensors \(e\.g\. posix\.system\).*"
            r"could run code.*refuses it for safety",
        ):
            load_animator(p)
    assert not marker.exists()


def test_one_mismatch_report_for_every_loader():
    """state_dict_mismatch: wrong shapes, then missing and unexpected keys grouped by block, then the hints."""
    from leo_rt.checkpoint import check_state_dict, state_dict_mismatch

    expected = {f"net.{i}.{p}": torch.zeros(2, 2) for i in range(3) for p in ("weight", "bias", "scale")}
    got = {k: v for k, v in expected.items() if not k.startswith("net.1.")}
    got["net.0.weight"] = torch.zeros(3, 2)
    got["head.weight"] = torch.zeros(1)
    report = state_dict_mismatch(expected, got, what="a test net", hints=["try another file"])
    lines = report.splitlines()
    assert lines[0] == "the state dict does not fit a test net:"
    assert lines[1] == "  wrong shapes (1): net.0.weight (3, 2) vs expected (2, 2)"
    assert lines[2] == "  missing keys (3): net.1.* (3 keys: weight, bias, scale)"
    assert lines[3] == "  unexpected keys (1): head.weight"
    assert lines[4] == "  try another file"
    assert state_dict_mismatch(expected, expected, what="x") is None
    with pytest.raises(CheckpointError, match="does not fit a test net"):
        check_state_dict(expected, got, what="a test net")


def test_engines_folder_without_manifest_is_named_as_such(tmp_path):
    from leo_rt.errors import ManifestError

    (tmp_path / "renderer.onnx").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"holds exported engines \(renderer\.onnx\) but no manifest\.json"):
        load_animator(tmp_path)


def test_non_finite_weights_are_refused(tiny):
    sd = dict(tiny.state_dict())
    sd["enc.fc.0.bias"] = sd["enc.fc.0.bias"].clone()
    sd["enc.fc.0.bias"][3] = float("nan")
    with pytest.raises(CheckpointError, match=r"enc\.fc\.0\.bias holds NaN or inf"):
        load_animator(sd)


def test_checkpoint_hash_is_cached_by_file_identity(tmp_path, tiny, monkeypatch):
    """checkpoint_hash reads a file once per (path, size, mtime, ctime, inode): a second call, in this process or
    another (the hash cache in $LEO_RT_CACHE), does not read it; a file replaced in place is hashed again."""
    import leo_rt.checkpoint as ckmod
    from leo_rt.export import checkpoint_hash
    from leo_rt.export import manifest as man

    monkeypatch.setenv("LEO_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(man, "_HASHES", {})
    path = _official(tmp_path / "a.pt", tiny)
    reads = []
    real = ckmod.read_checkpoint
    monkeypatch.setattr(ckmod, "read_checkpoint", lambda s: (isinstance(s, os.PathLike) and reads.append(s)) or real(s))
    first = checkpoint_hash(path)
    assert checkpoint_hash(path) == first and len(reads) == 1
    monkeypatch.setattr(man, "_HASHES", {})  # a new process: the disk cache answers
    assert checkpoint_hash(path) == first and len(reads) == 1
    assert checkpoint_hash(tiny.state_dict()) == first  # the same tensors, however given
    other = make_lia("lia-64-tiny", seed=12)
    _official(path, other)  # replaced in place
    assert checkpoint_hash(path) != first and len(reads) == 2
    half = {k: v.half() for k, v in tiny.state_dict().items()}
    assert checkpoint_hash({k: v.float() for k, v in half.items()}) == checkpoint_hash(half)  # dtype-independent
