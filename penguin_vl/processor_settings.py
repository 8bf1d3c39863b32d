"""The preprocessor's settings: the keys of the upstream ``preprocessor_config.json`` it reads, checked."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from penguin_vl.hub import resolve

__all__ = ["CONFIG_NAME", "ProcessorSettings"]

CONFIG_NAME = "preprocessor_config.json"
RELEASED_MEAN = (0.5, 0.5, 0.5)
RELEASED_STD = (0.5, 0.5, 0.5)
CHANNELS = 3


def _per_channel(value: Any, name: str) -> tuple[float, ...]:
    values = (value,) * CHANNELS if isinstance(value, (int, float)) else tuple(value)
    if len(values) != CHANNELS or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be one finite number or {CHANNELS} of them, got {value!r}")
    return tuple(float(v) for v in values)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_bicubic(resample: Any) -> None:
    bicubic = int(Image.Resampling.BICUBIC)
    ok = resample == bicubic if not isinstance(resample, str) else resample.lower() == "bicubic"
    if isinstance(resample, bool) or not ok:
        raise ValueError(f"resample must be BICUBIC ({bicubic} or 'bicubic'), got {resample!r}")


def _check_fixed(name: str, value: Any) -> None:
    if value is not True:
        raise ValueError(f"{name}={value!r} is not supported: the encoder expects resized RGB images")


@dataclass(frozen=True)
class ProcessorSettings:
    """What determines the preprocessor's output, with the upstream names, checked on construction.

    Defaults are the released settings: ``patch_size`` 14, ``min_tokens`` 16 and ``max_tokens`` 16384
    (per image or frame, in tokens after merging: one per ``(patch_size * merge_size)``-pixel square, so
    ``merge_size**2`` patches each; at merge size 1, patches), ``image_mean`` and ``image_std`` 0.5 (one
    number or one per channel), ``rescale_factor`` 1/255; ``do_rescale`` and ``do_normalize`` may be
    switched off. The resize is always BICUBIC of RGB images (the upstream ``resample``, ``do_resize``
    and ``do_convert_rgb`` keys are checked to say so, not kept).
    """

    patch_size: int = 14
    min_tokens: int = 16
    max_tokens: int = 16384
    image_mean: tuple[float, ...] = RELEASED_MEAN
    image_std: tuple[float, ...] = RELEASED_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        checked = {
            "patch_size": _positive_int(self.patch_size, "patch_size"),
            "min_tokens": _positive_int(self.min_tokens, "min_tokens", minimum=0),
            "max_tokens": _positive_int(self.max_tokens, "max_tokens"),
            "image_mean": _per_channel(self.image_mean, "image_mean"),
            "image_std": _per_channel(self.image_std, "image_std"),
        }
        if checked["min_tokens"] > checked["max_tokens"]:
            raise ValueError(
                f"min_tokens={checked['min_tokens']} > max_tokens={checked['max_tokens']}: no size meets both budgets"
            )
        if 0.0 in checked["image_std"]:
            raise ValueError(f"image_std must be nonzero, got {checked['image_std']}")
        rescale = self.rescale_factor
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)):
            raise ValueError(f"rescale_factor must be a number, got {rescale!r}")
        if not (math.isfinite(rescale) and rescale > 0):
            raise ValueError(f"rescale_factor must be finite and positive, got {rescale!r}")
        checked["rescale_factor"] = float(rescale)
        for name in ("do_rescale", "do_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ProcessorSettings:
        """From the upstream keys of ``preprocessor_config.json``: missing keys take the released values,
        keys this processor does not use are ignored."""
        _check_bicubic(config.get("resample", "bicubic"))
        for name in ("do_resize", "do_convert_rgb"):
            _check_fixed(name, config.get(name, True))
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ProcessorSettings:
        """Read ``preprocessor_config.json`` from a checkpoint directory, that file itself, or a hub id in the
        local Hugging Face cache (nothing is downloaded)."""
        file = Path(path).expanduser()
        if not file.exists():
            file = resolve(path, needs=CONFIG_NAME)
        if file.is_dir():
            file = file / CONFIG_NAME
        try:
            config = json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no {CONFIG_NAME} at {os.fspath(path)!r}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(file)!r} is not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{os.fspath(file)!r} must hold a JSON object, got {type(config).__name__}")
        return cls.from_config(config)

    def with_budget(self, min_tokens: int | None = None, max_tokens: int | None = None) -> ProcessorSettings:
        """These settings with the token budget replaced where a value is given."""
        return dataclasses.replace(
            self,
            min_tokens=self.min_tokens if min_tokens is None else min_tokens,
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
        )

    def to_config(self) -> dict[str, Any]:
        """The upstream ``preprocessor_config.json`` keys of these settings."""
        return {
            "patch_size": self.patch_size,
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": int(Image.Resampling.BICUBIC),
            "do_convert_rgb": True,
            "do_resize": True,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
        }

    def metadata(self) -> dict[str, Any]:
        """The settings as written into feature files: a rescale that is off is ``None``."""
        return {
            "patch_size": self.patch_size,
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor if self.do_rescale else None,
            "normalize": self.do_normalize,
        }
