"""leo_rt.config: the one base of LIAConfig and LMDMConfig, and the checkpoint-directory format they share."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from leo_rt.checkpoint import CheckpointError, read_checkpoint, save_lia
from leo_rt.config import DictConfig
from leo_rt.errors import InputError
from leo_rt.lmdm import LMDM, LMDM_PRESETS, LMDMConfig, load_lmdm, save_lmdm
from leo_rt.model import LIA, PRESETS, LIAConfig

# config.json field names, in order, as checkpoints written before the config base have them
LIA_FIELDS = ["size", "style_dim", "motion_dim", "channel_multiplier", "channel_cap", "channel_base"]
LMDM_FIELDS = [
    "motion_dim",
    "chunk",
    "channels",
    "channel_mults",
    "res_blocks",
    "heads",
    "groups",
    "dropout",
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "max_prefix",
]


@pytest.mark.parametrize("cls, table", [(LIAConfig, PRESETS), (LMDMConfig, LMDM_PRESETS)])
def test_presets_and_dicts_round_trip(cls, table):
    assert cls.presets() == table and len(table) >= 3
    for name, cfg in table.items():
        assert cls.from_name(name) is cfg
        d = cfg.to_dict()
        assert json.loads(json.dumps(d)) == d  # JSON-able as it is (tuples are lists)
        assert cls.from_dict(d) == cfg and hash(cls.from_dict(d)) == hash(cfg)
    with pytest.raises(InputError, match=f"unknown {cls.kind} preset 'nope'; choose one of"):
        cls.from_name("nope")


def test_from_dict_refuses_unknown_fields_and_wrong_types():
    with pytest.raises(InputError, match=r"unknown animator config fields \['colour'\]"):
        LIAConfig.from_dict({"size": 128, "colour": 1})
    with pytest.raises(InputError, match="'size' must be of type int, got '128'"):
        LIAConfig.from_dict({"size": "128"})
    with pytest.raises(InputError, match="'size' must be of type int, got True"):
        LIAConfig.from_dict({"size": True})
    with pytest.raises(InputError, match=r"'channel_mults\[1\]' must be of type int"):
        LMDMConfig.from_dict({"channel_mults": [1, 2.5]})
    with pytest.raises(InputError, match="must be a JSON object"):
        LMDMConfig.from_dict([1, 2])
    # fields left out keep their defaults; ints are taken for floats; lists become tuples
    cfg = LMDMConfig.from_dict({"chunk": 32, "beta_end": 1, "channel_mults": [1, 2]})
    assert cfg == dataclasses.replace(LMDMConfig(), chunk=32, beta_end=1.0, channel_mults=(1, 2))
    assert isinstance(cfg.beta_end, float) and isinstance(cfg.channel_mults, tuple)
    with pytest.raises(InputError, match="power of two"):  # the config's own checks still run
        LIAConfig.from_dict({"size": 100})


def _read_dir(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    return (path / "config.json").read_text(), metadata


def test_checkpoint_directories_keep_their_format(tmp_path):
    """config.json and the safetensors metadata, spelled out: the format checkpoints had before the config base."""
    lia = LIA(LIAConfig.from_name("lia-32-tiny"))
    save_lia(lia, tmp_path / "lia")
    text, metadata = _read_dir(tmp_path / "lia")
    config = dict(zip(LIA_FIELDS, [32, 64, 20, 1, 32, 2048], strict=True))
    assert text == json.dumps({"format": "leo_rt.animator", "version": 1, "config": config}, indent=2) + "\n"
    assert metadata == {"leo_rt_config": json.dumps(config), "format": "leo_rt.animator"}
    sd, info = read_checkpoint(tmp_path / "lia")
    assert info["config"] == config and all(torch.equal(sd[k], v) for k, v in lia.state_dict().items())

    lmdm = LMDM(LMDMConfig.from_name("lmdm-tiny"))
    save_lmdm(lmdm, tmp_path / "lmdm", extra={"step": 7})
    text, metadata = _read_dir(tmp_path / "lmdm")
    values = [20, 16, 32, [1, 2], 1, 2, 8, 0.0, 1000, "linear", 1e-4, 2e-2, "v_prediction", 6]
    config = dict(zip(LMDM_FIELDS, values, strict=True))
    expected = {"format": "leo_rt.lmdm", "version": 1, "config": config, "step": 7}
    assert text == json.dumps(expected, indent=2) + "\n"
    assert metadata == {"format": "leo_rt.lmdm"}
    assert load_lmdm(tmp_path / "lmdm").cfg == lmdm.cfg


def test_lmdm_directory_errors(tmp_path):
    save_lmdm(LMDM(LMDMConfig.from_name("lmdm-tiny")), tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "chunk": "16"}}))
    with pytest.raises(CheckpointError, match="not a valid LMDM config .*'chunk' must be of type int"):
        load_lmdm(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_lmdm(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a leo_rt config"):
        load_lmdm(tmp_path / "ok")
    # weights that do not fit the config: the shared state-dict mismatch report
    save_lmdm(LMDM(LMDMConfig.from_name("lmdm-tiny")), tmp_path / "wrong")
    meta = json.loads((tmp_path / "wrong" / "config.json").read_text())
    wrong = {**meta, "config": {**meta["config"], "channels": 64, "groups": 16}}
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match="does not fit the LMDM its config describes"):
        load_lmdm(tmp_path / "wrong")
    # an animator directory is not an LMDM, and the other way round
    save_lia(LIA(LIAConfig.from_name("lia-32-tiny")), tmp_path / "anim")
    with pytest.raises(CheckpointError, match="holds a 'leo_rt.animator' checkpoint, not an LMDM"):
        load_lmdm(tmp_path / "anim")
    with pytest.raises(CheckpointError, match="not an animator"):
        read_checkpoint(tmp_path / "wrong")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_lmdm(LMDM(LMDMConfig.from_name("lmdm-tiny")), tmp_path / "file")


@dataclasses.dataclass(frozen=True)
class _Inner(DictConfig, kind="inner"):
    sizes: tuple[int, ...] = (1, 2)


@dataclasses.dataclass(frozen=True)
class _Outer(DictConfig, kind="outer"):
    limit: int | None = None
    rate: float = 0.5
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_dict_config_for_other_settings():
    """The dict part alone, as other settings (the serve cluster's) can use it: optional fields, nested configs."""
    cfg = _Outer(limit=3, inner=_Inner(sizes=(4,)))
    d = cfg.to_dict()
    assert d == {"limit": 3, "rate": 0.5, "inner": {"sizes": [4]}}
    assert _Outer.from_dict(json.loads(json.dumps(d))) == cfg
    assert _Outer.from_dict({"limit": None}) == _Outer()
    with pytest.raises(InputError, match=r"unknown outer config fields \['x'\]"):
        _Outer.from_dict({"x": 1})
    with pytest.raises(InputError, match=r"inner config field 'sizes\[0\]' must be of type int"):
        _Outer.from_dict({"inner": {"sizes": ["a"]}})
