"""CPU cost of a video file to ``pixel_values`` against the reference's path, and of key-frame typing.

The baseline is :mod:`penguin_vl.video.reference`, the reference's path step by step (SPEC section
8): every frame decoded and pushed through ``fps`` and ``format=rgb24``, every sampled frame held,
``linspace`` thinning, ``extract_ki_frames`` (all frames resized at once, both frames of every
comparison converted to HSV with OpenCV again), then the reference preprocessor
(:func:`penguin_vl.processor.reference_preprocess`) with merge 2 and those frame types. Ours is
:func:`penguin_vl.load_video` then :class:`penguin_vl.ImageProcessor`. Both give the same bits,
checked before timing. torch runs on one thread; the decoder keeps its own slice threads.

The clips are made here with PyAV (libx264, moving shapes and scene cuts) at the sizes of the
SPEC's measurements: 29 s of 608x342 at 25 fps sampled at fps 1, and 20 s of 854x480 at 24 fps
sampled at fps 2. ``speedup_vs_reference`` is the baseline's median time over ours.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.harness import cpu_bench
from penguin_vl import ImageProcessor, load_video
from penguin_vl.processor import reference_preprocess
from penguin_vl.video import KeyFrameTyper
from penguin_vl.video.reference import reference_frame_types, reference_load_video
from tests.video_samples import make_video

CLIPS = {
    "608x342_25fps_29s_fps1": dict(size=(608, 342), rate=25, frames=725, fps=1.0),
    "854x480_24fps_20s_fps2": dict(size=(854, 480), rate=24, frames=480, fps=2.0),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {
        name: make_video(
            root / f"{name}.mp4",
            size=c["size"],
            rate=c["rate"],
            frames=c["frames"],
            options={"preset": "veryfast", "bf": "3", "keyint": "250"},
        )
        for name, c in CLIPS.items()
    }


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def ours(path: Path, fps: float, processor: ImageProcessor):
    video = load_video(path, fps=fps)
    return processor(list(video.frames), merge_size=2, frame_types=video.frame_types)


def reference(path: Path, fps: float):
    frames, _, types = reference_load_video(path, fps=fps)
    return reference_preprocess(list(frames), merge_size=2, frame_types=types.tolist())


@pytest.mark.parametrize("name", list(CLIPS), ids=str)
def test_video_file_to_pixel_values(benchmark, one_thread, clips, name):
    """Decode, sample, type key frames and preprocess one clip, against the reference's path."""
    path, fps = clips[name], CLIPS[name]["fps"]
    processor = ImageProcessor()
    out, ref = ours(path, fps, processor), reference(path, fps)
    assert torch.equal(out.pixel_values, ref.pixel_values) and torch.equal(out.grid_sizes, ref.grid_sizes)
    result = cpu_bench(
        benchmark,
        lambda: ours(path, fps, processor),
        [()],
        baselines={"reference": lambda: reference(path, fps)},
        rounds=5,
        info={"clip": name, "frames": int(out.grid_sizes.shape[0]), "tokens": int(out.pixel_values.shape[0]) // 4},
    )
    if result is not None:
        benchmark.extra_info["threads"] = torch.get_num_threads()


def typed(frames: np.ndarray) -> list[int]:
    typer = KeyFrameTyper(*frames.shape[1:3])
    return [typer.add(frame) for frame in frames]


@pytest.mark.parametrize("name", list(CLIPS), ids=str)
def test_key_frame_typing(benchmark, one_thread, clips, name):
    """Key-frame typing of a clip's sampled frames, against the reference's ``extract_ki_frames``."""
    frames = load_video(clips[name], fps=CLIPS[name]["fps"]).frames
    types = typed(frames)
    assert types == reference_frame_types(frames).tolist()
    cpu_bench(
        benchmark,
        typed,
        [(frames,)],
        baselines={"reference": reference_frame_types},
        rounds=15,
        info={"clip": name, "frames": len(frames), "key_frames": types.count(0)},
    )


_PEAK_RSS = """
import resource, sys, torch
torch.set_num_threads(1)
from penguin_vl import load_video
video = load_video(sys.argv[1], fps=1.0, max_frames=180)
print(len(video), video.frames.nbytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_long_video_peak_memory(benchmark, tmp_path_factory):
    """A 20-minute 720p clip at fps 1 with max_frames 180, in a fresh process: its peak resident memory.

    The reference holds all 1,200 sampled frames (3.3 GB) before thinning to 180; here the 180 frames
    returned (0.5 GB) are the only pixels held. The clip runs at 5 frames a second so that making it
    takes about a minute; the decoder still reads every packet.
    """
    path = make_video(
        tmp_path_factory.mktemp("long") / "long_720p.mp4",
        size=(1280, 720),
        rate=5,
        frames=20 * 60 * 5,
        options={"preset": "ultrafast", "g": "50"},
    )
    runs = []

    def run():
        done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
        runs.append([int(v) for v in done.stdout.split()])

    benchmark.pedantic(run, rounds=1, iterations=1)
    frames, frame_bytes, peak = runs[-1]
    assert frames == 180
    benchmark.extra_info.update(
        {
            "clip": "1280x720_5fps_20min_fps1_max180",
            "peak_rss_gb": peak / 1e9,
            "frames_gb": frame_bytes / 1e9,
            "reference_sampled_frames_gb": 1200 * 1280 * 720 * 3 / 1e9,
        }
    )
