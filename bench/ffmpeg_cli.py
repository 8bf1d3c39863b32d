"""The reference's video decode, run through the real ``ffmpeg`` and ``ffprobe`` command lines.

The reference's ``load_video`` (SPEC section 8) probes the file with ``ffprobe -show_format
-show_streams -of json``, then builds (through ``ffmpeg-python``) and runs::

    ffmpeg [-ss <start> -t <duration>] -i <path> -filter_complex [0]fps=fps=<fps>:round=down[s0]
           -map [s0] -f rawvideo -pix_fmt rgb24 pipe:

with every number written as Python's ``str`` writes it, reshapes the piped bytes with the first
video stream's stored width and height, and counts timestamps from its own start and duration. A
window shorter than a second goes to decord instead (``load_video_from_ids``): frames indexed at the
stream's average rate. This module does the same, so that ``penguin_vl.load_video`` and
``penguin_vl.video.reference`` can be checked against the programs themselves. Usage::

    python -m bench.ffmpeg_cli clip.mp4 --fps 2 --start 1.5 --end 4 [--max-frames 8] [--out frames.npy]

Key frames are not computed here: they depend on the frames alone, which is what is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np

from penguin_vl.video.reference import reference_frame_sample

__all__ = ["available", "cli_command", "cli_load_video", "decord_available", "probe"]


def available() -> bool:
    """Whether ``ffmpeg`` and ``ffprobe`` are on PATH."""
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def probe(path: str) -> dict:
    """``ffmpeg.probe(path)``: ffprobe's JSON for the format and the streams."""
    out = subprocess.run(
        ["ffprobe", "-show_format", "-show_streams", "-of", "json", path], capture_output=True, check=True
    )
    return json.loads(out.stdout)


def cli_command(
    path: str, fps: float, start: float | None, end: float | None
) -> tuple[list[str], float, float, tuple[int, int]]:
    """The reference's ``ffmpeg`` command line for this window, its start time and duration, and the
    stored ``(height, width)`` its output is reshaped with."""
    info = probe(path)
    duration = float(info["format"]["duration"])
    stream = next(s for s in info["streams"] if s["codec_type"] == "video")
    size = int(stream["height"]), int(stream["width"])
    trimmed = start is not None or end is not None
    if start is not None:
        moved = max(float(stream["start_time"]), start)
        duration -= moved - start
        start = moved
    else:
        start = float(stream["start_time"])
    if end is not None:
        duration = min(duration, end - start)
    argv = ["ffmpeg"]
    if trimmed:  # ffmpeg-python writes keyword options sorted, values with str()
        argv += ["-ss", str(start), "-t", str(duration)]
    argv += ["-i", path, "-filter_complex", f"[0]fps=fps={fps}:round=down[s0]", "-map", "[s0]"]
    argv += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    return argv, start, duration, size


def _decord_window(path: str, fps: float, max_frames: int, start: float, end: float):
    # load_video_from_ids for a video file (video files only: GIFs and folders never reach ffmpeg)
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=2)
    rate, count = reader.get_avg_fps(), len(reader)
    sampled = reference_frame_sample(count, rate, fps, max_frames, start, end)
    frames = reader.get_batch(sampled).asnumpy()
    return frames, np.asarray([x / rate for x in sampled], dtype=np.float64)


def cli_load_video(
    path: str | os.PathLike,
    fps: float = 1.0,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 ``[T, H, W, 3]`` and float64 timestamps as the reference's ``load_video`` gets them
    from the command line (decord for windows under a second), thinned to ``max_frames`` when given."""
    path = os.fspath(path)
    if start is not None and end is not None and end - start < 1:
        if not decord_available():
            raise RuntimeError("a window under one second is read with decord, which is not installed")
        return _decord_window(path, fps, 180 if max_frames is None else max_frames, start, end)
    argv, first, duration, (height, width) = cli_command(path, fps, start, end)
    done = subprocess.run(argv, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr.decode(errors='replace')[-2000:]}")
    frames = np.frombuffer(done.stdout, np.uint8).reshape(-1, height, width, 3)
    timestamps = np.arange(first, first + duration + 1 / fps, 1 / fps)[: len(frames)]
    if max_frames is not None and len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames, dtype=int)
        frames, timestamps = frames[keep], np.asarray([timestamps[i] for i in keep])
    return frames, np.asarray(timestamps, dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--start", type=float, default=None)
    parser.add_argument("--end", type=float, default=None)
    parser.add_argument("--out", help="save the frames here (.npy)")
    args = parser.parse_args()
    frames, timestamps = cli_load_video(args.path, args.fps, args.max_frames, args.start, args.end)
    print(f"frames {list(frames.shape)} sha256 {hashlib.sha256(frames.tobytes()).hexdigest()}")
    print("timestamps", timestamps.tolist())
    if args.out:
        np.save(args.out, frames)


if __name__ == "__main__":
    main()
