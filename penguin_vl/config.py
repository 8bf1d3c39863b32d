"""Configuration of the Penguin-VL vision encoder, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from penguin_vl.hub import ModelNotFoundError, resolve

__all__ = ["PenguinEncoderConfig", "ProjectorConfig", "find_vision_config"]

ENCODER_MODEL_TYPE = "penguinvl_vision_encoder"
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Entries of a full Penguin-VL config.json that name the vision encoder by path or hub id.
_ENCODER_PATH_KEYS = ("vision_encoder", "mm_vision_encoder")
# The JSON type of each field. A value of another type is refused, never converted: int(2.5) or int("16")
# would build another model than the file describes. An integral float (64.0) is refused too: a writer that
# means a count writes 64, and "integers only" is a rule a reader can check by eye, where "floats that happen
# to be whole" is not. A boolean is no number here although Python's bool is an int.
_KINDS: dict[str, type] = {
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "head_dim": int,
    "rms_norm_eps": float,
    "rope_theta": float,
    "patch_size": int,
    "num_channels": int,
    "attention_bias": bool,
}
# Qwen3 reads null here as absent: as many KV heads as query heads, head_dim = hidden_size // heads.
_NULL_MEANS_ABSENT = ("num_key_value_heads", "head_dim")
_QWEN3_ROPE_THETA = 10000.0
_JSON_TYPES = {
    bool: "a boolean", int: "an integer", float: "a float", str: "a string",
    type(None): "null", list: "an array", dict: "an object",
}  # fmt: skip


@dataclass(frozen=True)
class PenguinEncoderConfig:
    """Shapes of the encoder; defaults are the released encoder (Qwen3-0.6B dims)."""

    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    patch_size: int = 14
    num_channels: int = 3
    attention_bias: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in _KINDS:
            object.__setattr__(self, name, _checked(name, getattr(self, name)))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for the 2D rotary, got {self.head_dim}")

    @property
    def patch_dim(self) -> int:
        """Length of one ``pixel_values`` row: ``C * p * p``."""
        return self.num_channels * self.patch_size**2

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PenguinEncoderConfig:
        """Build from an encoder config dict (or a full Penguin-VL config holding one nested)."""
        d = find_vision_config(d)
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"config: missing fields {missing}")
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is not None:
            raise NotImplementedError(
                f"config: rope_scaling={rope_scaling!r} is not implemented; the Penguin-VL encoder uses "
                "plain 2D rotary embeddings (rope_scaling: null)"
            )
        values = {
            name: d[name] for name in _KINDS if name in d and not (d[name] is None and name in _NULL_MEANS_ABSENT)
        }
        heads = _checked("num_attention_heads", values["num_attention_heads"])
        values.setdefault("num_key_value_heads", heads)
        values.setdefault("head_dim", _checked("hidden_size", values["hidden_size"]) // heads)
        values.setdefault("rope_theta", _QWEN3_ROPE_THETA)
        return cls(
            **values,
            extra={k: v for k, v in d.items() if k not in cls.__dataclass_fields__},
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PenguinEncoderConfig:
        """Read ``config.json`` in ``path`` (a directory or the file itself).

        For a full Penguin-VL checkpoint whose ``config.json`` carries no nested vision config, the
        encoder's own ``config.json`` is read where its ``vision_encoder`` / ``mm_vision_encoder`` entry
        points (a path relative to the checkpoint or absolute, a directory of that name inside the
        checkpoint, or a hub id in the local Hugging Face cache), else from a sub-directory.
        """
        return cls.from_dict(_load_config_dict(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update({k: v for k, v in asdict(self).items() if k != "extra"})
        d["model_type"] = ENCODER_MODEL_TYPE
        d["rope_scaling"] = None
        return d


@dataclass(frozen=True)
class ProjectorConfig:
    """Penguin-VL's projector: ``in_dim -> out_dim -> out_dim`` with an erf GELU between."""

    in_dim: int
    out_dim: int


def _checked(name: str, value: object) -> int | float | bool:
    """``value`` if it has field ``name``'s JSON type and range; an integer given for a float field becomes one."""
    kind = _KINDS[name]
    if kind is bool:
        fits, expected = isinstance(value, bool), "true or false"
    elif kind is int:
        fits, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        fits, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if not fits:
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise TypeError(f"config: {name} must be {expected}, got {value!r} ({got})")
    if kind is int and value < 1:
        raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
    if kind is float and not 0 < value < math.inf:
        raise ValueError(f"config: {name} must be a positive finite number, got {value!r}")
    return float(value) if kind is float else value


def _is_encoder_config(d: Mapping[str, Any]) -> bool:
    if d.get("model_type") == ENCODER_MODEL_TYPE:
        return True
    return all(k in d for k in _REQUIRED) and "patch_size" in d


def find_vision_config(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the encoder config inside ``d``: ``d`` itself, or a nested vision config of a full model."""
    if _is_encoder_config(d):
        return d
    found = []
    for key, value in d.items():
        if isinstance(value, Mapping):
            try:
                found.append((key, find_vision_config(value)))
            except ValueError:
                continue
    if not found:
        raise ValueError(
            "config: no vision encoder config found (expected model_type "
            f"{ENCODER_MODEL_TYPE!r} or a nested vision config with {list(_REQUIRED)} and patch_size)"
        )
    if len(found) > 1:
        raise ValueError(f"config: several nested vision configs found under {[k for k, _ in found]}")
    return found[0][1]


def _load_config_dict(path: Path) -> Mapping[str, Any]:
    file = path if path.is_file() else path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    d = json.loads(file.read_text())
    try:
        find_vision_config(d)
        return d
    except ValueError as error:
        not_found = error
    for key in _ENCODER_PATH_KEYS:
        if isinstance(d.get(key), str):
            return _named_encoder_config(file, key, d[key])
    for sub in sorted(p for p in file.parent.iterdir() if (p / "config.json").is_file()):
        sub_d = json.loads((sub / "config.json").read_text())
        if _is_encoder_config(sub_d):
            return sub_d
    raise ValueError(f"{file}: {not_found} (nor a sub-directory with the encoder's config.json)")


def _named_encoder_config(file: Path, key: str, spec: str) -> Mapping[str, Any]:
    """The encoder config that ``config.json``'s entry ``key`` names: a directory, or a hub id in the cache."""
    root = file.parent
    given = Path(spec).expanduser()
    candidates = [root / given, given, root / given.name]
    tried = []
    for directory in candidates:
        if directory not in tried:
            tried.append(directory)
            if (directory / "config.json").is_file():
                return find_vision_config(json.loads((directory / "config.json").read_text()))
    try:
        return find_vision_config(json.loads((resolve(spec) / "config.json").read_text()))
    except ModelNotFoundError as error:
        places = ", ".join(str(p / "config.json") for p in tried)
        raise FileNotFoundError(
            f"{file}: {key}={spec!r} names the vision encoder, but none of {places} exists, nor is it a "
            f"model in the local Hugging Face cache ({error})"
        ) from None
