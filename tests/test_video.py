"""load_video against the reference: goldens made by running it, and generated files against its path
re-run step by step (penguin_vl.video.reference: every frame through the same filter graph)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from penguin_vl import ImageProcessor
from penguin_vl.video import Video, VideoError, load_video
from penguin_vl.video.reference import reference_load_video
from tests.video_samples import make_video, picture, with_rotation

GOLDEN = Path(os.environ.get("PENGUIN_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))
VIDEO_GOLDEN = GOLDEN / "video"
requires_golden = pytest.mark.skipif(
    not (VIDEO_GOLDEN / "clip_320x240.mp4").is_file(),
    reason=f"video goldens not found in {VIDEO_GOLDEN} (set PENGUIN_GOLDEN_DIR)",
)

GOLDEN_CASES = [
    ("video_clip_320x240_fps2", "clip_320x240.mp4", {"fps": 2.0}),
    ("video_clip_320x240_fps1_max5", "clip_320x240.mp4", {"fps": 1.0, "max_frames": 5}),
    ("video_anim_160x120_gif", "anim_160x120.gif", {"fps": 1.0}),
]


def assert_same_video(video: Video, frames: np.ndarray, timestamps: np.ndarray, types: np.ndarray) -> None:
    assert video.frames.dtype == np.uint8 and video.frames.shape == frames.shape
    assert np.array_equal(video.frames, frames), "frames differ"
    assert video.timestamps.dtype == np.float64
    assert np.array_equal(video.timestamps, timestamps), (video.timestamps, timestamps)
    assert np.array_equal(video.frame_types, types), (video.frame_types, types)


@requires_golden
@pytest.mark.parametrize(("name", "file", "kwargs"), GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_goldens(name: str, file: str, kwargs: dict) -> None:
    video = load_video(VIDEO_GOLDEN / file, **kwargs)
    with safe_open(str(VIDEO_GOLDEN / f"{name}.safetensors"), "np") as golden:
        meta = golden.metadata()
        frames = golden.get_tensor("frames").transpose(0, 2, 3, 1)
        assert_same_video(video, frames, golden.get_tensor("timestamps"), golden.get_tensor("frame_types"))
        grids = golden.get_tensor("grid_sizes")
    out = ImageProcessor()(list(video.frames), merge_size=2, frame_types=video.frame_types)
    assert list(out.pixel_values.shape) == [int(v) for v in meta["pixel_values_shape"].strip("[]").split(",")]
    assert hashlib.sha256(out.pixel_values.numpy().tobytes()).hexdigest() == meta["pixel_values_sha256"]
    assert np.array_equal(out.grid_sizes.numpy(), grids)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    jitter = np.random.default_rng(1).uniform(0.01, 0.09, 80).cumsum()
    videos = {
        "h264": make_video(d / "h264.mp4", frames=90),
        "vfr": make_video(d / "vfr.mkv", frames=80, times=lambda i: float(jitter[i])),
        "late_start": make_video(d / "late.mkv", frames=60, times=lambda i: 1.37 + i / 25),
        "audio_first": make_video(d / "audio_first.mkv", frames=60, times=lambda i: 0.75 + i / 30, audio_first=0.75),
        "odd_size": make_video(d / "odd.mkv", codec="ffv1", size=(97, 55), frames=45, rate=24),
        "hevc": make_video(d / "hevc.mp4", codec="libx265", frames=40, options={"x265-params": "log-level=none"}),
        "vp9": make_video(d / "vp9.webm", codec="libvpx-vp9", frames=40),
        "av1": make_video(d / "av1.mp4", codec="libsvtav1", frames=40, options={"preset": "12"}),
        "av1_mkv": make_video(d / "av1.mkv", codec="libsvtav1", frames=40, rate=24, options={"preset": "12"}),
        "mov": make_video(d / "h264.mov", frames=40, rate=30, options={"bf": "2"}),
        "mpeg4": make_video(d / "mpeg4.avi", codec="mpeg4", frames=50, rate=25, options={"bf": "2"}),
        "plain40": make_video(d / "plain40.mp4", frames=40),
        # key frames every 12 frames, closed and open GOPs: trimmed reads seek
        "gops": make_video(d / "gops.mp4", frames=150, options={"g": "12", "bf": "3"}),
        "open_gops": make_video(
            d / "open_gops.mp4", frames=150, options={"x264-params": "keyint=12:min-keyint=12:open-gop=1:bframes=3"}
        ),
    }
    # the same packets with display matrices asking for a quarter turn clockwise and a half turn
    videos["rot90"] = with_rotation(videos["plain40"], d / "rot90.mp4", -90)
    videos["rot180"] = with_rotation(videos["plain40"], d / "rot180.mp4", 180)
    videos["rot270"] = with_rotation(videos["plain40"], d / "rot270.mp4", 90)
    return videos


GENERATED = [
    ("h264", {"fps": 1.0}),
    ("h264", {"fps": 2.0, "max_frames": 4}),
    ("h264", {"fps": 7.5}),
    ("h264", {"fps": 45.0}),  # above the source rate: frames repeat
    ("h264", {"fps": 0.4}),
    ("h264", {"fps": 2.0, "start": 0.6, "end": 2.2}),
    ("h264", {"fps": 3.0, "start": 1.1}),
    ("h264", {"fps": 3.0, "end": 1.9}),
    ("h264", {"fps": 2.0, "start": 1.2, "end": 1.9}),  # under a second: indexed at the average rate
    ("gops", {"fps": 3.0, "start": 2.6}),
    ("gops", {"fps": 2.0, "start": 1.3, "end": 4.1}),
    ("open_gops", {"fps": 3.0, "start": 2.6}),
    ("open_gops", {"fps": 5.0, "start": 0.9, "end": 2.95}),
    ("vfr", {"fps": 4.0}),
    ("vfr", {"fps": 10.0, "start": 0.5, "end": 2.5}),
    ("late_start", {"fps": 2.0}),
    ("late_start", {"fps": 3.0, "start": 2.0, "end": 3.5}),
    ("audio_first", {"fps": 2.0}),
    ("odd_size", {"fps": 4.0}),
    ("hevc", {"fps": 5.0}),
    ("vp9", {"fps": 5.0}),
    ("av1", {"fps": 5.0}),
    ("av1_mkv", {"fps": 2.5, "start": 0.3}),
    ("mov", {"fps": 4.0}),
    ("mpeg4", {"fps": 3.0}),
    ("rot90", {"fps": 4.0}),
    ("rot180", {"fps": 4.0}),
    ("rot270", {"fps": 4.0}),
]


@pytest.mark.parametrize(("sample", "kwargs"), GENERATED, ids=[f"{s}-{k}" for s, k in GENERATED])
def test_generated_videos_match_reference_path(samples: dict[str, Path], sample: str, kwargs: dict) -> None:
    frames, timestamps, types = reference_load_video(samples[sample], **kwargs)
    assert_same_video(load_video(samples[sample], **kwargs), frames, timestamps, types)


def test_rotation_metadata_turns_frames(samples: dict[str, Path]) -> None:
    plain = load_video(samples["plain40"], fps=4.0).frames
    turned = load_video(samples["rot90"], fps=4.0).frames
    # the reference's sic: the upright frames' bytes read with the stored size
    assert turned.shape == plain.shape and plain.shape[1] != plain.shape[2]
    assert np.array_equal(turned, np.ascontiguousarray(np.rot90(plain, k=-1, axes=(1, 2))).reshape(plain.shape))
    turned = load_video(samples["rot270"], fps=4.0).frames
    assert np.array_equal(turned, np.ascontiguousarray(np.rot90(plain, k=1, axes=(1, 2))).reshape(plain.shape))
    upside = load_video(samples["rot180"], fps=4.0).frames
    assert np.array_equal(upside, plain[:, ::-1, ::-1])


def test_fallback_to_decoded_timestamps(samples: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # streams whose packets cannot be trusted are planned from a full decode instead
    expected = load_video(samples["vfr"], fps=4.0, max_frames=9)
    monkeypatch.setattr("penguin_vl.video.load._packet_timeline", lambda source: None)
    fallback = load_video(samples["vfr"], fps=4.0, max_frames=9)
    assert_same_video(fallback, expected.frames, expected.timestamps, expected.frame_types)


def test_start_offset_and_timestamps(samples: dict[str, Path]) -> None:
    video = load_video(samples["late_start"], fps=2.0)
    # timestamps count from the stream's own start time, as ffprobe prints it
    assert video.timestamps[0] == pytest.approx(1.37, abs=1e-3)
    assert np.allclose(np.diff(video.timestamps), 0.5)


def test_thinning_keeps_ends(samples: dict[str, Path]) -> None:
    every = load_video(samples["h264"], fps=6.0)
    few = load_video(samples["h264"], fps=6.0, max_frames=4)
    keep = np.linspace(0, len(every) - 1, 4, dtype=int)
    assert np.array_equal(few.frames, every.frames[keep])
    assert np.array_equal(few.timestamps, every.timestamps[keep])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    out = {}
    for fmt in ("png", "jpg"):
        d = root / fmt
        d.mkdir()
        for i in range(23):
            Image.fromarray(picture(i, 23, 50, 66)).save(d / f"frame_{i:03d}.{fmt}", quality=85)
        out[fmt] = d
    mixed = root / "mixed"
    mixed.mkdir()
    Image.fromarray(picture(0, 4, 40, 40)).convert("RGBA").save(mixed / "a.png")
    Image.fromarray(picture(1, 4, 40, 40)).convert("L").save(mixed / "b.png")
    Image.fromarray(picture(2, 4, 40, 40)).convert("P").save(mixed / "c.png")
    out["mixed"] = mixed
    return out


@pytest.mark.parametrize(
    ("folder", "kwargs"),
    [
        ("png", {"fps": 1.0}),
        ("jpg", {"fps": 1.0}),
        ("png", {"fps": 0.5, "max_frames": 2}),
        ("jpg", {"fps": 3.0, "start": 1.0, "end": 5.0}),
        ("mixed", {"fps": 3.0}),
    ],
)
def test_folders_match_reference(folders: dict[str, Path], folder: str, kwargs: dict) -> None:
    pytest.importorskip("cv2")  # the reference reads folders with OpenCV
    frames, timestamps, types = reference_load_video(folders[folder], **kwargs)
    assert_same_video(load_video(folders[folder], **kwargs), frames, timestamps, types)


def test_gif_rules(tmp_path: Path) -> None:
    frames = [Image.fromarray(picture(i, 60, 30, 40)).convert("P") for i in range(60)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    video = load_video(tmp_path / "a.gif", fps=1.0)
    # 25 frames a second whatever the delays say (sic): one frame from the middle of every 25
    assert np.array_equal(video.timestamps, np.array([12, 37]) / 25)
    ref_frames, ref_times, ref_types = reference_load_video(tmp_path / "a.gif", fps=1.0)
    assert_same_video(video, ref_frames, ref_times, ref_types)


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_files(tmp_path: Path, samples: dict[str, Path]) -> None:
    cases = {
        "text": write_bytes(tmp_path / "notes.mp4", b"this is not a video\n" * 50),
        "empty": write_bytes(tmp_path / "empty.mkv", b""),
        "truncated": write_bytes(tmp_path / "cut.mp4", samples["h264"].read_bytes()[:3000]),
    }
    with av.open(str(tmp_path / "sound.m4a"), "w") as c:
        s = c.add_stream("aac", rate=8000, layout="mono")
        for k in range(8):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 8000, k * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    cases["audio"] = tmp_path / "sound.m4a"
    for name, path in cases.items():
        with pytest.raises(VideoError, match=str(path.name)) as info:
            load_video(path)
        assert str(path) in str(info.value), name
    with pytest.raises(VideoError, match="no video stream"):
        load_video(cases["audio"])


def test_corrupt_middle_is_survived_or_reported(tmp_path: Path, samples: dict[str, Path]) -> None:
    data = bytearray(samples["h264"].read_bytes())
    rng = np.random.default_rng(0)
    middle = len(data) // 2
    data[middle : middle + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    path = write_bytes(tmp_path / "broken.mp4", bytes(data))
    try:
        video = load_video(path, fps=2.0)
    except VideoError as e:
        assert str(path) in str(e)
    else:
        assert len(video.frames) == len(video.timestamps) == len(video.frame_types) > 0


def test_bad_arguments_and_windows(tmp_path: Path, samples: dict[str, Path]) -> None:
    path = samples["h264"]
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="fps"):
            load_video(path, fps=bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_frames"):
            load_video(path, max_frames=bad)
    with pytest.raises(ValueError, match="start"):
        load_video(path, start=2.0, end=2.0)
    with pytest.raises(ValueError, match="start"):
        load_video(path, start=-1.0)
    with pytest.raises(VideoError, match="no frames"):
        load_video(path, start=50.0)
    with pytest.raises(VideoError, match="no such file"):
        load_video(tmp_path / "missing.mp4")
    Image.new("RGB", (8, 8)).save(tmp_path / "still.png")
    with pytest.raises(VideoError, match="an image, not a video"):
        load_video(tmp_path / "still.png")
    (tmp_path / "none").mkdir()
    with pytest.raises(VideoError, match="no frames"):
        load_video(tmp_path / "none")
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.new("RGB", (603, 3)).save(wide / "0.png")
    with pytest.raises(VideoError, match="aspect ratio"):
        load_video(wide)
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    Image.new("RGB", (20, 20)).save(sizes / "0.png")
    Image.new("RGB", (20, 22)).save(sizes / "1.png")
    with pytest.raises(VideoError, match="share a size"):
        load_video(sizes, fps=3.0)
    junk = tmp_path / "junk"
    junk.mkdir()
    Image.new("RGB", (20, 20)).save(junk / "0.png")
    (junk / "1.txt").write_text("not a picture")
    with pytest.raises(VideoError, match="1.txt"):
        load_video(junk, fps=3.0)


def test_without_pyav_the_package_imports_and_video_files_say_why(samples: dict[str, Path]) -> None:
    """Environments without PyAV (PyAV is a dependency, but a GPU image may lack it) still load the model,
    the processor and GIFs; a video file then raises a VideoError naming the missing package."""
    import subprocess
    import sys

    path = next(iter(samples.values()))
    code = (
        "import sys; sys.modules['av'] = None\n"
        "import penguin_vl\n"
        "from penguin_vl import VideoError, load_video\n"
        "try:\n"
        f"    load_video({str(path)!r})\n"
        "except VideoError as e:\n"
        "    print('VideoError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "VideoError:" in out and "PyAV" in out and path.name in out
