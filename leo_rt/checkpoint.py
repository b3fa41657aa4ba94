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
from .model import LIA, LIAConfig

FORMAT_NAME = LIAConfig.format_name  # "leo_rt.animator"; the directory format is leo_rt.config's
FORMAT_VERSION = LIAConfig.format_version
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_META_KEY = LIAConfig.metadata_key  # "leo_rt_config"


def _sniff(path: Path) -> str:
    """'dir', 'torch' (zip or legacy pickle), 'safetensors' or 'unknown', from the first bytes."""
    if path.is_dir():
        return "dir"
    if not path.is_file():  # a FIFO or a device would block or stream forever
        raise CheckpointError(f"checkpoint {path} is not a regular file; give a checkpoint file or folder")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror or e}); check its permissions") from None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _torch_load(path: Path) -> object:
    import warnings

    try:
        # an open file, not the name: torch.load dispatches on the name (*.safetensors goes to safetensors)
        with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 …": the error below says what matters
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global:?\s*([\w.]+)", text, re.I)
        names = [found.group(1)] if found else _pickle_globals(path)
        if names:
            what = f"e.g. {names[0]}"
            raise CheckpointError(
                f"{path} holds Python objects other than tensors ({what}), and loading them could run code, so "
                "leo_rt refuses it for safety (it reads checkpoints with weights_only=True and never runs "
                "arbitrary pickles). If you trust the file, re-save just its generator state dict: "
                "torch.save({'gen': state_dict}, 'clean.pt')"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\.?\n|$)", text, re.S)
        detail = detail.group(1).strip() if detail else text.strip().splitlines()[0][:200] if text.strip() else ""
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint leo_rt can read ({detail or type(e).__name__}); expected an "
            "official LIA .pt file, a saved state dict, or a leo_rt checkpoint directory"
        ) from None
    except MemoryError:
        raise CheckpointError(
            f"could not read {path}: it declares tensors too large for memory, so it is corrupt; download or copy "
            "it again"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zips, damaged records, bad storage tables: torch raises
        # RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError … on damaged files
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e).strip()[:200]}). "
            "The file is truncated or corrupt: download or copy it again"
        ) from None


_SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "argparse.Namespace", "builtins.set", "_codecs.encode")


def _pickle_globals(path: Path, limit: int = 200_000) -> list[str]:
    """The classes and functions a plain (non-zip) pickle file refers to, read with pickletools (which runs
    nothing), other than those a tensor checkpoint needs. [] when none or when the file is not a pickle."""
    import pickletools

    found, strings = [], []
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                return []
            f.seek(0)
            for i, (op, arg, _) in enumerate(pickletools.genops(f)):
                if i > limit:
                    break
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings = [*strings[-1:], str(arg)]
                elif op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                    found.append(".".join(strings))
    except Exception:  # noqa: BLE001,S110 - a damaged pickle: report what was found before the damage
        pass
    return [g for g in dict.fromkeys(found) if not g.startswith(_SAFE_GLOBALS)]


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, MemoryError) as e:
        raise CheckpointError(f"could not read {path} as safetensors ({e}): the file is truncated or corrupt") from None
    cfg = None
    if _META_KEY in meta:
        try:
            cfg = json.loads(meta[_META_KEY])
        except (json.JSONDecodeError, TypeError):
            raise CheckpointError(f"the config stored in {path} is not valid JSON: the file is corrupt") from None
    return sd, cfg


def _refuse_other_kinds(cfg_path: Path) -> None:
    """A leo_rt directory of another kind (an LMDM) passed where an animator belongs: say so."""
    if not cfg_path.is_file():
        return
    try:
        fmt = json.loads(cfg_path.read_text()).get("format")
    except (json.JSONDecodeError, AttributeError, OSError, UnicodeDecodeError):
        return
    if fmt not in (None, FORMAT_NAME):
        raise CheckpointError(
            f"{cfg_path.parent} is a {fmt!r} checkpoint, not an animator; pass the animator (LIA) checkpoint with "
            "--checkpoint and an LMDM directory with --lmdm"
        )


ENGINE_SUFFIXES = (".onnx", ".pt2", ".engine", ".plan")


def _refuse_engines_dir(path: Path) -> None:
    """A folder of exported engines whose manifest.json was deleted: say that, not "no model.safetensors"."""
    from .errors import ManifestError

    found = sorted(p.name for p in path.iterdir() if p.suffix in ENGINE_SUFFIXES and p.is_file())
    if found:
        raise ManifestError(
            f"{path} holds exported engines ({', '.join(found[:3])}) but no manifest.json, so they cannot be "
            f"verified or used: the manifest was deleted or the export did not finish. Re-export with `leo-rt "
            f"export --checkpoint CKPT --out {path}`, or pass the checkpoint itself"
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
                    _refuse_engines_dir(path)
                    raise CheckpointError(
                        f"{path} is a folder without {WEIGHTS_FILE}, so not a leo_rt checkpoint; pass an official "
                        "LIA .pt file or a folder written by leo_rt"
                    )
            else:
                cfg_path, weights = path.with_name(CONFIG_FILE), path
            sd, cfg = _read_safetensors(weights)
            if cfg is None and cfg_path.is_file():
                try:
                    cfg = json.loads(cfg_path.read_text()).get("config")
                except (json.JSONDecodeError, AttributeError, OSError, UnicodeDecodeError):
                    raise CheckpointError(f"{cfg_path} is not a valid leo_rt config (JSON object)") from None
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
    """The image size the keys fit: one decoder block (to_flows.k) per resolution 8 … S, so the highest block
    index k gives S = 2^(k+3) (a block missing in the middle is then reported as missing, not as a smaller size)."""
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("dec.to_flows.") and k.split(".")[2].isdigit()}
    if not blocks or max(blocks) > 12:
        return None
    return 2 ** (max(blocks) + 3)


def _shape(sd: Mapping[str, torch.Tensor], key: str, dim: int) -> int | None:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or t.dim() <= dim:
        return None
    return int(t.shape[dim])


def _vote(values: list[int | None], default: int) -> int:
    """The value most keys agree on (ties go to the published default), so that one odd tensor is reported as
    the odd one instead of reshaping the whole model around it."""
    from collections import Counter

    counts = Counter(v for v in values if v is not None and v > 0)
    if not counts:
        return default
    best = max(counts.values())
    tied = [v for v, c in counts.items() if c == best]
    return default if default in tied else tied[0]


def config_from_state_dict(sd: Mapping[str, torch.Tensor], size: int) -> LIAConfig:
    """Read style/motion dims and the channel table off the shapes, each by a vote of every key that carries it;
    official values where no key does."""
    d = LIAConfig(size=size)
    mods = [k for k in sd if k.endswith("modulation.weight")]
    style = _vote(
        [_shape(sd, "dec.direction.weight", 0)]
        + [_shape(sd, f"enc.fc.{i}.weight", 1) for i in range(5)]
        + [_shape(sd, f"enc.fc.{i}.weight", 0) for i in range(4)]
        + [_shape(sd, k, 1) for k in mods],
        d.style_dim,
    )
    motion = _vote(
        [_shape(sd, "dec.direction.weight", 1), _shape(sd, "enc.fc.4.weight", 0), _shape(sd, "enc.fc.4.bias", 0)],
        d.motion_dim,
    )
    cap = _vote([_shape(sd, "dec.input.input", 1), _shape(sd, "dec.conv1.conv.weight", 1)], d.channel_cap)
    enc_top = _shape(sd, "enc.net_app.convs.0.0.weight", 0)
    dec_top = _shape(sd, f"dec.convs.{2 * (size.bit_length() - 4)}.conv.weight", 1)
    base = enc_top * size if enc_top else d.channel_base
    mult = max(1, dec_top // enc_top) if enc_top and dec_top else d.channel_multiplier
    try:
        return LIAConfig(
            size=size, style_dim=style, motion_dim=motion, channel_cap=cap, channel_base=base, channel_multiplier=mult
        )
    except (ValueError, TypeError):
        return d


def _candidates(sd: Mapping[str, torch.Tensor], size: int) -> list[LIAConfig]:
    """Configs a state dict of this size may have been made for: the one read off its shapes, the official one
    and the presets of that size (in that order of preference)."""
    from .model import PRESETS

    out = [config_from_state_dict(sd, size), LIAConfig(size=size)]
    out += [c for c in PRESETS.values() if c.size == size]
    return list(dict.fromkeys(out))


def _expected(cfg: LIAConfig) -> dict[str, torch.Tensor] | None:
    """The state dict layout of an LIA of this config (on the meta device: no memory), None when the config
    does not build (a corrupt config: negative or absurd sizes)."""
    try:
        with torch.device("meta"):
            return LIA(cfg).state_dict()
    except (RuntimeError, ValueError, TypeError, OverflowError, ZeroDivisionError, MemoryError):
        return None


def _group(keys: list[str]) -> list[str]:
    """Keys grouped by the numbered block they belong to: 'dec.to_flows.3.* (5 keys: bias, conv.weight, …)'."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        cut = next((i + 1 for i, p in enumerate(parts[:-1]) if p.isdigit()), len(parts) - 1)
        groups.setdefault(".".join(parts[:cut]), []).append(".".join(parts[cut:]))
    out = []
    for prefix, rest in groups.items():
        if len(rest) == 1:
            out.append(f"{prefix}.{rest[0]}" if prefix else rest[0])
        else:
            shown = ", ".join(rest[:4]) + (", …" if len(rest) > 4 else "")
            out.append(f"{prefix}.* ({len(rest)} keys: {shown})")
    return out


def state_dict_mismatch(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, object], *, what: str, hints: list[str] | tuple = ()
) -> str | None:
    """The one report of a state dict that does not fit a model (shared by the LIA and LMDM loaders): missing
    keys and unexpected keys grouped by block, wrong shapes with both shapes, entries that are not tensors, then
    the `hints` (what the keys do fit, what to do). None when every key is there with its shape."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    not_tensors = [k for k in expected if k in got and not isinstance(got[k], torch.Tensor)]
    shapes = [
        f"{k} {tuple(got[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if isinstance(got.get(k), torch.Tensor) and tuple(got[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes or not_tensors):
        return None
    lines = [f"the state dict does not fit {what}:"]
    if shapes:
        lines.append(f"  wrong shapes ({len(shapes)}): " + _fmt(shapes, 4))
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + _fmt(_group(missing), 8))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + _fmt(_group(unexpected), 8))
    if not_tensors:
        lines.append(f"  not tensors ({len(not_tensors)}): " + _fmt(not_tensors, 4))
    lines += [f"  {h}" for h in hints]
    return "\n".join(lines)


def check_state_dict(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, object], *, what: str, hints: list[str] | tuple = ()
) -> None:
    """Raise CheckpointError with state_dict_mismatch's report when `got` does not fit `expected`."""
    report = state_dict_mismatch(expected, got, what=what, hints=hints)
    if report is not None:
        raise CheckpointError(report)


def _mismatches(expected: Mapping[str, torch.Tensor] | None, sd: Mapping[str, torch.Tensor]) -> int:
    if expected is None:
        return 1 << 30
    return sum(k not in sd or tuple(sd[k].shape) != tuple(v.shape) for k, v in expected.items()) + sum(
        k not in expected for k in sd
    )


def _fmt(keys: list, limit: int = 8) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(str, keys[:limit])) + more


def build_lia(sd: Mapping[str, torch.Tensor], *, size: int | None = None, config: dict | None = None) -> LIA:
    """Build an LIA on CPU and load sd strictly; a mismatch lists missing, unexpected and mis-shaped keys and
    names the size the keys fit. Without a config, the shapes are read off the keys by majority, so one wrongly
    shaped tensor is named as such."""
    sd = _strip_prefix(dict(sd))
    fits = size_from_keys(sd)
    if config is not None:
        try:
            cfg = LIAConfig.from_dict(config)
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"the checkpoint's config does not describe an animator ({e})") from None
        if size is not None and size != cfg.size:
            raise CheckpointError(f"size={size} was asked for but the checkpoint's config says size {cfg.size}")
        expected = _expected(cfg)
    else:
        chosen = size or fits
        if chosen is None:
            raise CheckpointError(
                "cannot tell the animator size: the state dict has no 'dec.to_flows.*' keys, so it is not an LIA "
                f"generator state dict (first keys: {_fmt(sorted(sd), 5)})"
            )
        if chosen != fits:
            cfg = LIAConfig(size=chosen)
            expected = _expected(cfg)
        else:
            scored = [(c, _expected(c)) for c in _candidates(sd, chosen)]
            cfg, expected = min(scored, key=lambda ce: _mismatches(ce[1], sd))
    if expected is None:
        raise CheckpointError(f"the checkpoint's config {cfg} does not describe a buildable animator")
    hints = []
    if fits is not None and fits != cfg.size:
        hints.append(f"the keys fit size {fits}: pass size={fits} (--size {fits}) or leave the size out")
    elif fits is None:
        hints.append("the keys fit no animator size: is this an LIA generator checkpoint?")
    check_state_dict(expected, sd, what=f"an LIA animator of size {cfg.size}", hints=hints)
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(
            f"the checkpoint's tensor {bad} holds NaN or inf values: the file is corrupt (or training diverged); "
            "use another checkpoint"
        )
    model = LIA(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # dtypes that cannot be copied (complex, bool …)
        raise CheckpointError(f"the state dict does not load into an LIA animator ({str(e)[:300]})") from None
    return model


def save_lia(model: LIA, path: str | os.PathLike) -> Path:
    """Write leo_rt's format: directory `path` with model.safetensors + config.json, each written to a temporary
    file and renamed, so a failure leaves no half-written checkpoint (leo_rt.config.ModelConfig.save_checkpoint)."""
    return model.cfg.save_checkpoint(path, model.state_dict())


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
