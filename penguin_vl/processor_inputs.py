"""What the preprocessor takes: each input checked and turned into an item (its size, its frame
count and how to read its pixels), with errors that name it.

PIL images of any mode PIL converts to RGB (animated or multi-page ones refused, 16-bit ones clipped
as the reference clips them, with an :class:`ImageWarning`), paths to image files (read lazily, in
the worker that processes them), and uint8 arrays (numpy or torch) laid out ``[H, W, 3]``, or
``[T, H, W, 3]`` for a clip given as one item. Videos are items of their own (:func:`_video`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from penguin_vl.processor_settings import CHANNELS
from penguin_vl.video import Video, is_video_file, load_video

__all__ = ["ImageInput", "ImageWarning"]

# what PIL raises on files it cannot identify or decode
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

ImageInput = Any  # PIL.Image.Image | str | os.PathLike | np.ndarray | torch.Tensor


@dataclass
class _Item:
    """One input: where it came from (for errors), its size, its frame count and how to read its pixels."""

    where: str
    height: int
    width: int
    frames: int
    read: Callable[[], np.ndarray]  # uint8 [H, W, 3] or [T, H, W, 3]

    def __post_init__(self) -> None:
        if 0 in (self.height, self.width, self.frames):
            raise ValueError(f"{self.where}: empty image ({self.frames} x {self.height} x {self.width}, T x H x W)")


class ImageWarning(UserWarning):
    """An image processed as the reference processes it, though the result is probably not what was meant."""


# modes whose samples exceed 8 bits; PIL's convert("RGB") clips them (the reference's result, kept)
_DEEP_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def _culprit(where: str, image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return os.fspath(filename) if filename else where


def _check_picture(image: Image.Image, where: str) -> None:
    """One picture of 8-bit samples: an animated (or multi-page) image is refused, not cut to its first frame;
    a 16-bit one keeps the reference's clipped result, with a warning."""
    try:
        frames = getattr(image, "n_frames", 1)
    except _DECODE_ERRORS:  # a damaged file: decoding it says what is wrong
        frames = 1
    if frames > 1:
        raise ValueError(
            f"{_culprit(where, image)}: an animated or multi-page image ({frames} frames); as an image it would "
            "be encoded as its first frame only. Encode its frames as a video (penguin_vl.load_video), or pass "
            "the one frame meant (image.convert('RGB') after image.seek(n))"
        )
    if image.mode in _DEEP_MODES:
        warnings.warn(
            f"{_culprit(where, image)}: more than 8 bits per sample (mode {image.mode}, e.g. a 16-bit PNG); "
            "converted to RGB as the reference does, which clips every value above 255 to white; scale it to "
            "8 bits first for a faithful encoding",
            ImageWarning,
            stacklevel=2,
        )


def _pil_pixels(image: Image.Image, where: str) -> np.ndarray:
    try:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb)
    except _DECODE_ERRORS as e:
        raise ValueError(f"{where}: cannot read the image as RGB ({e})") from e


def _path_item(path: str | os.PathLike, where: str) -> _Item:
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file {os.fspath(path)!r}") from None
    except _DECODE_ERRORS as e:
        raise ValueError(f"{where}: cannot open {os.fspath(path)!r} as an image ({e})") from e
    with image:
        width, height = image.size
        _check_picture(image, where)

    def read() -> np.ndarray:
        with Image.open(path) as image:
            try:
                image.load()
            except _DECODE_ERRORS as e:
                raise ValueError(f"{where}: cannot decode {os.fspath(path)!r} ({e})") from e
            return _pil_pixels(image, where)

    return _Item(where, height, width, 1, read)


def _array_item(array: np.ndarray, where: str, allow_clip: bool, parity: bool) -> _Item:
    if array.dtype != np.uint8:
        raise TypeError(f"{where}: arrays must be uint8 (values 0..255), got {array.dtype}")
    if array.ndim not in ((3, 4) if allow_clip else (3,)):
        layout = "[H, W, 3] or a clip [T, H, W, 3]" if allow_clip else "[H, W, 3]"
        raise ValueError(f"{where}: arrays must be {layout}, got shape {list(array.shape)}")
    if array.shape[-1] != CHANNELS:
        raise ValueError(f"{where}: expected {CHANNELS} channels (RGB, channels last), got shape {list(array.shape)}")
    if parity and array.shape[-3] in (1, 3):
        # the reference guesses the layout and reads a height of 1 or 3 as a channel axis
        raise ValueError(
            f"{where}: an array of height {array.shape[-3]} is ambiguous to the reference (it would read it "
            "as channels-first); pass a PIL image, or use ImageProcessor.batch"
        )
    frames = array.shape[0] if array.ndim == 4 else 1
    return _Item(where, array.shape[-3], array.shape[-2], frames, lambda: array)


def _video(value: ImageInput) -> Video | None:
    """``value`` as a video: a :class:`Video` as is, a video file read with the released sampling."""
    if isinstance(value, Video):
        return value
    if isinstance(value, (str, os.PathLike)) and is_video_file(value):
        return load_video(value)
    return None


def _item(value: ImageInput, where: str, allow_clip: bool, parity: bool) -> _Item:
    if isinstance(value, Video) or (isinstance(value, (str, os.PathLike)) and is_video_file(value)):
        raise ValueError(f"{where}: a video is one item of its own: give it alone, or in ImageProcessor.batch")
    if isinstance(value, Image.Image):
        _check_picture(value, where)
        width, height = value.size
        item = _Item(where, height, width, 1, lambda: _pil_pixels(value, where))
        # decoded here, once: a lazily loaded image read by several pool threads at a time would race
        try:
            value.load()
        except _DECODE_ERRORS as e:
            raise ValueError(f"{where}: cannot decode the image ({e})") from e
        return item
    if isinstance(value, (str, os.PathLike)):
        return _path_item(value, where)
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.uint8:
            raise TypeError(f"{where}: tensors must be uint8 (values 0..255), got {value.dtype}")
        return _array_item(value.detach().cpu().numpy(), where, allow_clip, parity)
    if isinstance(value, np.ndarray):
        return _array_item(value, where, allow_clip, parity)
    raise TypeError(
        f"{where}: expected a PIL image, a path, or a uint8 numpy array or torch tensor, got {type(value).__name__}"
    )
