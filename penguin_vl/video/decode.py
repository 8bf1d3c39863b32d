"""Decoding the frames a video file's plan picks, and only those, through PyAV (bundled FFmpeg).

The reference pipes every frame through ``fps`` and ``format=rgb24`` and keeps what comes out. Which
frames come out depends on timestamps alone (:mod:`penguin_vl.video.timing`), so here the packets
are demuxed first (~7 ms for a 29 s clip), the picks worked out, and the decoder then skips the
frames no pick needs where it can: a frame no other frame references (``skip_frame=NONREF``, for
the codecs listed in ``_SKIP_NONREF``) is not decoded at all unless it is picked, decoding starts two
GOPs before the first frame needed (a trimmed read of a long file seeks), and stops after the last
frame needed. On the SPEC's 29 s 608x342 H.264 clip, 368 of 730 frames are references and the decode
takes ~0.4 s instead of ~0.75 s (slice threads; frame threads were not faster on 2 cores). The
picked frames go through ``format=rgb24`` (after the command line's autorotation filters) in a
libavfilter graph, so their pixels are the filter graph's.

The plan is checked as the frames arrive: every picked frame must come out of the decoder with the
timestamp the packets gave it, and the stream's last frame too (its end sets the number of output
slots). A stream where that fails (timestamps missing, duplicated, frames the decoder drops) is
read again frame by frame: a first pass records the timestamps of the frames the decoder actually
produces, a second decodes without skipping.

What is read of the file is what FFmpeg 5.1's ``ffprobe``/``ffmpeg`` read, checked against them
(``tests/test_video_ffmpeg.py``): the first video stream (the reference's filter graph input
``[0]``), the container's start time (a Matroska/WebM container with primed audio starts at that
audio's first packet in 5.1, see :func:`container_start`), and the frames' pixels (bit for bit,
rotation filters included), and where an H.264 MP4/MOV stream ends for 5.1's command line, which
can be a fraction of a frame after its last frame (:func:`cli_tail_us`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

try:
    import av
except ImportError:  # a declared dependency; an environment without it reads GIFs and folders, not files
    av = None

from penguin_vl.video.timing import Timeline, rescale

__all__ = [
    "Mismatch",
    "Source",
    "VideoError",
    "cli_tail_us",
    "container_start",
    "decode_picked",
    "frame_timeline",
    "open_source",
    "packet_timeline",
]

# decoders whose non-reference frames no other frame needs (skip_frame=NONREF leaves the rest intact)
_SKIP_NONREF = frozenset({"h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video"})
_MICROSECOND = Fraction(1, 1_000_000)


class VideoError(ValueError):
    """An input that cannot be read as a video: not a video, no video stream, corrupt or truncated,
    no frames in the asked window. The message names the input."""


class Mismatch(Exception):
    """The decoder did not produce the frames the packets announced."""


@dataclass
class Source:
    """A video file's chosen stream and what the reference reads of it with ``ffprobe``."""

    path: str
    stream_index: int
    time_base: Fraction
    container_start_us: int  # the container's start time, which the command line subtracts
    probe_start: float  # the first video stream's start time, as ffprobe prints it
    probe_duration: float | None  # the container's duration, as ffprobe prints it
    average_rate: float | None
    codec: str


def _printed(seconds: float) -> float:
    # ffprobe prints times with "%f"; the reference parses that text back
    return float(f"{seconds:f}")


def container_start(container: av.container.InputContainer) -> int:
    """The container's start time (microseconds) as FFmpeg 5.1, the version the reference was checked
    with, has it: the earliest stream start. In Matroska/WebM, 5.1 starts an audio stream at its
    first packet, encoder priming included (an Opus or AAC stream begins a few ms before 0), where the
    bundled FFmpeg starts it after the priming; the command line shifts every frame by this time."""
    start = container.start_time or 0
    if "matroska" not in container.format.name or not container.streams.audio:
        return start
    audio = {s.index for s in container.streams.audio}
    for packet in container.demux(*container.streams.audio):
        if packet.pts is not None and packet.stream.index in audio:
            audio.discard(packet.stream.index)
            start = min(start, rescale(packet.pts, Fraction(packet.stream.time_base), _MICROSECOND))
        if not audio:
            break
    return start


def open_source(path: str) -> Source:
    """Open ``path`` and pick the stream the command line would decode."""
    if av is None:
        raise VideoError(f"{path}: reading video files needs PyAV, which is not installed (pip install av)")
    try:
        with av.open(path) as container:
            videos = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
            if not videos:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise VideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
            # the reference's filter graph reads input "[0]": the file's first video stream (a cover
            # picture stored as one is not taken: such a file is audio)
            stream = videos[0]
            first = container.streams.video[0]  # ffprobe's first video stream gives the start time
            start = 0.0
            if first.start_time is not None:
                start = _printed(first.start_time * (first.time_base.numerator / first.time_base.denominator))
            duration = None if container.duration is None else _printed(container.duration * 1e-6)
            return Source(
                path=path,
                stream_index=stream.index,
                time_base=Fraction(stream.time_base.numerator, stream.time_base.denominator),
                container_start_us=container_start(container),
                probe_start=start,
                probe_duration=duration,
                average_rate=float(stream.average_rate) if stream.average_rate else None,
                codec=stream.codec_context.name,
            )
    except av.FFmpegError as e:
        raise VideoError(f"{path}: cannot open as a video ({e})") from e


def _stream(container: av.container.InputContainer, source: Source) -> av.video.stream.VideoStream:
    stream = container.streams[source.stream_index]
    stream.thread_type = "SLICE"  # frame threads were slower on 2 cores, and skip_frame must apply per packet
    return stream


def _timeline(rows: list[tuple[int | None, int | None, bool]]) -> Timeline | None:
    if not rows or any(pts is None for pts, _, _ in rows):
        return None
    table = np.array([(pts, duration or 0, key) for pts, duration, key in rows], dtype=np.int64).reshape(-1, 3)
    return Timeline(table[:, 0].copy(), table[:, 1].copy(), table[:, 2].astype(bool))


def cli_tail_us(container: av.container.InputContainer, stream, packets: list[tuple[int, int | None]]) -> int | None:
    """How long after its last frame FFmpeg 5.1's command line ends an MP4/MOV stream of H.264
    (microseconds), where that is not the last frame's duration; None elsewhere.

    ``packets`` are the stream's ``(pts, dts)`` in decode order. 5.1's MP4 demuxer gives a packet
    no duration when the track has composition offsets (B-frames: some pts differ from their dts),
    or, for the last packet of a track without, when the track's duration does not reach past its
    time (a track starting late). libavformat then fills in one frame at the codec's rate (with a
    parser, which 5.1 gives H.264 in MP4 but not HEVC, the stream's rate is not used): one tick
    where the time base is coarser than a millisecond, none where the codec's rate is 1000 or more
    (H.264 written with a millisecond time base says 1000 fps). The command line ends the stream
    that long after the last frame, or, with no duration at all, one frame at the codec's rate
    (microseconds, rounded down).
    """
    rate = stream.codec_context.framerate
    if "mov" not in container.format.name.split(",") or stream.codec_context.name != "h264" or not rate or not packets:
        return None
    time_base = Fraction(stream.time_base.numerator, stream.time_base.denominator)
    if all(pts == dts for pts, dts in packets):
        last_dts = packets[-1][1]
        if stream.duration is not None and last_dts is not None and stream.duration > last_dts:
            return None  # the demuxer's own duration, the track's end: the bundled FFmpeg's too
    if time_base.numerator * 1000 > time_base.denominator:
        duration = 1
    elif rate.denominator * 1000 > rate.numerator:
        duration = time_base.denominator * rate.denominator // (rate.numerator * time_base.numerator)
    else:
        return 1_000_000 * rate.denominator // rate.numerator
    return rescale(duration, time_base, _MICROSECOND)


def packet_timeline(source: Source) -> Timeline | None:
    """Presentation-order frames from the demuxed packets, or None when the packets cannot say."""
    try:
        with av.open(source.path) as container:
            stream = container.streams[source.stream_index]
            # the packets' numbers only: holding the packets would hold the whole file's bytes
            rows, stamps = [], []
            for p in container.demux(stream):
                if p.size:
                    rows.append((p.pts, p.duration, p.is_keyframe))
                    stamps.append((p.pts, p.dts))
            timeline = _timeline(rows)
            tail_us = cli_tail_us(container, stream, stamps)
    except av.FFmpegError as e:
        raise VideoError(f"{source.path}: cannot read ({e})") from e
    if timeline is None:
        return None
    order = np.argsort(timeline.pts, kind="stable")
    pts = timeline.pts[order]
    if np.any(pts[1:] == pts[:-1]):
        return None
    return Timeline(pts, timeline.duration[order], timeline.keyframe[order], tail_us)


def _decoded(container: av.container.InputContainer, stream, skip: Callable[[av.Packet], bool] | None) -> Iterator:
    context = stream.codec_context
    for packet in container.demux(stream):
        if skip is not None and packet.size:
            context.skip_frame = "NONREF" if skip(packet) else "DEFAULT"
        try:
            yield from context.decode(packet)
        except av.InvalidDataError:
            continue  # as the command line does: a broken packet costs its frame, not the stream


def frame_timeline(source: Source) -> Timeline:
    """Frames as the decoder produces them (a full decode, no pixels kept)."""
    try:
        with av.open(source.path) as container:
            stream = _stream(container, source)
            rows = [(f.pts, f.duration, False) for f in _decoded(container, stream, None)]
    except av.FFmpegError as e:
        raise VideoError(f"{source.path}: cannot decode ({e})") from e
    if not rows:
        raise VideoError(f"{source.path}: no frame could be decoded")
    timeline = _timeline(rows)
    if timeline is None:
        raise VideoError(f"{source.path}: the decoder gives frames without timestamps")
    return timeline


def _rotation(frame: av.VideoFrame) -> float:
    # the command line's get_rotation: clockwise degrees in [0, 360)
    theta = -round(frame.rotation or 0)
    return theta - 360 * math.floor(theta / 360 + 0.9 / 360)


class _ToRGB:
    """``format=rgb24`` after the command line's autorotation filters, as one libavfilter graph.

    The reference reshapes the command line's raw bytes with the stream's stored width and height
    (sic), so a quarter-turned frame comes out as its upright bytes read as a stored-size frame:
    scrambled. That is what it returns here too."""

    def __init__(self, first: av.VideoFrame):
        self.graph = av.filter.Graph()
        chain = [self.graph.add_buffer(template=first)]
        theta = _rotation(first)
        quarter_turn = abs(theta - 90) < 1 or abs(theta - 270) < 1
        self.stored = (first.height, first.width, 3) if quarter_turn else None
        if abs(theta - 90) < 1:
            chain.append(self.graph.add("transpose", "clock"))
        elif abs(theta - 180) < 1:
            chain += [self.graph.add("hflip"), self.graph.add("vflip")]
        elif abs(theta - 270) < 1:
            chain.append(self.graph.add("transpose", "cclock"))
        elif abs(theta) > 1:
            chain.append(self.graph.add("rotate", f"{theta:f}*PI/180"))
        chain += [self.graph.add("format", "rgb24"), self.graph.add("buffersink")]
        for a, b in zip(chain, chain[1:], strict=False):
            a.link_to(b)
        self.graph.configure()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        self.graph.push(frame)
        rgb = self.graph.pull().to_ndarray()
        return rgb if self.stored is None else np.ascontiguousarray(rgb).reshape(self.stored)


def _position(pts: np.ndarray, value: int | None) -> int | None:
    """Where ``value`` is in the sorted ``pts``, or None."""
    i = int(np.searchsorted(pts, value)) if value is not None else len(pts)
    return i if i < len(pts) and pts[i] == value else None


def _seek_before(container, stream, timeline: Timeline, first: int) -> None:
    """Start decoding two GOPs before the first frame needed, when that skips anything.

    A frame decodes the same from its own GOP's key frame as from the start of a closed-GOP stream;
    the GOP before covers an open GOP's leading frames, which reference it. The plan still checks
    that every frame needed comes out with its timestamp.
    """
    if timeline.keyframe is None:
        return
    keys = np.flatnonzero(timeline.keyframe[: first + 1])
    if len(keys) < 2 or keys[-2] == 0:
        return
    container.seek(int(timeline.pts[keys[-2]]), stream=stream, backward=True, any_frame=False)


def decode_picked(
    source: Source,
    timeline: Timeline,
    picked: np.ndarray,
    deliver: Callable[[int, np.ndarray], None],
    *,
    by_order: bool = False,
) -> None:
    """Decode the timeline frames in ``picked`` (sorted indices) and ``deliver(index, rgb)`` each in order.

    With ``by_order`` the decoder's n-th frame is timeline frame n (no skipping; for a timeline made
    by :func:`frame_timeline`); otherwise frames are matched by timestamp, the ones no pick needs
    are skipped where the codec allows, and :class:`Mismatch` is raised when the stream disagrees
    with the timeline.
    """
    needed = {int(i) for i in picked}
    last = len(timeline) - 1
    # the last frame's end sets the slot count: the frame must exist
    check = set(needed) if by_order else needed | {last}
    wanted = {int(timeline.pts[i]) for i in check}
    skip = None
    if not by_order and source.codec in _SKIP_NONREF:
        skip = lambda packet: packet.pts not in wanted
    to_rgb = None
    previous = -1
    try:
        with av.open(source.path) as container:
            stream = _stream(container, source)
            if not by_order:
                _seek_before(container, stream, timeline, min(needed))
            for n, frame in enumerate(_decoded(container, stream, skip)):
                index = n if by_order else _position(timeline.pts, frame.pts)
                if index is None or index <= previous:
                    raise Mismatch(f"frame at {frame.pts} is not next in the timeline")
                previous = index
                check.discard(index)
                if index in needed:
                    to_rgb = to_rgb or _ToRGB(frame)
                    deliver(index, to_rgb(frame))
                if not check:
                    return
    except av.FFmpegError as e:
        raise VideoError(f"{source.path}: cannot decode ({e})") from e
    if check:
        raise Mismatch(f"{len(check)} frames of the timeline never came out of the decoder")
