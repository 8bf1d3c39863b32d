"""Memory: what load_video holds is what it returns plus a constant, however many frames the
fps filter samples before the max_frames cut (the reference holds all of them)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from penguin_vl.video import load_video
from tests.video_samples import make_video


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 80 s at 25 fps, small frames: 800 frames sampled at fps 10
    path = make_video(tmp_path_factory.mktemp("long") / "long.avi", codec="mpeg4", rate=25, frames=2000)
    load_video(path, max_frames=2)  # first-use allocations (lookup tables, codec state) out of the way
    return path


def traced_peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_is_output_plus_constant(long_video: Path) -> None:
    # numpy reports its buffers to tracemalloc: the frames, the plan, the key-frame typer's arrays
    video, peak = traced_peak(lambda: load_video(long_video, fps=10.0, max_frames=6))
    frame_bytes = video.frames[0].nbytes
    sampled = 800  # what the reference holds before thinning
    assert len(video) == 6
    assert peak < video.frames.nbytes + 2_000_000
    assert peak < sampled * frame_bytes / 8


def test_peak_does_not_grow_with_the_sampled_count(long_video: Path) -> None:
    _, few = traced_peak(lambda: load_video(long_video, fps=1.0, max_frames=6))
    _, many = traced_peak(lambda: load_video(long_video, fps=20.0, max_frames=6))
    # 80 against 1600 frames sampled; the plan's arrays grow by two integers per slot, nothing more
    assert many - few < 1600 * 16 + 200_000
