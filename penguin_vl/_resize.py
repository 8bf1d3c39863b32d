"""Pillow's 8-bit BICUBIC resize, reproduced bit for bit, fused with the rescale, normalisation and
patch layout of the preprocessor.

:func:`resize_bicubic` and :func:`resize_to_patches` run the compiled twin of this module
(``csrc/resize.c``, the same arithmetic in C, through :mod:`penguin_vl._native`) where a C compiler
is found, and the torch ops below otherwise; both give the same bits, and the tests run both.

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
pixels as the width (:func:`vertical_first`), the horizontal pass first otherwise.

How the torch path runs. Pixels are laid out per channel (``[rows, C, W]``) and produced in strips of
output rows. A pass is a sum over taps of rows (vertical) or of columns (horizontal):

- Summing rows: when the size changes by a few pixels, a strip's output rows read a few runs of
  consecutive source rows, and each (run, tap) is one int32 ``addcmul`` of a block of rows by a
  column of weights. Otherwise it is ``embedding_bag`` with per-sample weights: each output row is a
  bag of the source rows it reads. fbgemm's float32 kernel fuses the gather and the multiply-adds,
  and it is exact here because the int32 weights are split in two halves whose products and partial
  sums stay integers (times a power of two) below 2**24 (see :class:`_Bag`). The bags also take the
  float rows of a transposed horizontal pass, which a conversion to int32 would cost more than the
  row views save.
- Summing columns: when the size changes by a few pixels (the common case, as the processor rounds
  sizes to a multiple of 14 or 28) the taps of consecutive outputs are consecutive columns, except
  at a few jumps. Each run of them is then one int32 ``addcmul`` over strided views, and nothing is
  copied. Otherwise the chunk is transposed (a 2-D blocked copy) so that columns become rows for a bag.

The last pass feeds the patch rows: floor and clamp give the uint8 value, ``((v / d) - mean) / std``
in float32 gives the normalised value bit for bit (checked for all 256 values against the
reference's ``(float32(u8 * rescale) - mean) / std``, which goes through float64), and its last op
writes through a view in the merge-block order of ``(C, p, p)`` patches. For settings where that
arithmetic is not exact, a 512-entry table indexed by the biased accumulator does the same job.

Measured on one core of the development machine (AMD EPYC 7B13, AVX2) for a 2 MP photo: an fbgemm
bag costs ~0.45 ns per output value for 4 taps, an in-cache int32 ``addcmul`` ~0.3 ns per value
per tap, a gather of single values (``index_select``) ~0.8 ns, a channels-last patch permutation
~1 ns against ~0.45 ns for the planar one.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from penguin_vl import _native

__all__ = ["Normalisation", "bicubic_coefficients", "resize_bicubic", "resize_to_patches", "vertical_first"]

PRECISION_BITS = 22
# Rounding bias of a pass: floor((acc + 2**21) / 2**22) rounds half up.
_HALF = 1 << (PRECISION_BITS - 1)
# With the table, the last pass also adds 64 so that ``acc >> 22`` lands in [0, 512): the lobes bound
# the shifted value to [-52, 307] and the biased accumulator stays below 2**31.
_TABLE_OFFSET = 64
_TABLE_SIZE = 512
# Horizontal runs (per tap), and ops per chunk, up to which strided views beat the transposed bag.
_MAX_RUNS = 16
_MAX_VIEW_OPS = 128
# Row views per strip up to which the vertical pass runs as int32 ``addcmul`` instead of bags: ~1.5-2x
# faster at the few runs of a near-identity scale, even with the bags at ~65 (a 1.14x downscale).
_MAX_ROW_VIEW_OPS = 32
# A horizontal tap with fewer nonzero weights than this fraction of the outputs is added sparsely.
_SPARSE_TAP = 0.125
# Values per strip and per chunk of the horizontal pass: fewer, larger ops amortise their overhead
# (~5 us each); 2**19 was the fastest of 2**15 .. 2**22 on a 2 MP image.
_STRIP_VALUES = 1 << 19
_CHUNK_VALUES = 1 << 19


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
class _Bag:
    """One pass as a single ``embedding_bag``: bag ``i`` is ``sum_j weight[j] * table[index[j]]`` over its entries.

    The float32 form is exact: the int32 weights are split as ``w = a * 2**s + b`` with
    ``0 <= b < 2**s``, so that ``sum |p * a|`` and ``sum p * b`` stay below 2**24 for pixels
    ``p <= 255``, and every partial sum is an integer times ``2**(s - 22)`` (the ``a`` bags) or
    ``2**-s`` (the ``b`` bags) that float32 holds exactly. One call runs the ``a`` bags, then the
    ``b`` bags. With more taps than any split allows (a downscale by more than ~100), the weights stay
    whole and the bag runs in float64, exact as well but slower.
    """

    index: torch.Tensor  # int64 entries, bag after bag
    offsets: torch.Tensor  # int64 start of every bag
    weight: torch.Tensor  # float32 or float64, per entry
    split: int  # s, or 0 for float64
    bags: int  # outputs

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def _split(weight: np.ndarray) -> int:
    """The widest split ``s`` (see :class:`_Bag`) that keeps both halves exact, or 0 for float64."""
    taps = int((weight != 0).sum(1).max())
    abs_sum = int(np.abs(weight.astype(np.int64)).sum(1).max())
    for split in range(11, 6, -1):
        # both halves within 2**24; below 7 the combined value (under 2**9) would need over 24 bits
        if taps * 255 * ((1 << split) - 1) < 1 << 24 and 255 * ((abs_sum >> split) + taps) < 1 << 24:
            return split
    return 0


def _bag(index: np.ndarray, weight: np.ndarray, split: int) -> _Bag:
    """Bags of the nonzero ``weight[i, k]`` at ``index[i, k]`` (both ``[out, K]``), split as :func:`_split` chose."""
    live = weight != 0
    if split:
        a = np.floor_divide(weight, 1 << split)
        b = weight - a * (1 << split)
        lo_live = live & (b != 0)
        entries = np.concatenate([index[live], index[lo_live]])
        values = np.concatenate([a[live] * 2.0 ** (split - PRECISION_BITS), b[lo_live] * 2.0**-split])
        counts = np.concatenate([live.sum(1), lo_live.sum(1)])
        values = values.astype(np.float32)
    else:
        entries, values, counts = index[live], weight[live] * 2.0**-PRECISION_BITS, live.sum(1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return _Bag(
        torch.from_numpy(entries.astype(np.int64)),
        torch.from_numpy(starts.astype(np.int64)),
        torch.from_numpy(values),
        split,
        weight.shape[0],
    )


def _run_bag(bag: _Bag, table: torch.Tensor, bias: int, last: bool) -> torch.Tensor:
    """``(sum + bias) / 2**22`` for every bag over the rows of ``table``, ``[out, D]``.

    Floored and clamped to 0..255 unless ``last``; a ``last`` value is left for the caller to floor.
    """
    out = F.embedding_bag(bag.index, table, bag.offsets, per_sample_weights=bag.weight, mode="sum")
    if bag.split:
        hi, lo = out[: bag.bags], out[bag.bags :]
        # floor((2**22 hi + 2**s lo + bias) / 2**22) = floor(hi + (floor(lo) + bias / 2**s) * 2**(s - 22))
        lo.floor_().add_(bias >> bag.split)
        out = hi.add_(lo, alpha=2.0 ** (bag.split - PRECISION_BITS))
    else:
        out.add_(bias * 2.0**-PRECISION_BITS)
    if not last:
        out.floor_().clamp_(0, 255)
    return out


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Split ``idx`` into ``(start, stop, idx[start])`` runs of consecutive values."""
    edges = [0, *(np.flatnonzero(np.diff(idx) != 1) + 1).tolist(), len(idx)]
    return [(a, b, int(idx[a])) for a, b in zip(edges[:-1], edges[1:], strict=True)]


@dataclass(frozen=True)
class _Horizontal:
    """Taps of the horizontal pass over a source padded with ``pad`` zero columns on each side.

    Output ``i`` reads padded columns ``base[i] + k``. ``base`` is the unclamped first tap, so its
    runs of consecutive columns break only where the scale makes the window jump, not at the borders;
    zero weights cover the taps that Pillow clamps away.
    """

    in_size: int
    out_size: int
    pad: int
    runs: tuple[tuple[int, int, int], ...]  # (start, stop, base[start]), shared by the dense taps
    dense: tuple[tuple[int, torch.Tensor], ...]  # (k, int32 weights [out])
    # (outputs, padded columns, int32 weights) of the taps that are nonzero for few outputs
    sparse: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    bag: _Bag  # the same pass over the transposed source
    transposed: bool


@lru_cache(maxsize=128)
def _horizontal(in_size: int, out_size: int) -> _Horizontal:
    first, count, fixed = bicubic_coefficients(in_size, out_size)
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    base = np.floor((np.arange(out_size) + 0.5) * scale - support + 0.5).astype(np.int64)
    shift = first - base
    ntaps = int((shift + count).max())
    weights = np.zeros((out_size, ntaps), dtype=np.int32)
    rows = np.arange(out_size)
    for k in range(fixed.shape[1]):
        live = k < count
        weights[rows[live], shift[live] + k] = fixed[live, k]
    pad = max(0, int(-base.min()), int((base + ntaps).max()) - in_size)
    base = base + pad
    dense, sparse = [], []
    for k in range(ntaps):
        live = np.flatnonzero(weights[:, k])
        if len(live) >= _SPARSE_TAP * out_size:
            dense.append((k, torch.from_numpy(np.ascontiguousarray(weights[:, k]))))
        elif len(live):
            sparse.append(tuple(torch.from_numpy(a) for a in (live, base[live] + k, weights[live, k])))
    bag = _bag(base[:, None] + np.arange(ntaps), weights, _split(weights))
    runs = tuple(_runs(base))
    transposed = len(runs) > _MAX_RUNS or len(runs) * len(dense) > _MAX_VIEW_OPS
    return _Horizontal(in_size, out_size, pad, runs, tuple(dense), tuple(sparse), bag, transposed)


@dataclass(frozen=True)
class _Strip:
    """Output rows ``lo:hi`` of the vertical pass, the source rows ``src_lo:src_hi`` they read, their bag.

    ``views``, when the pass runs as row views: ``(a, b, r, w)`` adds ``w * src[r : r + b - a]`` to
    output rows ``a:b`` (both relative to the strip), ``w`` the int32 weights ``[b - a, 1]``.
    """

    lo: int
    hi: int
    src_lo: int
    src_hi: int
    bag: _Bag
    views: tuple[tuple[int, int, int, torch.Tensor], ...] | None


def _row_views(first: np.ndarray, fixed: np.ndarray, src_lo: int) -> list[tuple[int, int, int, torch.Tensor]]:
    """One ``(a, b, r, w)`` per run of consecutive first taps and per tap with a nonzero weight in it."""
    views = []
    for a, b, start in _runs(first):
        for k in range(fixed.shape[1]):
            live = np.flatnonzero(fixed[a:b, k])
            if len(live):
                # rows of the run outside [live[0], live[-1]] have zero weights here and may read past the strip
                lo, hi = a + int(live[0]), a + int(live[-1]) + 1
                w = torch.from_numpy(np.ascontiguousarray(fixed[lo:hi, k])).view(-1, 1)
                views.append((lo, hi, start + lo - a + k - src_lo, w))
    return views


@lru_cache(maxsize=128)
def _strips(in_size: int, out_size: int, rows: int) -> tuple[_Strip, ...]:
    """The vertical pass in strips of ``rows`` output rows, as row views where each strip needs few of them."""
    first, count, fixed = bicubic_coefficients(in_size, out_size)
    stop = first + count
    split = _split(fixed)
    strips = []
    for lo in range(0, out_size, rows):
        hi = min(lo + rows, out_size)
        src_lo, src_hi = int(first[lo]), int(stop[hi - 1])
        # taps past ``count`` have zero weights and drop out of the bags
        index = first[lo:hi, None] + np.arange(fixed.shape[1]) - src_lo
        views = _row_views(first[lo:hi], fixed[lo:hi], src_lo)
        strips.append(_Strip(lo, hi, src_lo, src_hi, _bag(index, fixed[lo:hi], split), tuple(views)))
    if max(len(strip.views) for strip in strips) > _MAX_ROW_VIEW_OPS:
        strips = [replace(strip, views=None) for strip in strips]
    return tuple(strips)


def _run_strip(strip: _Strip, src: torch.Tensor, bias: int, last: bool, ws: _Workspace) -> torch.Tensor:
    """The vertical pass for one strip over its source rows ``src`` ``[span, D]``: ``[n, D]`` as :func:`_run_bag`.

    An int32 source runs the strip's row views, and so is the result: floored, clamped unless ``last``.
    """
    if src.dtype != torch.int32:
        return _run_bag(strip.bag, src, bias, last)
    out = ws.get("v_out", strip.hi - strip.lo, src.shape[1]).fill_(bias)
    for a, b, r, w in strip.views:
        out[a:b].addcmul_(src[r : r + b - a], w)
    out.bitwise_right_shift_(PRECISION_BITS)
    return out if last else out.clamp_(0, 255)


class _Workspace:
    """Flat scratch buffers, grown on demand and reused across strips and images."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


def _planar(rows: np.ndarray) -> np.ndarray:
    """Channels-last uint8 rows ``[n, W, C]`` seen as ``[n, C, W]``."""
    return rows.transpose(0, 2, 1)


class _HorizontalPass:
    """The horizontal pass over chunks of up to ``rows`` rows, ``[n, C, W] -> [n, C, W']``.

    Few runs: an int32 source with zero pad columns and one ``addcmul`` per (run, tap) over views,
    built once. Many runs: the chunk is transposed into the rows of a bag's table, ``[Wp, n * C]``.
    """

    def __init__(self, plan: _Horizontal, rows: int, channels: int, ws: _Workspace):
        self.plan, self.channels, self.ws = plan, channels, ws
        self.width = plan.in_size + 2 * plan.pad
        lo, hi = plan.pad, plan.pad + plan.in_size
        if plan.transposed:
            self.table = ws.get("h_table", self.width * rows * channels, dtype=plan.bag.dtype)
            return
        self.src = ws.get("h_src", rows, channels, self.width)
        self.src[:, :, :lo].zero_()
        self.src[:, :, hi:].zero_()
        self.out = ws.get("h_out", rows, channels, plan.out_size)
        self._ops: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def _table(self, n: int) -> torch.Tensor:
        return self.table[: self.width * n * self.channels].view(self.width, n * self.channels)

    def load(self, rows: np.ndarray | torch.Tensor) -> None:
        """Take a chunk: uint8 channels-last rows ``[n, W, C]`` (numpy), or clamped values ``[n, C, W]``."""
        n, plan = rows.shape[0], self.plan
        lo, hi = plan.pad, plan.pad + plan.in_size
        if not plan.transposed:
            interior = self.src[:n, :, lo:hi]
            if isinstance(rows, torch.Tensor):
                interior.copy_(rows)
            else:
                interior.numpy()[...] = _planar(rows)
            return
        table = self._table(n)
        table[:lo].zero_()
        table[hi:].zero_()
        if isinstance(rows, torch.Tensor):
            table[lo:hi].copy_(rows.reshape(n * self.channels, plan.in_size).t())
        else:
            # convert, then transpose: one strided converting copy is ~3x slower than the two
            values = self.ws.get("h_values", n, plan.in_size, self.channels, dtype=table.dtype)
            values.numpy()[...] = rows
            table[lo:hi].view(plan.in_size, n, self.channels).copy_(values.transpose(0, 1))

    def _views(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ops = self._ops.get(n)
        if ops is None:
            src, out = self.src[:n], self.out[:n]
            # run-major, so that a run's slice of the output stays in cache across its taps
            ops = self._ops[n] = [
                (out[:, :, a:b], src[:, :, s + k : s + k + b - a], w[a:b])
                for a, b, s in self.plan.runs
                for k, w in self.plan.dense
            ]
        return ops

    def run(self, n: int, bias: int, last: bool) -> torch.Tensor:
        """The pass over the loaded chunk: values ``[n, C, W']`` (int32 or float, any strides)."""
        plan = self.plan
        if plan.transposed:
            out = _run_bag(plan.bag, self._table(n), bias, last)
            return out.view(plan.out_size, n, self.channels).permute(1, 2, 0)
        out = self.out[:n].fill_(bias)
        for dst, src, w in self._views(n):
            dst.addcmul_(src, w)
        src = self.src[:n]
        for outputs, columns, w in plan.sparse:
            out.index_add_(2, outputs, src.index_select(2, columns).mul_(w))
        out.bitwise_right_shift_(PRECISION_BITS)
        return out if last else out.clamp_(0, 255)

    def run_into(self, n: int, dst: torch.Tensor) -> None:
        """The pass as the first of two, its clamped values written into rows ``dst`` ``[n, C, W']``
        (float after a transposed pass, else float or int32)."""
        out = self.run(n, _HALF, last=False)
        if self.plan.transposed:
            # [W', n * C] -> [n * C, W']: a 2-D transpose, torch's blocked copy
            dst.view(n * self.channels, -1).copy_(out.permute(2, 0, 1).reshape(-1, n * self.channels).t())
        else:
            dst.copy_(out)


def _strip_rows(width: int, channels: int, block: int) -> int:
    """Output rows per strip: whole blocks of ``block`` rows, about ``_STRIP_VALUES`` values."""
    return max(1, _STRIP_VALUES // (block * width * channels)) * block


def _resample(
    image: np.ndarray,
    out_height: int,
    out_width: int,
    block: int,
    offset: int,
    emit: Callable[[int, torch.Tensor], None],
    ws: _Workspace,
) -> None:
    """Resize ``image`` (uint8 ``[H, W, C]``) strip by strip into ``emit(row, strip)``.

    A strip is ``[n, C, W']`` (int32 or float, any strides) whose floor is ``value + offset``,
    ``value`` being Pillow's result before its clamp to 0..255; ``offset`` is 0 or ``_TABLE_OFFSET``.
    """
    height, width, channels = image.shape
    rows = _strip_rows(out_width, channels, block)
    last = _HALF + (offset << PRECISION_BITS)
    plan = _horizontal(width, out_width) if out_width != width else None
    if out_height == height:
        hpass = _HorizontalPass(plan, rows, channels, ws) if plan is not None else None
        for lo in range(0, height, rows):
            hi = min(lo + rows, height)
            if hpass is None:
                src = ws.get("src", hi - lo, channels, width)
                src.numpy()[...] = _planar(image[lo:hi])
                emit(lo, src.add_(offset))
                continue
            hpass.load(image[lo:hi])
            emit(lo, hpass.run(hi - lo, last, last=True))
        return
    strips = _strips(height, out_height, rows)
    span = max(s.src_hi - s.src_lo for s in strips)
    vertical_pass_first = plan is None or vertical_first(height, width, out_height, out_width)
    # row views read int32 rows; a transposed horizontal pass leaves float ones, which stay so for the bags
    views = strips[0].views is not None and (vertical_pass_first or not plan.transposed)
    dtype = torch.int32 if views else strips[0].bag.dtype
    if vertical_pass_first:
        hpass = _HorizontalPass(plan, rows, channels, ws) if plan is not None else None
        table = ws.get("v_table", span, channels, width, dtype=dtype)
        for strip in strips:
            src = table[: strip.src_hi - strip.src_lo]
            src.numpy()[...] = _planar(image[strip.src_lo : strip.src_hi])
            n = strip.hi - strip.lo
            values = _run_strip(strip, src.view(src.shape[0], -1), last if hpass is None else _HALF, hpass is None, ws)
            values = values.view(n, channels, width)
            if hpass is None:
                emit(strip.lo, values)
                continue
            hpass.load(values)
            emit(strip.lo, hpass.run(n, last, last=True))
        return
    # horizontal first: its rows land in a window that slides down the image, the vertical pass's source
    chunk = max(span, _CHUNK_VALUES // (width * channels))
    hpass = _HorizontalPass(plan, chunk, channels, ws)
    capacity = span + chunk
    window = ws.get("window", capacity, channels, out_width, dtype=dtype)
    base = done = 0
    for strip in strips:
        done = max(done, strip.src_lo)
        if strip.src_hi > done:
            if done + chunk - base > capacity:
                kept = window[strip.src_lo - base : done - base].clone()
                window[: kept.shape[0]].copy_(kept)
                base = strip.src_lo
            hi = min(max(strip.src_hi, done + chunk), base + capacity, height)
            hpass.load(image[done:hi])
            hpass.run_into(hi - done, window[done - base : hi - base])
            done = hi
        src = window[strip.src_lo - base : strip.src_hi - base]
        values = _run_strip(strip, src.view(src.shape[0], -1), last, True, ws)
        emit(strip.lo, values.view(strip.hi - strip.lo, channels, out_width))


class Normalisation:
    """The reference's rescale and normalisation of a uint8 value ``v`` of channel ``c``.

    The reference computes ``float32(float64(v) * rescale)``, then ``(x - mean[c]) / std[c]`` in
    float32. :attr:`table` holds it for all 256 values; when ``((v / d) - mean) / std`` in float32,
    with ``d = float32(1 / rescale)``, gives the same bits for every value (true of the released
    settings), :attr:`arithmetic` is set and the preprocessor normalises with those three ops.
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
        # shaped for planar [n, C, W] values
        self.mean = torch.from_numpy(mean32)
        self.std = torch.from_numpy(std32)
        self.arithmetic = all(
            torch.equal(self._normalise(planar, _Workspace()).div_(self.std)[0], self.table)
            for planar in (
                torch.arange(256, dtype=dtype).expand(self.channels, 256).reshape(1, self.channels, 256).clone()
                for dtype in (torch.float32, torch.int32)
            )
        )
        shifted = np.clip(np.arange(_TABLE_SIZE) - _TABLE_OFFSET, 0, 255)
        self.offset_table = self.table[:, shifted].reshape(-1)  # [C * 512], indexed by value + 64

    def _normalise(self, values: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        """Integral planar values ``[n, C, W]`` (float, in place, or int32) to ``clamp(v) / d - mean`` in float32."""
        if values.is_floating_point():
            return values.clamp_(0, 255).div_(self.divisor).sub_(self.mean)
        # the int32 -> float32 conversion happens inside the division, one pass fewer
        scaled = ws.get("emit", *values.shape, dtype=torch.float32)
        return torch.div(values.clamp_(0, 255), self.divisor, out=scaled).sub_(self.mean)

    def patches(self, values: torch.Tensor, patch: int, merge: int, out: torch.Tensor, ws: _Workspace) -> None:
        """Write a strip ``[n, C, W]`` (floor = uint8 value before its clamp) as patch rows into ``out``."""
        if values.is_floating_point():
            values.floor_()
        ordered = _in_patch_order(self._normalise(values, ws), patch, merge)
        torch.div(ordered, self.std.view(-1, 1, 1), out=out.view(ordered.shape))

    def patches_from_table(
        self, values: torch.Tensor, patch: int, merge: int, out: torch.Tensor, ws: _Workspace
    ) -> None:
        """:meth:`patches` for a strip biased by 64, through the table."""
        ordered = _in_patch_order(values, patch, merge)
        index = ws.get("index", *ordered.shape, dtype=torch.int64)
        index.copy_(ordered)
        c = values.shape[1]
        if c > 1:
            index.add_((torch.arange(c) * _TABLE_SIZE).view(c, 1, 1))
        torch.index_select(self.offset_table, 0, index.view(-1), out=out.view(-1))


def _in_patch_order(values: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """A strip ``[n, C, W]`` seen in the order of its patch rows: ``[n / b, W / b, m, m, C, p, p]``, ``b = p m``."""
    n, c, width = values.shape
    block = patch * merge
    return values.view(n // block, merge, patch, c, width // block, merge, patch).permute(0, 4, 1, 5, 3, 2, 6)


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
    status = lib.penguin_resize(
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
    if status != 0:
        raise MemoryError(f"out of memory resizing a {height} x {width} image to {out_height} x {out_width}")


def resize_bicubic(image: np.ndarray | torch.Tensor, out_height: int, out_width: int) -> torch.Tensor:
    """Resize a uint8 ``[H, W, C]`` image exactly as Pillow 13's ``resize((W', H'), BICUBIC)`` does.

    Returns a new uint8 ``[out_height, out_width, C]`` tensor.
    """
    image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    _check_image(image)
    if out_height < 1 or out_width < 1:
        raise ValueError(f"output size must be positive, got {out_height} x {out_width}")
    out = torch.empty(out_height, out_width, image.shape[2], dtype=torch.uint8)
    lib = _native.library()
    if lib is not None:
        _resize_native(lib, image, out_height, out_width, out)
        return out

    def emit(row: int, strip: torch.Tensor) -> None:
        if strip.is_floating_point():
            strip = strip.floor()
        out[row : row + strip.shape[0]].copy_(strip.clamp(0, 255).permute(0, 2, 1))

    _resample(image, out_height, out_width, 1, 0, emit, _Workspace())
    return out


def resize_to_patches(
    image: np.ndarray,
    out_height: int,
    out_width: int,
    patch: int,
    merge: int,
    norm: Normalisation,
    out: torch.Tensor,
    workspace: _Workspace | None = None,
) -> None:
    """Resize a uint8 ``[H, W, C]`` image and write its normalised patches into ``out``.

    ``out`` is float32 ``[(out_height / patch) * (out_width / patch), C * patch * patch]``, rows in
    the merge-block order of SPEC section 3; ``out_height`` and ``out_width`` are multiples of
    ``patch * merge``.
    """
    lib = _native.library()
    if lib is not None:
        _resize_native(lib, image, out_height, out_width, out, norm.table, patch, merge)
        return
    ws = workspace if workspace is not None else _Workspace()
    grid_w = out_width // patch
    write = norm.patches if norm.arithmetic else norm.patches_from_table

    def emit(row: int, strip: torch.Tensor) -> None:
        first = (row // patch) * grid_w
        write(strip, patch, merge, out[first : first + (strip.shape[0] // patch) * grid_w], ws)

    _resample(image, out_height, out_width, patch * merge, 0 if norm.arithmetic else _TABLE_OFFSET, emit, ws)
