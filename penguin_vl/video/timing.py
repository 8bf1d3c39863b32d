"""Which frames the reference keeps, worked out from timestamps alone (SPEC section 8).

The reference runs the ``ffmpeg`` command line with ``-ss``/``-t`` on the input (when trimming) and
the filter graph ``fps=<fps>:round=down,format=rgb24``, then thins the result to ``max_frames`` with
``linspace``. Which source frame lands in which output slot depends only on the frames' timestamps,
so it can be decided from the demuxed packets before any pixel is decoded. The functions here
reproduce, in integer arithmetic on the stream's time base:

- the command line's input time offset (timestamps start at the container's start time, or at
  ``-ss`` past it) and its accurate-seek ``trim`` (frames before ``-ss`` dropped; ``-t`` counted from
  the first frame kept, ending the stream at the first frame past it);
- the end-of-stream time the command line sends into the filter graph: the last frame's time plus
  its duration (or, for an MP4 whose packets FFmpeg 5.1 leaves without one, the time its command
  line takes instead, ``Timeline.tail_us``);
- the ``fps`` filter: every timestamp rescaled to the output rate rounding down, one output per slot
  from the first frame's slot to the end-of-stream slot, each the latest frame at or before it;
- the command line's constant-rate output (``-f rawvideo`` after ``-filter_complex``): output time
  starts at 0, so when the first slot is k > 0 its frame is written k + 1 times;
- the reference's own rules for folders of frames and GIFs (``frame_sample``), which ignore time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import numpy as np

__all__ = [
    "Timeline",
    "cli_microseconds",
    "d2q",
    "cfr_slots",
    "fps_slots",
    "index_sample",
    "rescale",
    "thin",
    "trim_window",
]

_INT_MAX = 2**31 - 1
_MICROSECOND = Fraction(1, 1_000_000)


def rescale(value: int, src: Fraction, dst: Fraction, *, down: bool = False) -> int:
    """``av_rescale_q_rnd``: ``value`` in units of ``src`` as units of ``dst``, rounded to the nearest
    (halves away from zero, FFmpeg's default) or down (towards minus infinity)."""
    exact = value * src / dst
    if down:
        return math.floor(exact)
    magnitude = math.floor(abs(exact) + Fraction(1, 2))
    return magnitude if exact >= 0 else -magnitude


def _reduce(num: int, den: int, limit: int) -> Fraction:
    # av_reduce: continued fraction of num/den, stopping at the last convergent within `limit`, then
    # trying the best semiconvergent in between
    a0n, a0d, a1n, a1d = 0, 1, 1, 0
    g = math.gcd(num, den)
    if g:
        num, den = num // g, den // g
    if num <= limit and den <= limit:
        return Fraction(num, den)
    while den:
        x = num // den
        next_den = num - den * x
        a2n, a2d = x * a1n + a0n, x * a1d + a0d
        if a2n > limit or a2d > limit:
            if a1n:
                x = (limit - a0n) // a1n
            if a1d:
                x = min(x, (limit - a0d) // a1d)
            if den * (2 * x * a1d + a0d) > num * a1d:
                a1n, a1d = x * a1n + a0n, x * a1d + a0d
            break
        a0n, a0d, a1n, a1d = a1n, a1d, a2n, a2d
        num, den = den, next_den
    return Fraction(a1n, a1d)


def d2q(value: float) -> Fraction:
    """``av_d2q(value, INT_MAX)``: the rational FFmpeg's ``fps`` filter makes of its rate."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"a frame rate must be finite and positive, got {value!r}")
    _, exponent = math.frexp(value)
    den = 1 << (62 - max(exponent - 1, 0))
    return _reduce(math.floor(value * den + 0.5), den, _INT_MAX)


def cli_microseconds(seconds: float) -> int:
    """A time as the reference hands it to ``ffmpeg`` (``str(float)``), read back as the command line
    does (``av_parse_time``: whole microseconds, further digits cut off)."""
    micro = Decimal(repr(float(seconds))) * 1_000_000
    return int(micro)  # int() of a Decimal truncates towards zero, as the parser drops extra digits


@dataclass(frozen=True)
class Timeline:
    """A stream's frames in presentation order: timestamps and durations in its time base."""

    pts: np.ndarray  # int64 [N]
    duration: np.ndarray  # int64 [N]
    keyframe: np.ndarray | None = None  # bool [N], where the packets say which frames start a GOP
    # microseconds from the last frame to the stream's end where FFmpeg 5.1's command line has another
    # time than the last duration (see decode.cli_tail_us); None: the last duration
    tail_us: int | None = None

    def __len__(self) -> int:
        return len(self.pts)


def _floor_rescale(values: np.ndarray, src: Fraction, dst: Fraction) -> np.ndarray:
    factor = src / dst
    num, den = factor.numerator, factor.denominator
    if values.size and int(np.abs(values).max()) * num >= 2**62:  # beyond int64: exact Python integers
        return np.array([v * num // den for v in values.tolist()], dtype=np.int64)
    return values * num // den  # numpy's // on integers floors, as AV_ROUND_DOWN does


def trim_window(
    timeline: Timeline, time_base: Fraction, offset_us: int, duration_us: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The command line's input offset and ``trim``: which frames reach the ``fps`` filter.

    ``offset_us`` is the container's start time plus ``-ss`` (microseconds), ``duration_us`` the
    ``-t`` value or None. Returns the indices of the frames that pass, their shifted timestamps, and
    the end-of-stream time, all in the stream's time base.
    """
    shift = rescale(offset_us, _MICROSECOND, time_base)
    t = timeline.pts - shift
    kept = np.arange(len(t)) if duration_us is None else np.flatnonzero(t >= 0)
    if len(kept) == 0:
        return kept, t[kept], 0
    limit = rescale(duration_us, _MICROSECOND, time_base) if duration_us is not None else 0
    if limit:
        # trim counts the duration from the first frame it passes and ends the stream at the first
        # frame past it, with that frame's time
        over = np.flatnonzero(t[kept] - t[kept[0]] >= limit)
        if len(over):
            return kept[: over[0]], t[kept[: over[0]]], int(t[kept[over[0]]])
    # the command line carries the end time in microseconds: last time plus duration, each rounded
    last_pts, last_duration = int(t[-1]), int(timeline.duration[-1])
    tail_us = timeline.tail_us
    if tail_us is None:
        tail_us = rescale(last_duration, time_base, _MICROSECOND)
    end_us = rescale(last_pts, time_base, _MICROSECOND) + tail_us
    return kept, t[kept], rescale(end_us, _MICROSECOND, time_base)


def fps_slots(pts: np.ndarray, end: int, time_base: Fraction, rate: Fraction) -> np.ndarray:
    """FFmpeg's ``fps`` filter with ``round=down``: for every output frame, the index of its input.

    ``pts`` are the input timestamps in arrival order and ``end`` the end-of-stream time, all in
    ``time_base``; ``rate`` is the output frame rate.
    """
    if len(pts) == 0:
        return np.zeros(0, dtype=np.int64)
    out_tb = 1 / rate
    slot = _floor_rescale(np.asarray(pts, dtype=np.int64), time_base, out_tb)
    last = rescale(end, time_base, out_tb, down=True)
    if np.all(slot[1:] >= slot[:-1]):
        # in order: slot k shows the latest frame at or before it, from the first frame's slot up to
        # the end slot (or the last frame's, which the filter reaches before it learns of the end)
        k = np.arange(slot[0], max(last, int(slot[-1])), dtype=np.int64)
        return np.searchsorted(slot, k, side="right") - 1
    return _fps_slots_sequential(slot.tolist(), last)


def cfr_slots(slots: np.ndarray, first_pts: int, time_base: Fraction, rate: Fraction) -> np.ndarray:
    """The frames the command line writes for the ``fps`` filter's ``slots`` (its output, in order).

    A raw-video output has no timestamps, so ``ffmpeg`` 5.1 syncs it at a constant rate from time 0
    (``-vsync cfr``; an output of ``-filter_complex`` has no input stream, so never the variant that
    skips initial duplicates): a first output at slot k > 0 is written k + 1 times. This happens
    when the window's first frame is a slot or more after its start: a video stream starting after
    the container's start (an audio stream before it), or ``-ss`` at a rate above the stream's.
    ``first_pts`` is the first frame's time as the filter sees it (after the input offset).
    """
    lead = rescale(first_pts, time_base, 1 / rate, down=True)
    if len(slots) == 0 or lead <= 0:
        return slots
    return np.concatenate([np.repeat(slots[:1], lead), slots])


def _fps_slots_sequential(slot: list[int], last: int) -> np.ndarray:
    # the filter's state machine, step by step, for timestamps out of order: two frames buffered; drop
    # the first when the second is due, else emit the first for the next slot; at the end drop from
    # the end slot on
    out: list[int] = []
    nxt = slot[0]
    head, n = 0, len(slot)
    while head < n:
        if head + 1 < n:
            if slot[head + 1] <= nxt:
                head += 1
                continue
        elif last <= nxt:
            break
        out.append(head)
        nxt += 1
    return np.asarray(out, dtype=np.int64)


def thin(count: int, max_frames: int) -> np.ndarray:
    """The reference's ``max_frames`` cut: ``linspace(0, count - 1, max_frames, dtype=int)`` when over."""
    if count > max_frames:
        return np.linspace(0, count - 1, max_frames, dtype=int)
    return np.arange(count)


def index_sample(
    count: int, native_fps: float, fps: float, max_frames: int, start: float | None, end: float | None
) -> np.ndarray:
    """The reference's frame choice for folders of frames and GIFs (and short trims of video files).

    Frames are taken to play at ``native_fps`` (3 for folders, 25 for GIFs, whatever their real timing
    **(sic)**); ``start``/``end`` cut ``int(t * native_fps) - 1``; then one frame from the middle of
    every ``native_fps // fps`` frames, or ``linspace`` over the range when that would exceed
    ``max_frames`` seconds. Returns frame indices into the whole sequence.
    """
    if start is not None and end is not None:
        start, end = max(start, 0.0), max(end, 0.0)
        if start > end:
            start, end = end, start
        elif start == end:
            end = start + 1
    first = 0 if start is None else max(int(start * native_fps) - 1, 0)
    last = count - 1 if end is None else min(int(end * native_fps) - 1, count - 1)
    span = max(last - first + 1, 0)
    if span == 0:
        return np.zeros(0, dtype=np.int64)
    if span / native_fps < max_frames:
        segment = min(native_fps // fps, span)
        if segment == 0:
            raise ValueError(
                f"fps={fps} is above the {native_fps:g} frames per second the reference assumes for this input"
            )
        picks = np.arange(segment // 2, span, segment, dtype=int)
    elif span <= max_frames:
        picks = np.arange(span).astype(int)
    else:
        picks = np.linspace(0, span - 1, max_frames, dtype=int)
    return first + picks.astype(np.int64)
