"""Reading and writing animator checkpoints.

Formats read:
- official LIA files (``vox.pt`` …): a torch pickle holding a dict with ``'gen'`` (the state dict) and maybe
  ``'args'`` (an ``argparse.Namespace``), ``'dis'``, ``'g_optim'``, ``'d_optim'``. Read with
  ``weights_only=True`` and only ``argparse.Namespace`` allow-listed: no arbitrary code runs.
- a bare state dict, as a torch file or an in-memory mapping;
- leo_rt's own format: a directory with ``model.safetensors`` + ``config.json`` (the config is also stored in
  the safetensors metadata, so a lone ``.safetensors`` file loads too).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError
from .files import save_checkpoint_dir
from .model import LIA, LIAConfig

FORMAT_NAME = "leo_rt.animator"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_META_KEY = "leo_rt_config"


def _sniff(path: Path) -> str:
    """'dir', 'torch' (zip or legacy pickle), 'safetensors' or 'unknown', from the first bytes."""
    if path.is_dir():
        return "dir"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\.?\n|$)", str(e), re.S)
        detail = found.group(1).strip() if found else type(e).__name__
        if "Unsupported global" in detail:
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and argparse.Namespace ({detail}). leo_rt reads "
                "checkpoints with weights_only=True and never runs arbitrary pickles; if you trust the file, "
                "re-save its generator state dict with torch.save({'gen': state_dict}, 'clean.pt')"
            ) from None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint leo_rt can read ({detail}); expected an official LIA .pt file, a "
            "saved state dict, or a leo_rt checkpoint directory"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e).strip()[:200]}). "
            "The file is truncated or corrupt: download or copy it again"
        ) from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path} as safetensors ({e}): the file is truncated or corrupt") from None
    cfg = json.loads(meta[_META_KEY]) if _META_KEY in meta else None
    return sd, cfg


def _refuse_other_kinds(cfg_path: Path) -> None:
    """A leo_rt directory of another kind (an LMDM) passed where an animator belongs: say so."""
    if not cfg_path.is_file():
        return
    try:
        fmt = json.loads(cfg_path.read_text()).get("format")
    except (json.JSONDecodeError, AttributeError):
        return
    if fmt not in (None, FORMAT_NAME):
        raise CheckpointError(
            f"{cfg_path.parent} is a {fmt!r} checkpoint, not an animator; pass the animator (LIA) checkpoint with "
            "--checkpoint and an LMDM directory with --lmdm"
        )


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def read_checkpoint(source: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """Read any supported checkpoint into (state_dict, info). info has 'format' ('official', 'state_dict' or
    'leo_rt'), 'config' (a dict, leo_rt format only), 'args' (the official Namespace as a dict, if any) and
    'extras' (the other top-level entries of an official file)."""
    info: dict = {"format": None, "config": None, "args": None, "extras": []}
    if isinstance(source, Mapping):
        obj, where = source, "the given mapping"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        kind = _sniff(path)
        if kind in ("dir", "safetensors"):
            if kind == "dir":
                cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
                _refuse_other_kinds(cfg_path)
                if not weights.exists():
                    raise CheckpointError(f"{path} is a directory without {WEIGHTS_FILE}: not a leo_rt checkpoint")
            else:
                cfg_path, weights = path.with_name(CONFIG_FILE), path
            sd, cfg = _read_safetensors(weights)
            if cfg is None and cfg_path.exists():
                cfg = json.loads(cfg_path.read_text()).get("config")
            info.update(format="leo_rt", config=cfg)
            return sd, info
        if kind == "unknown":
            raise CheckpointError(
                f"{path} is not a checkpoint: expected a PyTorch file (.pt/.pth), a .safetensors file or a leo_rt "
                "checkpoint directory"
            )
        obj = _torch_load(path)
    if isinstance(obj, Mapping) and "gen" in obj:
        sd = obj["gen"]
        if not _is_state_dict(sd):
            raise CheckpointError(f"the 'gen' entry of {where} is not a state dict of tensors ({type(sd).__name__})")
        args = obj.get("args")
        info.update(
            format="official",
            args=vars(args) if isinstance(args, argparse.Namespace) else args,
            extras=sorted(str(k) for k in obj if k not in ("gen", "args")),
        )
        return dict(sd), info
    if _is_state_dict(obj):
        info["format"] = "state_dict"
        return dict(obj), info
    found = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{where} does not hold an animator state dict (found {found}); expected the official LIA format "
        "(a dict with 'gen'), a state dict, or a leo_rt checkpoint directory"
    )


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "gen."):  # DataParallel wrappers, or a whole trainer's state dict
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def size_from_keys(sd: Mapping[str, torch.Tensor]) -> int | None:
    """The image size the keys fit: one decoder block (to_flows.k) per resolution 8 … S."""
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("dec.to_flows.") and k.split(".")[2].isdigit()}
    return 2 ** (len(blocks) + 2) if blocks else None


def config_from_state_dict(sd: Mapping[str, torch.Tensor], size: int) -> LIAConfig:
    """Read style/motion dims and the channel table off the shapes; official values where a key is missing."""
    try:
        style_dim, motion_dim = sd["dec.direction.weight"].shape
        cap = sd["dec.input.input"].shape[1]
        enc_top = sd["enc.net_app.convs.0.0.weight"].shape[0]
        dec_top = sd[f"dec.convs.{2 * (size.bit_length() - 4)}.conv.weight"].shape[1]
        base = enc_top * size
        return LIAConfig(
            size=size,
            style_dim=style_dim,
            motion_dim=motion_dim,
            channel_cap=cap,
            channel_base=base,
            channel_multiplier=max(1, dec_top // enc_top),
        )
    except (KeyError, ValueError, IndexError):
        return LIAConfig(size=size)


def _mismatch_report(model: LIA, sd: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        (k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if k in sd and sd[k].shape != v.shape
    ]
    return missing, unexpected, shapes


def _fmt(keys: list, limit: int = 8) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(str, keys[:limit])) + more


def build_lia(sd: Mapping[str, torch.Tensor], *, size: int | None = None, config: dict | None = None) -> LIA:
    """Build an LIA on CPU and load sd strictly; a mismatch lists missing, unexpected and mis-shaped keys and
    names the size the keys fit."""
    sd = _strip_prefix(dict(sd))
    fits = size_from_keys(sd)
    if config is not None:
        cfg = LIAConfig.from_dict(config)
        if size is not None and size != cfg.size:
            raise CheckpointError(f"size={size} was asked for but the checkpoint's config says size {cfg.size}")
    else:
        chosen = size or fits
        if chosen is None:
            raise CheckpointError(
                "cannot tell the animator size: the state dict has no 'dec.to_flows.*' keys, so it is not an LIA "
                f"generator state dict (first keys: {_fmt(sorted(sd), 5)})"
            )
        cfg = config_from_state_dict(sd, chosen) if chosen == fits else LIAConfig(size=chosen)
    with torch.device("meta"):
        model = LIA(cfg)
    missing, unexpected, shapes = _mismatch_report(model, sd)
    if missing or unexpected or shapes:
        lines = [f"the state dict does not fit an LIA animator of size {cfg.size}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt(missing, len(missing))}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected, len(unexpected))}")
        if shapes:
            wrong = [f"{k} {a} vs expected {b}" for k, a, b in shapes]
            lines.append(f"  wrong shapes ({len(shapes)}): " + _fmt(wrong, 4))
        if fits is not None and fits != cfg.size:
            lines.append(f"  the keys fit size {fits}: pass size={fits} (--size {fits}) or leave the size out")
        elif fits is None:
            lines.append("  the keys fit no animator size: is this an LIA generator checkpoint?")
        raise CheckpointError("\n".join(lines))
    model = LIA(cfg)
    model.load_state_dict(sd, strict=True)
    return model


def save_lia(model: LIA, path: str | os.PathLike) -> Path:
    """Write leo_rt's format: directory `path` with model.safetensors + config.json, each written to a temporary
    file and renamed, so a failure leaves no half-written checkpoint."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; leo_rt checkpoints are directories")
    cfg = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": model.cfg.to_dict()}
    meta = {_META_KEY: json.dumps(model.cfg.to_dict()), "format": FORMAT_NAME}
    return save_checkpoint_dir(path, model.state_dict(), cfg, meta, WEIGHTS_FILE, CONFIG_FILE)


def describe_checkpoint(source: str | os.PathLike) -> dict:
    """What a checkpoint file holds, for `leo-rt info`."""
    sd, info = read_checkpoint(source)
    model = build_lia(sd, config=info["config"])
    enc = sum(v.numel() for k, v in model.named_parameters() if k.startswith("enc."))
    dec = sum(v.numel() for k, v in model.named_parameters() if k.startswith("dec."))
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    return {
        "path": str(source),
        "format": info["format"],
        "size": model.cfg.size,
        "config": model.cfg.to_dict(),
        "parameters": {"encoder": enc, "decoder": dec, "total": enc + dec},
        "tensors": len(sd),
        "dtypes": dtypes,
        "args": info["args"],
        "extras": info["extras"],
    }
