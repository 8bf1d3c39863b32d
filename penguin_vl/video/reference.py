"""The reference's video path, step by step as SPEC section 8 describes it: for tests and benchmarks only.

Every frame is decoded and pushed through a libavfilter graph built as the ``ffmpeg`` command line
builds it (input time offset, ``trim`` for ``-ss``/``-t``, ``fps=<fps>:round=down``,
``format=rgb24``), the copies its constant-rate raw output adds at the start are added, every
sampled frame is held, then thinned with ``linspace``; key frames are typed with the reference's
algorithm: all frames resized at once, and at every comparison both frames
converted to HSV with OpenCV and cut into patches again. OpenCV is imported only here: it is not a
dependency of the package. Where it is not installed, the HSV conversion is the package's own
(:func:`penguin_vl.video.rgb_to_hsv`, equal to OpenCV's for every colour where both run); folders
of frames, which the reference reads with OpenCV, need it.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from penguin_vl.video.decode import cli_tail_us, container_start
from penguin_vl.video.keyframes import rgb_to_hsv
from penguin_vl.video.timing import rescale

__all__ = ["reference_frame_sample", "reference_frame_types", "reference_load_video", "reference_smart_resize"]

_MICROSECOND = Fraction(1, 1_000_000)


def reference_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The reference's ``smart_resize``."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"Aspect ratio must be < 200, got {max(height, width) / min(height, width)}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt((height * width) / max_pixels)
        h = math.floor(height / scale / factor) * factor
        w = math.floor(width / scale / factor) * factor
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return max(h, factor), max(w, factor)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        return rgb_to_hsv(rgb)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)


def _frame_similarity(frame1: torch.Tensor, frame2: torch.Tensor) -> float:
    def hsv_patches(t: torch.Tensor) -> torch.Tensor:
        arr = t.permute(1, 2, 0).numpy().astype(np.uint8)
        hsv = torch.from_numpy(_rgb_to_hsv(arr)).permute(2, 0, 1).float()
        c, h, w = hsv.shape
        return hsv.reshape(c, h // 14, 14, w // 14, 14).permute(1, 3, 0, 2, 4).reshape(h // 14, w // 14, c * 196)

    patch1, patch2 = hsv_patches(frame1), hsv_patches(frame2)
    norm1 = torch.norm(patch1, p=2, dim=-1, keepdim=True) + 1e-8
    norm2 = torch.norm(patch2, p=2, dim=-1, keepdim=True) + 1e-8
    cos_sim = (patch1 / norm1 * patch2 / norm2).sum(dim=-1)
    both_near_zero = (norm1.squeeze() < 0.01) & (norm2.squeeze() < 0.01)
    similar = torch.ones_like(cos_sim)
    similar[~both_near_zero] = (cos_sim[~both_near_zero] > 0.7).float()
    return similar[~both_near_zero].float().mean().item()


def reference_frame_types(frames: np.ndarray) -> np.ndarray:
    """The reference's ``extract_ki_frames`` on uint8 ``[N, H, W, 3]`` frames: int32 ``[N]``, 0 key, 1 not."""
    batch = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))).float()
    _, _, h, w = batch.shape
    size = reference_smart_resize(h, w, 14, 10 * 14 * 14, 10240 * 14 * 14)
    resized = F.interpolate(batch, size, mode="bilinear", antialias=True).float()
    keys = [0]
    key = resized[0]
    for i in range(1, resized.shape[0]):
        if _frame_similarity(key, resized[i]) < 0.95:
            keys.append(i)
            key = resized[i]
    types = np.ones(len(frames), dtype=np.int32)
    types[keys] = 0
    return types


def _cli_microseconds(seconds: float) -> int:
    whole, _, fraction = repr(float(seconds)).partition(".")
    return int(whole) * 1_000_000 + int((fraction + "000000")[:6])


def _fps_graph(first: av.VideoFrame, fps: float, duration_us: int | None) -> av.filter.Graph:
    graph = av.filter.Graph()
    chain = [graph.add_buffer(template=first)]
    rotation = -round(first.rotation or 0) % 360
    if rotation == 90:
        chain.append(graph.add("transpose", "clock"))
    elif rotation == 180:
        chain += [graph.add("hflip"), graph.add("vflip")]
    elif rotation == 270:
        chain.append(graph.add("transpose", "cclock"))
    if duration_us is not None:
        chain.append(graph.add("trim", f"start=0:duration={duration_us}us"))
    chain += [graph.add("fps", f"fps={fps!r}:round=down"), graph.add("format", "rgb24"), graph.add("buffersink")]
    for a, b in zip(chain, chain[1:], strict=False):
        a.link_to(b)
    graph.configure()
    return graph


def _drain(graph: av.filter.Graph, out: list[np.ndarray]) -> None:
    while True:
        try:
            frame = graph.pull()
        except (av.BlockingIOError, av.EOFError):
            return
        # the command line writes its raw output at a constant rate from time 0 (-vsync cfr): a
        # first frame k periods in is written k + 1 times (its pts counts periods of 1/fps)
        out.extend([frame.to_ndarray()] * (1 + max(frame.pts, 0) if not out else 1))


def _ffmpeg_frames(path: str, fps: float, start: float | None, end: float | None):
    with av.open(path) as container:
        container_start_us = container_start(container)
    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.dts) for p in container.demux(stream) if p.size]
        tail_us = cli_tail_us(container, stream, packets)
        last_pts = max((pts for pts, _ in packets if pts is not None), default=None)
    with av.open(path) as container:
        stream = container.streams.video[0]
        height, width = stream.codec_context.height, stream.codec_context.width
        tb = stream.time_base
        duration = float(f"{container.duration * 1e-6:f}")
        first_time = float(f"{(stream.start_time or 0) * tb.numerator / tb.denominator:f}")
        trim = start is not None or end is not None
        if start is not None:
            moved = max(first_time, start)
            duration -= moved - start
            first_time = moved
        if end is not None:
            duration = min(duration, end - first_time)
        offset_us = container_start_us + (_cli_microseconds(first_time) if trim else 0)
        exact = offset_us * Fraction(1, 1_000_000) / Fraction(tb.numerator, tb.denominator)
        shift = math.floor(abs(exact) + Fraction(1, 2)) * (1 if exact >= 0 else -1)
        graph, frames = None, []
        for frame in container.decode(stream):
            if tail_us is not None and frame.pts == last_pts:
                # the stream ends where FFmpeg 5.1's command line ends it, not a whole frame later
                pts, base = frame.pts - shift, Fraction(tb.numerator, tb.denominator)
                end_us = rescale(pts, base, _MICROSECOND) + tail_us
                frame.duration = rescale(end_us, _MICROSECOND, base) - pts
            frame.pts -= shift
            if graph is None:
                graph = _fps_graph(frame, fps, _cli_microseconds(duration) if trim else None)
            try:
                graph.push(frame)
            except av.EOFError:  # trim has closed the graph
                break
            _drain(graph, frames)
        else:
            graph.push(None)
        _drain(graph, frames)
    timestamps = np.arange(first_time, first_time + duration + 1 / fps, 1 / fps)[: len(frames)]
    # the raw bytes of the (autorotated) frames, reshaped with the stream's stored size
    raw = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3).copy(), timestamps


def reference_frame_sample(
    count: int, vid_fps: float, fps: float, max_frames: int, start: float | None, end: float | None
) -> list[int]:
    """The frames ``load_video_from_ids`` picks of ``count`` read at ``vid_fps``: the window's frames
    (negative times at 0, a reversed window swapped, an empty one made a second long), then
    ``frame_sample`` (every ``vid_fps // fps``-th from the middle of the first segment, or ``linspace``
    when that would pass ``max_frames``)."""
    if start is not None and end is not None:
        start, end = max(start, 0.0), max(end, 0.0)
        if start > end:
            start, end = end, start
        elif start == end:
            end = start + 1
    f_start = 0 if start is None else max(int(start * vid_fps) - 1, 0)
    f_end = count - 1 if end is None else min(int(end * vid_fps) - 1, count - 1)
    indices = list(range(f_start, f_end + 1))
    duration = len(indices)
    if duration / vid_fps < max_frames:
        segment = min(vid_fps // fps, duration)
        chosen = np.arange(segment // 2, duration, segment, dtype=int)
    elif duration <= max_frames:
        chosen = np.arange(duration).astype(int)
    else:
        chosen = np.linspace(0, duration - 1, max_frames, dtype=int)
    return [indices[i] for i in chosen]


def _index_frames(path: str, fps: float, max_frames: int, start, end):
    # load_video_from_ids: folders at 3 fps, GIFs at 25, short windows of videos at their average rate
    if os.path.isdir(path):
        import cv2

        names = sorted(os.listdir(path))
        vid_fps, count = 3, len(names)
    elif path.endswith(".gif"):
        gif = Image.open(path)
        vid_fps, count = 25, gif.n_frames
    else:
        with av.open(path) as container:
            stream = container.streams.video[0]
            vid_fps = float(stream.average_rate)
            decoded, turn = [], 0
            for frame in container.decode(stream):
                turn = -round(frame.rotation or 0) % 360
                decoded.append(frame.to_ndarray(format="rgb24"))
            count = len(decoded)
        # decord (0.6) turns a half-turned video upright and fails on a quarter turn
        if turn in (90, 270):
            raise RuntimeError(f"{path}: decord cannot read the frames of a video turned {turn} degrees")
        if turn == 180:
            decoded = [np.ascontiguousarray(rgb[::-1, ::-1]) for rgb in decoded]
    sampled = reference_frame_sample(count, vid_fps, fps, max_frames, start, end)
    if os.path.isdir(path):
        frames = [cv2.cvtColor(cv2.imread(os.path.join(path, names[i])), cv2.COLOR_BGR2RGB) for i in sampled]
    elif path.endswith(".gif"):
        frames = []
        for i in range(count):
            gif.seek(i)
            if i in sampled:
                frames.append(np.asarray(gif.convert("RGBA"))[..., :3])
    else:
        frames = [decoded[i] for i in sampled]
    return np.stack(frames), np.asarray([x / vid_fps for x in sampled])


def reference_load_video(
    path: str | os.PathLike,
    fps: float = 1.0,
    max_frames: int = 180,
    start: float | None = None,
    end: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's ``load_video``: frames uint8 ``[T, H, W, 3]``, timestamps, frame types."""
    path = os.fspath(path)
    short = start is not None and end is not None and end - start < 1
    if short or os.path.isdir(path) or path.endswith(".gif"):
        frames, timestamps = _index_frames(path, fps, max_frames, start, end)
    else:
        frames, timestamps = _ffmpeg_frames(path, fps, start, end)
        if len(frames) > max_frames:
            keep = np.linspace(0, len(frames) - 1, max_frames, dtype=int)
            frames, timestamps = frames[keep], timestamps[keep]
    return frames, np.asarray(timestamps, dtype=np.float64), reference_frame_types(frames)
