"""The one base of leo_rt's model configs (the animator's :class:`~leo_rt.model.LIAConfig` and the LMDM's
:class:`~leo_rt.lmdm.LMDMConfig`): presets by name, a JSON-able dict and back, and the checkpoint directory.

:class:`DictConfig` is the dict part alone (any frozen dataclass of settings): ``to_dict`` / ``from_dict`` with
unknown fields and values of the wrong type refused by name. :class:`ModelConfig` adds presets and the checkpoint
directory. A model config is a frozen dataclass naming its kind and file format in the class statement, with its
presets registered once after it::

    @dataclass(frozen=True)
    class LMDMConfig(ModelConfig, kind="LMDM", format_name="leo_rt.lmdm"):
        chunk: int = 64
        ...

    LMDM_PRESETS = LMDMConfig.register_presets({"lmdm-tiny": LMDMConfig(chunk=16, ...)})

A checkpoint directory holds ``model.safetensors`` (the state dict, with ``{"format": format_name}`` and, where
the config names a ``metadata_key``, the config as JSON in its metadata) and ``config.json``::

    {"format": format_name, "version": 1, "config": {...to_dict()...}, ...extra entries (e.g. "step")}

Both files are written atomically (weights first) by :func:`leo_rt.files.save_checkpoint_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from .errors import CheckpointError, InputError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

D = TypeVar("D", bound="DictConfig")
C = TypeVar("C", bound="ModelConfig")


class DictConfig:
    """Mixin for dataclasses of settings: a JSON-able dict and back. Subclasses name their `kind` (the word
    error messages use) in the class statement: ``class ClusterConfig(DictConfig, kind="cluster")``."""

    kind: ClassVar[str] = "config"

    def __init_subclass__(cls, *, kind: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if kind is not None:
            cls.kind = kind

    def to_dict(self) -> dict:
        """Field → value, JSON-able (tuples as lists, nested configs as dicts), in field order."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[D], d: Mapping) -> D:
        """The config a dict describes (as written by to_dict); fields it leaves out keep their defaults. Unknown
        fields and values of the wrong type (judged by the field's default) are an InputError naming them."""
        if not isinstance(d, Mapping):
            raise InputError(f"a {cls.kind} config must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise InputError(f"unknown {cls.kind} config fields {sorted(unknown)}; known fields: {sorted(fields)}")
        return cls(**{name: _coerce(cls.kind, name, value, _example(fields[name])) for name, value in d.items()})


class ModelConfig(DictConfig):
    """Mixin for frozen dataclass model configs: presets and the checkpoint directory. Subclasses name `kind`,
    `format_name` (the checkpoint format), and optionally `format_version` and `metadata_key` in the class
    statement."""

    format_name: ClassVar[str]
    format_version: ClassVar[int]
    metadata_key: ClassVar[str | None]
    _presets: ClassVar[dict[str, Any]]

    def __init_subclass__(
        cls, *, kind: str, format_name: str, format_version: int = 1, metadata_key: str | None = None, **kw
    ):
        super().__init_subclass__(kind=kind, **kw)
        cls.format_name, cls.format_version, cls.metadata_key = format_name, format_version, metadata_key
        cls._presets = {}

    # ------------------------------------------------------------------------------------------------ presets

    @classmethod
    def register_presets(cls: type[C], presets: Mapping[str, C]) -> dict[str, C]:
        """Add named presets (once, at import); returns the table of all presets of this config class."""
        for name, cfg in presets.items():
            if not isinstance(cfg, cls):
                raise TypeError(f"preset {name!r} is a {type(cfg).__name__}, not a {cls.__name__}")
            cls._presets[name] = cfg
        return cls._presets

    @classmethod
    def presets(cls: type[C]) -> dict[str, C]:
        return dict(cls._presets)

    @classmethod
    def from_name(cls: type[C], name: str) -> C:
        if name not in cls._presets:
            raise InputError(f"unknown {cls.kind} preset {name!r}; choose one of {sorted(cls._presets)}")
        return cls._presets[name]

    # ------------------------------------------------------------------------------------------------ files

    def save_checkpoint(
        self, path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], extra: Mapping | None = None
    ) -> Path:
        """Directory `path` with the weights and config.json (see the module docstring), each written to a
        temporary file and renamed, so a failure leaves no half-written checkpoint."""
        from .files import save_checkpoint_dir

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"{path} exists and is not a directory; leo_rt checkpoints are directories")
        config = {"format": self.format_name, "version": self.format_version, "config": self.to_dict(), **(extra or {})}
        metadata = {self.metadata_key: json.dumps(self.to_dict())} if self.metadata_key else {}
        metadata["format"] = self.format_name
        return save_checkpoint_dir(path, dict(state_dict), config, metadata, WEIGHTS_FILE, CONFIG_FILE)

    @classmethod
    def read_checkpoint_meta(cls, path: str | os.PathLike, *, how: str) -> dict:
        """config.json of a checkpoint directory of this format, checked: a missing file, bad JSON or another
        format is a CheckpointError (`how` says how to make the right one)."""
        path = Path(path)
        cfg_path = path / CONFIG_FILE
        if not path.is_dir() or not cfg_path.is_file() or not (path / WEIGHTS_FILE).is_file():
            raise CheckpointError(
                f"{path} is not an {cls.kind} checkpoint directory (expected {CONFIG_FILE} and {WEIGHTS_FILE}); {how}"
            )
        try:
            meta = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{cfg_path} is not a leo_rt config (a JSON object)")
        if meta.get("format") != cls.format_name:
            raise CheckpointError(
                f"{path} holds a {meta.get('format', 'unknown')!r} checkpoint, not an {cls.kind} "
                f"({cls.format_name!r}); pass an animator checkpoint with --checkpoint and an LMDM directory with "
                "--lmdm"
            )
        return meta

    @classmethod
    def load_checkpoint(cls: type[C], path: str | os.PathLike, *, how: str) -> tuple[C, dict[str, torch.Tensor], dict]:
        """(config, state dict, config.json) of a checkpoint directory of this format; every failure to read it is
        a CheckpointError."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        meta = cls.read_checkpoint_meta(path, how=how)
        try:
            cfg = cls.from_dict(meta.get("config", {}))
        except (InputError, TypeError) as e:
            raise CheckpointError(
                f"the config in {Path(path) / CONFIG_FILE} is not a valid {cls.kind} config ({e})"
            ) from None
        weights = Path(path) / WEIGHTS_FILE
        try:
            sd = load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"could not read {weights} ({e}): the file is truncated or corrupt") from None
        return cfg, sd, meta


def _example(f: dataclasses.Field) -> Any:
    """The field's default value (made by its factory if it has one), or MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _jsonable(value: Any) -> Any:
    if isinstance(value, DictConfig):
        return value.to_dict()
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _coerce(kind: str, name: str, value: Any, default: Any) -> Any:
    """`value` as the type of the field's default: lists become tuples, ints are taken for floats, a dict becomes
    a nested config; a field without a default, or whose default is None, takes the value as it is."""
    if default is None or default is dataclasses.MISSING:
        return value
    if isinstance(default, DictConfig) and isinstance(value, Mapping):
        return type(default).from_dict(value)
    want = type(default)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{kind} config field {name!r} must be a list, got {value!r}")
        if not default:
            return tuple(value)
        return tuple(_coerce(kind, f"{name}[{i}]", v, default[0]) for i, v in enumerate(value))
    if isinstance(value, bool) != isinstance(default, bool):
        raise InputError(f"{kind} config field {name!r} must be of type {want.__name__}, got {value!r}")
    if want is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, want):
        raise InputError(f"{kind} config field {name!r} must be of type {want.__name__}, got {value!r}")
    return value
