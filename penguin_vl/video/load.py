"""``load_video``: the reference's frames, timestamps and key frames for a video file, GIF or folder.

Memory: the frames returned are allocated once, at their final count, before decoding; nothing else
grows with the video (the plan holds two integers per source frame, the key-frame typer one frame's
patches). Video files are planned from their packets (:mod:`penguin_vl.video.timing`) and decoded
selectively (:mod:`penguin_vl.video.decode`); GIFs and folders read only the frames the reference
keeps.

Checked against the reference's decoders themselves (``tests/test_video_ffmpeg.py``: FFmpeg 5.1's
command line as the reference runs it, decord 0.6 for windows under a second): ``-ss``/``-t``
trimming (windows before the stream, inside a GOP, off frame boundaries, past the end; ``-ss``
counted from the container's start, sic), rates such as 0.5 and 2.5, late-starting streams,
B-frames, rotation (the quarter-turn sic included), and the copies of the first frame the command
line's constant-rate output writes when the first sampled slot is not the window's first. Frames
are bit for bit and timestamps equal, except for the cases docs/cli.md lists (an MP4 that FFmpeg
5.1 demuxes without packet durations, HEVC only; a trimmed MPEG-4 Part 2 AVI with B-frames, whose first GOP
5.1 decodes differently after its seek; timestamps where the reference's run out before its frames;
decord's corrupt open-GOP seeks and its failure on quarter turns; ``start == end``, refused here).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from penguin_vl.video.decode import Mismatch, Source, VideoError, decode_picked, frame_timeline, open_source
from penguin_vl.video.decode import packet_timeline as _packet_timeline
from penguin_vl.video.keyframes import KeyFrameTyper
from penguin_vl.video.timing import (
    Timeline,
    cfr_slots,
    cli_microseconds,
    d2q,
    fps_slots,
    index_sample,
    thin,
    trim_window,
)

__all__ = ["VIDEO_SUFFIXES", "Video", "VideoError", "check_sampling", "is_video_file", "load_video"]

# file names taken for videos where inputs of several kinds mix (the processor, the command line);
# GIFs stay images there: load_video reads them as clips when asked
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".flv", ".wmv")
FOLDER_FPS = 3  # the rate the reference assumes for a folder of frames (sic)
GIF_FPS = 25  # and for a GIF, whatever its frame delays (sic)
_IMAGE_SUFFIXES = ("png", "jpg", "jpeg")  # the reference hands these to its image loader


@dataclass(frozen=True)
class Video:
    """Frames of one clip as the reference samples them.

    ``frames`` uint8 ``[T, H, W, 3]`` (RGB), ``timestamps`` float64 ``[T]`` (seconds),
    ``frame_types`` int32 ``[T]`` (0 key frame, 1 intermediate), ``path`` the input.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    frame_types: np.ndarray
    path: str = field(default="")

    def __len__(self) -> int:
        return len(self.frames)


def check_sampling(fps: float, max_frames: int, start: float | None, end: float | None) -> None:
    """Raise ``ValueError`` (naming the argument) unless these are arguments :func:`load_video` can use."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 1:
        raise ValueError(f"max_frames must be an integer >= 1, got {max_frames!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(f"{name} must be None or a finite number of seconds >= 0, got {value!r}")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"start ({start}) must be before end ({end})")


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a video file by its suffix (one of :data:`VIDEO_SUFFIXES`, any case)."""
    return os.fspath(path).lower().endswith(VIDEO_SUFFIXES)


def load_video(
    path: str | os.PathLike,
    *,
    fps: float = 1.0,
    max_frames: int = 180,
    start: float | None = None,
    end: float | None = None,
) -> Video:
    """Read a clip as the reference's ``load_video(path, start, end, fps, max_frames)`` does (SPEC section 8).

    ``path`` is a video file (anything the bundled FFmpeg decodes), an animated ``.gif`` or a folder
    of frames. Frames are sampled at ``fps`` (FFmpeg's ``fps`` filter, rounding down), cut to
    ``max_frames`` evenly, optionally within ``start``..``end`` seconds. Frames of a rotated video
    are turned as the ``ffmpeg`` command line turns them, then, as in the reference, their bytes are
    read with the stream's stored width and height (sic): a quarter turn comes out scrambled, with
    the stored shape, exactly as the reference has it.
    Raises :class:`VideoError` (naming the input) for inputs that cannot be read or
    hold no frame in the window, ``ValueError`` for bad arguments.
    """
    where = os.fspath(path)
    check_sampling(fps, max_frames, start, end)
    fps, max_frames = float(fps), int(max_frames)
    if os.path.isdir(where):
        return _folder(where, fps, max_frames, start, end)
    if not os.path.exists(where):
        raise VideoError(f"{where}: no such file or folder")
    if where.endswith(".gif"):  # case-sensitive, as in the reference: a .GIF goes through FFmpeg
        return _gif(where, fps, max_frames, start, end)
    if where.endswith(_IMAGE_SUFFIXES):
        raise VideoError(f"{where}: an image, not a video (give it to the processor as an image)")
    source = open_source(where)
    if start is not None and end is not None and end - start < 1:
        return _short_window(source, fps, max_frames, start, end)
    return _video_file(source, fps, max_frames, start, end)


class _Collector:
    """Fills the output frames in order and types them as they arrive."""

    def __init__(self, where: str, count: int):
        self.where = where
        self.count = count
        self.frames: np.ndarray | None = None
        self.types = np.ones(count, dtype=np.int32)
        self.filled = 0
        self._typer: KeyFrameTyper | None = None

    def put(self, rgb: np.ndarray) -> None:
        if self.frames is None:
            height, width = rgb.shape[:2]
            try:
                self._typer = KeyFrameTyper(height, width)
            except ValueError as e:
                raise VideoError(f"{self.where}: {e}") from None
            self.frames = np.empty((self.count, height, width, 3), dtype=np.uint8)
        elif rgb.shape != self.frames.shape[1:]:
            raise VideoError(
                f"{self.where}: frame {self.filled} is {rgb.shape[1]}x{rgb.shape[0]}, the first was "
                f"{self.frames.shape[2]}x{self.frames.shape[1]}: frames of one clip must share a size"
            )
        self.frames[self.filled] = rgb
        self.types[self.filled] = self._typer.add(self.frames[self.filled])
        self.filled += 1

    def video(self, timestamps: np.ndarray) -> Video:
        if self.frames is None or self.filled != self.count:
            raise VideoError(f"{self.where}: {self.filled} of {self.count} frames could be read")
        return Video(self.frames, np.asarray(timestamps, dtype=np.float64), self.types, self.where)


def _decode_into(source: Source, timeline: Timeline, picks: np.ndarray, by_order: bool) -> _Collector:
    collector = _Collector(source.path, len(picks))
    cursor = 0

    def deliver(index: int, rgb: np.ndarray) -> None:
        nonlocal cursor
        while cursor < len(picks) and picks[cursor] == index:  # a frame may fill several slots
            collector.put(rgb)
            cursor += 1

    decode_picked(source, timeline, np.unique(picks), deliver, by_order=by_order)
    return collector


def _with_timeline(source: Source, plan):
    """Run ``plan(timeline, by_order)`` on the packets' timeline, or on the decoder's when they disagree."""
    timeline = _packet_timeline(source)
    if timeline:
        try:
            return plan(timeline, False)
        except Mismatch:
            pass
    try:
        return plan(frame_timeline(source), True)
    except Mismatch as e:  # a second decode disagreeing with the first: the file is not readable as is
        raise VideoError(f"{source.path}: {e}") from None


def _video_file(source: Source, fps: float, max_frames: int, start: float | None, end: float | None) -> Video:
    """The reference's ``ffmpeg`` path: optional ``-ss``/``-t``, ``fps`` filter, ``linspace`` cut."""

    def plan(timeline: Timeline, by_order: bool) -> Video:
        duration = source.probe_duration
        if duration is None:  # ffprobe prints N/A and the reference fails; the stream's own end is the answer
            end_pts = int(timeline.pts[-1] + timeline.duration[-1])
            duration = float(end_pts * source.time_base) - source.probe_start
        first = source.probe_start
        if start is not None:
            moved = max(first, start)
            duration -= moved - start
            first = moved
        if end is not None:
            duration = min(duration, end - first)
        offset_us, duration_us = source.container_start_us, None
        if start is not None or end is not None:
            if duration <= 0:
                raise VideoError(f"{source.path}: no frames between start={start} and end={end}")
            offset_us += cli_microseconds(first)
            duration_us = cli_microseconds(duration)
        kept, pts, stream_end = trim_window(timeline, source.time_base, offset_us, duration_us)
        rate = d2q(fps)
        slots = fps_slots(pts, stream_end, source.time_base, rate)
        if len(slots) == 0:
            raise VideoError(f"{source.path}: no frames at fps={fps} in the asked window (start={start}, end={end})")
        slots = cfr_slots(slots, int(pts[0]), source.time_base, rate)
        keep = thin(len(slots), max_frames)
        picks = kept[slots[keep]]
        step = 1 / fps
        stop = max(first + duration + step, first + (len(slots) + 1) * step)
        timestamps = np.arange(first, stop, step)[: len(slots)][keep]
        return _decode_into(source, timeline, picks, by_order).video(timestamps)

    return _with_timeline(source, plan)


def _short_window(source: Source, fps: float, max_frames: int, start: float, end: float) -> Video:
    """Windows under a second: the reference indexes frames at the stream's average rate instead."""
    if not source.average_rate:
        raise VideoError(f"{source.path}: no average frame rate to index a window under one second by")
    rate = source.average_rate

    def plan(timeline: Timeline, by_order: bool) -> Video:
        picks = index_sample(len(timeline), rate, fps, max_frames, start, end)
        if len(picks) == 0:
            raise VideoError(f"{source.path}: no frames between start={start} and end={end}")
        return _decode_into(source, timeline, picks, by_order).video(picks / rate)

    try:
        return _with_timeline(source, plan)
    except ValueError as e:
        if isinstance(e, VideoError):
            raise
        raise VideoError(f"{source.path}: {e}") from None


def _pick(where: str, count: int, native_fps: int, fps: float, max_frames: int, start, end) -> np.ndarray:
    try:
        picks = index_sample(count, native_fps, fps, max_frames, start, end)
    except ValueError as e:
        raise VideoError(f"{where}: {e}") from None
    if len(picks) == 0:
        raise VideoError(f"{where}: no frames (of {count}) between start={start} and end={end}")
    return picks


def _gif(where: str, fps: float, max_frames: int, start: float | None, end: float | None) -> Video:
    try:
        with Image.open(where) as image:
            picks = _pick(where, getattr(image, "n_frames", 1), GIF_FPS, fps, max_frames, start, end)
            collector = _Collector(where, len(picks))
            for index in picks.tolist():  # increasing: a GIF decodes forward, each frame drawn on the last
                image.seek(index)
                # the reference reads RGBA frames and drops alpha without compositing
                collector.put(np.asarray(image.convert("RGBA"))[..., :3])
    except (OSError, SyntaxError, EOFError) as e:
        raise VideoError(f"{where}: cannot read as a GIF ({e})") from e
    return collector.video(picks / GIF_FPS)


def _folder(where: str, fps: float, max_frames: int, start: float | None, end: float | None) -> Video:
    names = sorted(os.listdir(where))  # every entry, as the reference lists them (sic)
    picks = _pick(where, len(names), FOLDER_FPS, fps, max_frames, start, end)
    collector = _Collector(where, len(picks))
    for index in picks.tolist():
        file = os.path.join(where, names[index])
        try:
            with Image.open(file) as image:
                # OpenCV's imread turns the picture upright by its EXIF orientation and drops alpha
                collector.put(np.asarray(ImageOps.exif_transpose(image).convert("RGB")))
        except (OSError, SyntaxError, ValueError) as e:
            if isinstance(e, VideoError):
                raise
            raise VideoError(f"{where}: frame {names[index]!r} cannot be read as an image ({e})") from e
    return collector.video(picks / FOLDER_FPS)
