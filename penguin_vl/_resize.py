"""Pillow's 8-bit BICUBIC resize fused with the rescale, normalisation and patch layout of the preprocessor.

Two paths give the same bits (the tests compare them with each other and with the goldens):

- compiled: ``csrc/resize.c``, built on first use by :mod:`penguin_vl._native`, resizes and writes the
  normalised patch rows in one pass over the image, with Pillow's filter (:func:`bicubic_coefficients`)
  and pass order (:func:`vertical_first`) passed in from here;
- Pillow: where no C compiler is found (or ``PENGUIN_VL_NATIVE=0``), Pillow's own ``Image.resize``,
  which is what the reference calls, then one normalise-and-patch step in float32 (:class:`Normalisation`).

Pillow resizes a uint8 image in two separable passes, each a fixed-point filter
(``src/libImaging/Resample.c``). Per axis, with ``scale = in / out`` and ``fs = max(scale, 1)``:

    centre(i) = (i + 0.5) * scale,  support = 2 * fs
    taps      = int(centre - support + 0.5) .. int(centre + support + 0.5), clamped to [0, in)
    w_k       = cubic((tap_k - centre + 0.5) / fs), a = -0.5, divided by sum_k w_k (in double)
    W_k       = int(w_k * 2**22 +- 0.5)                       (rounded half away from zero)
    out(i)    = clamp((2**21 + sum_k pixel(tap_k) * W_k) >> 22, 0, 255)

The accumulator fits an int32: pixels are at most 255 and the weights of one output sum to 2**22,
their positive part below 1.2 * 2**22 and their negative part above -0.2 * 2**22 (the cubic's
lobes; the tests check these bounds). The uint8 result of the first pass feeds the second, and a
pass whose size does not change is skipped. The rounding in between makes the order part of the
result: Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
pixels as the width (:func:`vertical_first`), the horizontal pass first otherwise. The compiled path
follows Pillow 13, the reference's; the Pillow path follows the installed Pillow.

Measured on one thread of the development machine (AMD EPYC 7B13) for a 1080 x 1920 photo to
1078 x 1918: compiled 21 ms; Pillow's resize ~42 ms plus ~8 ms for the normalise-and-patch step
with the released settings (float32 ops), ~17 ms through the lookup table otherwise.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from penguin_vl._native import library, status

__all__ = [
    "Normalisation",
    "ResizeBackend",
    "backend",
    "bicubic_coefficients",
    "resize_bicubic",
    "resize_to_patches",
    "vertical_first",
]

PRECISION_BITS = 22


def _cubic(x: np.ndarray) -> np.ndarray:
    # a = -0.5, in Pillow's operation order so that every double matches
    x = np.abs(x)
    inner = (1.5 * x - 2.5) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def bicubic_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's 8-bit BICUBIC filter for one axis.

    Returns ``(first, count, weights)``: output ``i`` reads input samples ``first[i] ..
    first[i] + count[i] - 1`` with int32 fixed-point weights ``weights[i, :count[i]]`` (zero beyond);
    ``weights`` is ``[out_size, ksize]``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    count = np.minimum((centre + support + 0.5).astype(np.int64), in_size) - first
    inv_filterscale = 1.0 / filterscale
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):
        w = np.where(k < count, _cubic(((first + k) - centre + 0.5) * inv_filterscale), 0.0)
        weights[:, k] = w
        total = total + w  # in tap order, as Pillow sums
    nonzero = total != 0.0
    weights[nonzero] /= total[nonzero, None]
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return first, count, fixed


def vertical_first(in_height: int, in_width: int, out_height: int, out_width: int) -> bool:
    """Pillow 13's pass order: vertical first when the height shrinks by more than twice the width's shrink."""
    return in_height - out_height > 0 and in_height - out_height > 2 * (in_width - out_width)


@dataclass(frozen=True)
class ResizeBackend:
    """Which resize the preprocessor runs: ``name`` is ``"compiled"`` (``csrc/resize.c``) or ``"pillow"``
    (Pillow's ``Image.resize``), ``reason`` says why (the library's path, or why it is not in use)."""

    name: str
    reason: str


def backend() -> ResizeBackend:
    """The resize in use now (builds the compiled one on the first call, as a resize would)."""
    lib = library()
    return ResizeBackend("compiled" if lib is not None else "pillow", status())


class Normalisation:
    """The reference's rescale and normalisation of a uint8 value ``v`` of channel ``c``.

    The reference computes ``float32(float64(v) * rescale)``, then ``(x - mean[c]) / std[c]`` in
    float32. :attr:`table` holds it for all 256 values (the compiled path reads it); when
    ``((v / d) - mean) / std`` in float32, with ``d = float32(1 / rescale)``, gives the same bits for
    every value (true of the released settings), :attr:`arithmetic` is set and the Pillow path
    normalises with those three ops, else it looks the values up in the table.
    """

    def __init__(self, rescale: float, mean: tuple[float, ...], std: tuple[float, ...]):
        if len(mean) != len(std):
            raise ValueError(f"image_mean and image_std differ in length: {len(mean)} != {len(std)}")
        self.channels = len(mean)
        u8 = np.arange(256, dtype=np.float64)
        x = (u8 * np.float64(rescale)).astype(np.float32)
        mean32 = np.asarray(mean, dtype=np.float32)[:, None]
        std32 = np.asarray(std, dtype=np.float32)[:, None]
        self.table = torch.from_numpy(np.ascontiguousarray((x[None, :] - mean32) / std32))  # [C, 256]
        self.divisor = float(np.float32(1.0 / rescale))
        # shaped for the channel axis of patch-ordered values [..., C, p, p]
        self.mean = torch.from_numpy(mean32).view(-1, 1, 1)
        self.std = torch.from_numpy(std32).view(-1, 1, 1)
        values = torch.arange(256, dtype=torch.float32).expand(self.channels, 256)
        self.arithmetic = torch.equal(self._arithmetic(values.reshape(self.channels, 256, 1)), self.table[..., None])

    def _arithmetic(self, values: torch.Tensor) -> torch.Tensor:
        """``(v / d - mean) / std`` in float32, channels on the third axis from the end."""
        return values.div(self.divisor).sub_(self.mean).div_(self.std)

    def patches(self, image: np.ndarray, patch: int, merge: int, out: torch.Tensor) -> None:
        """Write a uint8 ``[H, W, C]`` image (sides multiples of ``patch * merge``) as normalised patch rows
        into ``out``, float32 ``[(H / p) * (W / p), C * p * p]`` in the merge-block order of SPEC section 3."""
        height, width, channels = image.shape
        block = patch * merge
        # [H / b, m, p, W / b, m, p, C] -> [H / b, W / b, m, m, C, p, p]: one patch row per (.., m, m)
        order = (0, 3, 1, 4, 6, 2, 5)
        shape = (height // block, merge, patch, width // block, merge, patch, channels)
        ordered = image.reshape(shape).transpose(order)
        target = out.view(ordered.shape)
        if self.arithmetic:
            np.copyto(target.numpy(), ordered, casting="unsafe")  # uint8 -> float32, in patch order
            target.div_(self.divisor).sub_(self.mean).div_(self.std)
            return
        table, dst = self.table.numpy(), target.numpy()
        for c in range(channels):
            np.take(table[c], ordered[..., c, :, :], out=dst[..., c, :, :])


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or 0 in image.shape:
        raise ValueError(f"image must be a non-empty uint8 [H, W, C] array, got {image.dtype} {list(image.shape)}")


@lru_cache(maxsize=256)
def _native_filter(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """:func:`bicubic_coefficients` as the compiled resize takes them (int32, contiguous), None if the size stays."""
    if in_size == out_size:
        return None
    first, count, fixed = bicubic_coefficients(in_size, out_size)
    return first.astype(np.int32), count.astype(np.int32), np.ascontiguousarray(fixed), fixed.shape[1]


def _resize_native(
    lib: ctypes.CDLL,
    image: np.ndarray,
    out_height: int,
    out_width: int,
    out: torch.Tensor,
    table: torch.Tensor | None = None,
    patch: int = 1,
    merge: int = 1,
) -> None:
    """The compiled resize of a uint8 ``[H, W, C]`` image into ``out``: uint8 ``[H', W', C]`` rows, or with
    ``table`` (float32 ``[C, 256]``) the normalised patch rows of :func:`resize_to_patches`."""
    _check_image(image)
    if min(out_height, out_width, patch, merge) < 1:
        raise ValueError(f"sizes must be positive, got {out_height} x {out_width}, patch {patch}, merge {merge}")
    row = image.shape[1] * image.shape[2]
    if image.strides[2] != 1 or image.strides[1] != image.shape[2] or image.strides[0] < row:
        image = np.ascontiguousarray(image)  # rows may be apart, their values not
    height, width, channels = image.shape
    # the C code writes through raw pointers: everything about ``out`` is checked here
    if table is None:
        shape, dtype = (out_height, out_width, channels), torch.uint8
    else:
        table = table.contiguous()
        if table.dtype != torch.float32 or tuple(table.shape) != (channels, 256):
            raise ValueError(f"the table is {table.dtype} {list(table.shape)}, not float32 [{channels}, 256]")
        if out_height % (patch * merge) or out_width % (patch * merge):
            raise ValueError(f"{out_height} x {out_width} is not a multiple of patch * merge = {patch * merge}")
        shape, dtype = ((out_height // patch) * (out_width // patch), channels * patch * patch), torch.float32
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(
            f"the output must be a contiguous CPU {dtype} tensor of shape {list(shape)}, got "
            f"{out.dtype} {list(out.shape)} on {out.device} (contiguous: {out.is_contiguous()})"
        )
    hf = _native_filter(width, out_width)
    vf = _native_filter(height, out_height)
    h = (hf[0].ctypes.data, hf[1].ctypes.data, hf[2].ctypes.data, hf[3]) if hf else (None, None, None, 0)
    v = (vf[0].ctypes.data, vf[1].ctypes.data, vf[2].ctypes.data, vf[3]) if vf else (None, None, None, 0)
    code = lib.penguin_resize(
        image.ctypes.data,
        image.strides[0],
        height,
        width,
        channels,
        out_height,
        out_width,
        int(vertical_first(height, width, out_height, out_width)),
        *h,
        *v,
        None if table is None else table.data_ptr(),
        patch,
        merge,
        out.data_ptr(),
    )
    if code != 0:
        raise MemoryError(f"out of memory resizing a {height} x {width} image to {out_height} x {out_width}")


def _pillow_resize(image: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """Pillow's ``resize((W', H'), BICUBIC)`` of a uint8 ``[H, W, C]`` array, channel by channel unless RGB
    (Pillow would premultiply the alpha of a 2- or 4-channel image)."""
    size, bicubic = (out_width, out_height), Image.Resampling.BICUBIC
    if image.shape[2] == 3:
        return np.asarray(Image.fromarray(image, "RGB").resize(size, bicubic))
    bands = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), "L").resize(size, bicubic))
             for c in range(image.shape[2])]  # fmt: skip
    return np.stack(bands, axis=-1)


def resize_bicubic(image: np.ndarray | torch.Tensor, out_height: int, out_width: int) -> torch.Tensor:
    """Resize a uint8 ``[H, W, C]`` image exactly as Pillow 13's ``resize((W', H'), BICUBIC)`` does.

    Returns a new uint8 ``[out_height, out_width, C]`` tensor.
    """
    image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    _check_image(image)
    if out_height < 1 or out_width < 1:
        raise ValueError(f"output size must be positive, got {out_height} x {out_width}")
    lib = library()
    if lib is None:
        return torch.from_numpy(_pillow_resize(image, out_height, out_width).copy())
    out = torch.empty(out_height, out_width, image.shape[2], dtype=torch.uint8)
    _resize_native(lib, image, out_height, out_width, out)
    return out


def resize_to_patches(
    image: np.ndarray, out_height: int, out_width: int, patch: int, merge: int, norm: Normalisation, out: torch.Tensor
) -> None:
    """Resize a uint8 ``[H, W, C]`` image and write its normalised patches into ``out``.

    ``out`` is float32 ``[(out_height / patch) * (out_width / patch), C * patch * patch]``, rows in
    the merge-block order of SPEC section 3; ``out_height`` and ``out_width`` are multiples of
    ``patch * merge``.
    """
    lib = library()
    if lib is not None:
        _resize_native(lib, image, out_height, out_width, out, norm.table, patch, merge)
        return
    _check_image(image)
    norm.patches(_pillow_resize(image, out_height, out_width), patch, merge, out)
