"""Writes ``tests/data/video_cli/``: small videos and what the reference's own decode gives for them.

For every case, the frames and timestamps of :func:`bench.ffmpeg_cli.cli_load_video` (the
``ffmpeg`` command line, or decord for windows under a second) are recorded as their shape, the
sha256 of the frame bytes and the timestamps, so that ``tests/test_video_ffmpeg.py`` checks
``load_video`` against them where neither program is installed. Needs ``ffmpeg``/``ffprobe`` (the
recorded ones came from Debian's FFmpeg 5.1) and decord::

    python -m bench.ffmpeg_fixtures            # rewrites the videos and expected.json
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from bench.ffmpeg_cli import available, cli_load_video, decord_available
from tests.video_samples import make_video, two_videos, with_rotation

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "video_cli"


def make_videos(folder: Path) -> None:
    """The videos: B-frames and closed GOPs of 12, a stream starting at 1.37 s (in Matroska, and in
    MP4 with a millisecond codec time base), a video starting half
    a second after its (uncompressed) audio, a VP9 video after Opus audio (whose encoder priming starts
    the container before 0 for FFmpeg 5.1), a file with a small video stream before a larger one, and
    one clip under three rotation matrices."""
    folder.mkdir(parents=True, exist_ok=True)
    small = {"size": (64, 48), "rate": 24}
    make_video(folder / "gops.mp4", frames=72, options={"g": "12", "bf": "3"}, **small)
    make_video(folder / "late.mkv", frames=40, times=lambda i: 1.37 + i / 25, **small)
    # H.264 with B-frames and a millisecond time base in MP4: FFmpeg 5.1 gives its packets no duration
    make_video(folder / "late.mp4", frames=60, times=lambda i: 1.37 + i / 25, **small)
    make_video(
        folder / "audio_first.mkv",
        frames=36,
        times=lambda i: 0.5 + i / 24,
        audio_first=0.5,
        audio_codec="pcm_s16le",
        options={"g": "12", "bf": "2"},
        **small,
    )
    make_video(
        folder / "opus_first.webm",
        codec="libvpx-vp9",
        frames=30,
        times=lambda i: 0.3 + i / 24,
        audio_first=0.3,
        audio_codec="libopus",
        **small,
    )
    two_videos(folder / "two_streams.mkv")
    plain = make_video(folder / "plain.mp4", frames=24, **small)
    # display matrices for a quarter turn clockwise, a half turn, a quarter turn counterclockwise
    for name, degrees in (("rot90", -90), ("rot180", 180), ("rot270", 90)):
        with_rotation(plain, folder / f"{name}.mp4", degrees)
    plain.unlink()


# (file, load_video keyword arguments); windows under a second go to decord in the reference
CASES = [
    ("gops.mp4", {"fps": 1.0}),
    ("gops.mp4", {"fps": 2.5}),
    ("gops.mp4", {"fps": 0.5}),
    ("gops.mp4", {"fps": 6.0, "max_frames": 5}),
    ("gops.mp4", {"fps": 2.5, "start": 0.45, "end": 2.2}),  # inside a GOP, off frame boundaries
    ("gops.mp4", {"fps": 3.0, "start": 1.3}),
    ("gops.mp4", {"fps": 2.0, "start": 0.7, "end": 9.0}),  # past the end
    ("gops.mp4", {"fps": 0.5, "start": 0.0, "end": 2.6}),
    ("gops.mp4", {"fps": 45.0, "start": 1.01, "end": 2.3}),  # above the stream's rate: leading copies
    ("gops.mp4", {"fps": 2.0, "start": 1.2, "end": 1.9}),  # under a second
    ("gops.mp4", {"fps": 3.0, "start": 0.3, "end": 0.9}),
    ("late.mkv", {"fps": 2.0}),
    # -ss counts from the container's start (1.37 s here) while the reference passes stream times
    # (sic): these windows begin 1.37 s later than asked; the first two hold no frame for the reference
    ("late.mkv", {"fps": 2.5, "start": 0.5, "end": 2.5}),
    ("late.mkv", {"fps": 3.0, "start": 2.0, "end": 3.1}),
    ("late.mkv", {"fps": 10.0, "start": 0.5, "end": 2.5}),
    ("late.mkv", {"fps": 10.0, "start": 1.4}),
    ("late.mkv", {"fps": 2.0, "start": 1.5, "end": 2.2}),
    ("late.mp4", {"fps": 2.5}),  # the stream ends 1 ms after its last frame: one slot fewer
    ("late.mp4", {"fps": 2.5, "start": 1.5}),
    ("audio_first.mkv", {"fps": 1.0}),
    ("audio_first.mkv", {"fps": 2.5}),  # the first slot is one period in: written twice
    ("audio_first.mkv", {"fps": 3.0, "start": 0.2, "end": 1.7}),
    ("opus_first.webm", {"fps": 1.0}),
    ("opus_first.webm", {"fps": 2.5}),
    ("opus_first.webm", {"fps": 3.0, "start": 0.1, "end": 1.2}),
    ("two_streams.mkv", {"fps": 4.0}),  # the reference decodes the first video stream
    ("rot90.mp4", {"fps": 4.0}),
    ("rot180.mp4", {"fps": 4.0}),
    ("rot270.mp4", {"fps": 4.0, "start": 0.1, "end": 1.6}),
    ("rot180.mp4", {"fps": 2.0, "start": 0.1, "end": 0.9}),
]


def record(folder: Path, cases=CASES) -> dict:
    entries = []
    for file, kwargs in cases:
        frames, timestamps = cli_load_video(
            folder / file, kwargs["fps"], kwargs.get("max_frames", 180), kwargs.get("start"), kwargs.get("end")
        )
        entries.append(
            {
                "file": file,
                "kwargs": kwargs,
                "shape": list(frames.shape),
                "sha256": hashlib.sha256(frames.tobytes()).hexdigest(),
                "timestamps": timestamps.tolist(),
            }
        )
    import decord

    version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"ffmpeg": version, "decord": decord.__version__, "cases": entries}


def main() -> None:
    if not (available() and decord_available()):
        raise SystemExit("needs ffmpeg and ffprobe on PATH, and decord importable")
    make_videos(DATA)
    (DATA / "expected.json").write_text(json.dumps(record(DATA), indent=1) + "\n")
    total = sum(p.stat().st_size for p in DATA.iterdir())
    print(f"{len(CASES)} cases, {total / 1024:.0f} KiB in {DATA}")


if __name__ == "__main__":
    main()
