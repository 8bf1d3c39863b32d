"""Configuration of the Penguin-VL vision encoder, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
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
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "patch_size",
            "num_channels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
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
        heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim")
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim) if head_dim else int(d["hidden_size"]) // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            patch_size=int(d.get("patch_size", 14)),
            num_channels=int(d.get("num_channels", 3)),
            attention_bias=bool(d.get("attention_bias", False)),
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
