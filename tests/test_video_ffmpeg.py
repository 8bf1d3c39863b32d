"""load_video and the reference path against the reference's own decoders: the ``ffmpeg`` command line
(and decord, for windows under a second).

Recorded: ``tests/data/video_cli/`` holds small videos and, per case, the shape, frame sha256 and
timestamps that ``bench.ffmpeg_cli`` got from FFmpeg 5.1's command line and decord 0.6 (rewritten by
``python -m bench.ffmpeg_fixtures``); these run everywhere. Live: where ``ffmpeg`` is on PATH, the
recordings are checked to still be what it gives, and more windows of generated videos are compared.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from bench.ffmpeg_cli import available, cli_load_video, decord_available
from penguin_vl.video import VideoError, load_video
from penguin_vl.video.reference import reference_load_video
from penguin_vl.video.timing import cfr_slots
from tests.video_samples import make_video, with_rotation

DATA = Path(__file__).parent / "data" / "video_cli"
RECORDED = json.loads((DATA / "expected.json").read_text())["cases"]
IDS = [f"{c['file']}-{'-'.join(f'{k}={v}' for k, v in c['kwargs'].items())}" for c in RECORDED]

requires_ffmpeg = pytest.mark.skipif(not available(), reason="ffmpeg and ffprobe are not on PATH")


def _short(kwargs: dict) -> bool:
    return kwargs.get("start") is not None and kwargs.get("end") is not None and kwargs["end"] - kwargs["start"] < 1


def _check(case: dict, frames: np.ndarray, timestamps: np.ndarray) -> None:
    assert list(frames.shape) == case["shape"]
    assert hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest() == case["sha256"], "frames differ"
    assert np.asarray(timestamps, dtype=np.float64).tolist() == case["timestamps"]


@pytest.mark.parametrize("case", RECORDED, ids=IDS)
def test_load_video_gives_the_recorded_output(case: dict) -> None:
    if case["shape"][0] == 0:  # the reference gets no frame (and then fails)
        with pytest.raises(VideoError, match="no frames"):
            load_video(DATA / case["file"], **case["kwargs"])
        return
    video = load_video(DATA / case["file"], **case["kwargs"])
    _check(case, video.frames, video.timestamps)


@pytest.mark.parametrize("case", RECORDED, ids=IDS)
def test_reference_path_gives_the_recorded_output(case: dict) -> None:
    if case["shape"][0] == 0:
        with pytest.raises(IndexError):  # extract_ki_frames on no frame, as in the reference
            reference_load_video(DATA / case["file"], **case["kwargs"])
        return
    frames, timestamps, _ = reference_load_video(DATA / case["file"], **case["kwargs"])
    _check(case, frames, timestamps)


@requires_ffmpeg
@pytest.mark.parametrize("case", RECORDED, ids=IDS)
def test_recordings_are_what_the_programs_give(case: dict) -> None:
    kwargs = case["kwargs"]
    if _short(kwargs) and not decord_available():
        pytest.skip("a window under one second is read with decord, which is not installed")
    frames, timestamps = cli_load_video(
        DATA / case["file"], kwargs["fps"], kwargs.get("max_frames", 180), kwargs.get("start"), kwargs.get("end")
    )
    _check(case, frames, timestamps)


def test_quarter_turned_short_window_fails_in_the_reference() -> None:
    # decord cannot copy out a quarter-turned video's frames; load_video reads them (documented)
    with pytest.raises(RuntimeError, match="decord"):
        reference_load_video(DATA / "rot90.mp4", fps=2.0, start=0.1, end=0.9)
    assert len(load_video(DATA / "rot90.mp4", fps=2.0, start=0.1, end=0.9)) == 2


def test_cfr_slots_repeat_a_late_first_slot() -> None:
    slots = np.array([0, 1, 1, 2])
    # a first frame 2.5 periods in (slot 2) is written three times; within the first period, once
    assert cfr_slots(slots, 75, Fraction(1, 30), Fraction(1)).tolist() == [0, 0, 0, 1, 1, 2]
    assert cfr_slots(slots, 29, Fraction(1, 30), Fraction(1)).tolist() == [0, 1, 1, 2]
    assert cfr_slots(slots, 0, Fraction(1, 30), Fraction(1)).tolist() == [0, 1, 1, 2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    jitter = np.random.default_rng(3).uniform(0.01, 0.09, 60).cumsum()
    videos = {
        "bframes": make_video(d / "bframes.mp4", frames=90, options={"g": "15", "bf": "3"}),
        "open_gops": make_video(
            d / "open_gops.mp4", frames=90, options={"x264-params": "keyint=12:min-keyint=12:open-gop=1:bframes=3"}
        ),
        "vfr": make_video(d / "vfr.mkv", frames=60, times=lambda i: float(jitter[i])),
        "late": make_video(d / "late.mkv", frames=60, times=lambda i: 0.83 + i / 30),
        # B-frames, a millisecond codec time base: FFmpeg 5.1 gives the MP4's packets no duration
        "late_mp4": make_video(d / "late.mp4", frames=60, rate=25, times=lambda i: 1.37 + i / 25),
        "audio_first": make_video(
            d / "audio_first.mkv", frames=50, times=lambda i: 1.1 + i / 25, audio_first=1.1, audio_codec="pcm_s16le"
        ),
        # audio with encoder priming before the video: FFmpeg 5.1 starts the container inside it
        "opus_first": make_video(
            d / "opus_first.webm",
            codec="libvpx-vp9",
            frames=45,
            times=lambda i: 0.2 + i / 30,
            audio_first=0.2,
            audio_codec="libopus",
        ),
        "aac_first": make_video(d / "aac_first.mkv", frames=50, times=lambda i: 0.75 + i / 30, audio_first=0.75),
        "hevc_aac": make_video(
            d / "hevc_aac.mp4", codec="libx265", frames=60, options={"x265-params": "log-level=none"}, audio_first=0.0
        ),
        "odd": make_video(d / "odd.mkv", codec="ffv1", size=(97, 55), frames=45, rate=24),
        "av1": make_video(d / "av1.mp4", codec="libsvtav1", frames=60, options={"preset": "12"}),
        "mov": make_video(d / "bframes.mov", frames=60, options={"bf": "2"}, times=lambda i: 0.37 + i / 30),
    }
    videos["rot270"] = with_rotation(videos["bframes"], d / "rot270.mp4", 90)
    return videos


LIVE = (
    [
        (name, {"fps": fps, "start": start, "end": end})
        for name in (
            "bframes",
            "open_gops",
            "vfr",
            "late",
            "late_mp4",
            "audio_first",
            "opus_first",
            "aac_first",
            "hevc_aac",
            "rot270",
        )
        for fps in (0.5, 1.0, 2.5, 7.0)
        for start, end in ((None, None), (0.37, 2.05), (1.0, None), (None, 2.55), (0.0, 9.0))
    ]
    + [("odd", {"fps": 4.0}), ("av1", {"fps": 2.5}), ("av1", {"fps": 7.0, "start": 0.37, "end": 1.55})]
    + [("mov", {"fps": 2.5}), ("mov", {"fps": 7.0, "start": 0.5, "end": 1.7})]
    + [("bframes", {"fps": 40.0, "start": 0.52}), ("vfr", {"fps": 30.0, "start": 1.01})]
)


@requires_ffmpeg
@pytest.mark.parametrize(("name", "kwargs"), LIVE, ids=[f"{n}-{k}" for n, k in LIVE])
def test_against_the_command_line(generated: dict[str, Path], name: str, kwargs: dict) -> None:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    frames, timestamps = cli_load_video(generated[name], kwargs["fps"], 180, kwargs.get("start"), kwargs.get("end"))
    if len(frames) == 0:
        with pytest.raises(VideoError, match="no frames"):
            load_video(generated[name], **kwargs)
        return
    video = load_video(generated[name], **kwargs)
    assert video.frames.shape == frames.shape and np.array_equal(video.frames, frames), "frames differ"
    assert np.array_equal(video.timestamps, timestamps), (video.timestamps, timestamps)
    ref_frames, ref_timestamps, _ = reference_load_video(generated[name], **kwargs)
    assert np.array_equal(ref_frames, frames) and np.array_equal(ref_timestamps, timestamps)
