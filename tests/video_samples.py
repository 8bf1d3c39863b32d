"""Small video files made with PyAV for the video tests: scene cuts, fades, a moving block, chosen
codecs and containers, variable frame rates, offset starts, rotation metadata, audio."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def picture(i: int, n: int, height: int, width: int) -> np.ndarray:
    """Frame ``i`` of ``n``: three scenes with hard cuts, a fade to black in the middle one, a moving block."""
    scene = 3 * i // n
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.empty((height, width, 3), dtype=np.int64)
    rgb[..., 0] = (xx * 255 // max(width - 1, 1) + 90 * scene + 3 * i) % 256
    rgb[..., 1] = (yy * 255 // max(height - 1, 1) + 70 * scene) % 256
    rgb[..., 2] = (60 + 60 * scene + 2 * i) % 256
    if scene == 1:  # fade out over the scene
        within = i - n // 3
        rgb = rgb * max(0.0, 1.0 - within / max(n // 3, 1)) // 1
    y = (i * 2) % max(height - height // 4, 1)
    x = (i * 3) % max(width - width // 4, 1)
    rgb[y : y + height // 4, x : x + width // 4] = (250, 250 - 100 * scene, 20)
    return rgb.clip(0, 255).astype(np.uint8)


def make_video(
    path: Path,
    *,
    codec: str = "libx264",
    size: tuple[int, int] = (96, 72),
    rate: int = 30,
    frames: int = 60,
    pix_fmt: str = "yuv420p",
    times: Callable[[int], float] | None = None,
    audio_first: float | None = None,
    audio_codec: str = "aac",
    options: dict[str, str] | None = None,
) -> Path:
    """Write ``frames`` pictures; ``times(i)`` gives frame i's time in seconds (variable frame rate,
    a late start), else ``i / rate``. ``audio_first`` adds a silent audio stream (``audio_codec``)
    starting that many seconds before the video."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = options
        time_base = Fraction(1, 1000) if times else Fraction(1, rate)
        stream.codec_context.time_base = time_base
        audio = None
        if audio_first is not None:
            audio = container.add_stream(audio_codec, rate=8000, layout="mono")
        if audio is not None:
            planar = audio_codec == "aac"  # the encoder's sample format: float planar, else s16
            samples = np.zeros((1, 1024), dtype=np.float32 if planar else np.int16)
            start = (times(0) if times else 0.0) - audio_first
            for k in range(int((frames / rate + audio_first) * 8000 / 1024) + 1):
                chunk = av.AudioFrame.from_ndarray(samples, format="fltp" if planar else "s16", layout="mono")
                chunk.sample_rate, chunk.time_base = 8000, Fraction(1, 8000)
                chunk.pts = round(start * 8000) + k * 1024
                for packet in audio.encode(chunk):
                    container.mux(packet)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(picture(i, frames, height, width), format="rgb24")
            frame.pts = round(times(i) * 1000) if times else i
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            for packet in audio.encode():
                container.mux(packet)
    return path


def with_rotation(src: Path, dst: Path, degrees: float) -> Path:
    """``src``'s packets, unchanged, in a new file whose display matrix rotates by ``degrees`` (counterclockwise)."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as target:
        stream = source.streams.video[0]
        out = target.add_stream_from_template(stream)
        out.set_display_rotation(degrees)
        for packet in source.demux(stream):
            if packet.size:
                packet.stream = out
                target.mux(packet)
    return dst


def two_videos(path: Path, *, frames: int = 24, rate: int = 24) -> Path:
    """Two H.264 streams in one file: a small one (48x32) first, a larger one (64x48) second."""
    with av.open(str(path), "w") as container:
        streams = []
        for width, height in ((48, 32), (64, 48)):
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            streams.append(stream)
        for i in range(frames):
            for k, stream in enumerate(streams):
                frame = av.VideoFrame.from_ndarray(picture(i + 7 * k, frames + 7 * k, stream.height, stream.width))
                frame.pts, frame.time_base = i, Fraction(1, rate)
                for packet in stream.encode(frame):
                    container.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                container.mux(packet)
    return path
