"""Videos as processor items: a load_video result or a video path is the reference's video path (frames
as one list, merge 2, its frame types), in a call of its own or beside images in a batch."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from penguin_vl import ImageProcessor, VideoError, load_video
from penguin_vl.processor import VIDEO_MERGE_SIZE
from tests.test_video import GOLDEN_CASES, VIDEO_GOLDEN, requires_golden
from tests.video_samples import make_video


@requires_golden
@pytest.mark.parametrize(("name", "file", "kwargs"), GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_video_item_gives_golden_pixel_values(name: str, file: str, kwargs: dict) -> None:
    video = load_video(VIDEO_GOLDEN / file, **kwargs)
    out = ImageProcessor()(video)
    with safe_open(str(VIDEO_GOLDEN / f"{name}.safetensors"), "np") as golden:
        digest = golden.metadata()["pixel_values_sha256"]
        assert hashlib.sha256(out.pixel_values.numpy().tobytes()).hexdigest() == digest
        assert np.array_equal(out.grid_sizes.numpy(), golden.get_tensor("grid_sizes"))
    assert out.merge_sizes.tolist() == [VIDEO_MERGE_SIZE] * len(video)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("proc") / "clip.mp4", size=(160, 120), frames=150)


def test_path_item_is_load_video_with_released_sampling(clip: Path) -> None:
    processor = ImageProcessor(min_tokens=1, max_tokens=100)  # a budget the 5 frames overrun
    video = load_video(clip)  # fps 1, at most 180 frames
    expected = processor(list(video.frames), merge_size=2, frame_types=video.frame_types)
    for item in (clip, str(clip), video):
        out = processor(item)
        assert torch.equal(out.pixel_values, expected.pixel_values)
        assert torch.equal(out.grid_sizes, expected.grid_sizes)
    # TRA split: key frames larger than intermediate ones, each frame its own grid row
    grids = expected.grid_sizes
    assert len(grids) == len(video) and bool((grids[:, 0] == 1).all())
    areas = (grids[:, 1] * grids[:, 2]).tolist()
    key = [a for a, t in zip(areas, video.frame_types.tolist(), strict=True) if t == 0]
    inter = [a for a, t in zip(areas, video.frame_types.tolist(), strict=True) if t == 1]
    assert inter and min(key) > max(inter)


def test_frames_array_stays_one_grid(clip: Path) -> None:
    video = load_video(clip, fps=2.0, max_frames=4)
    as_array = ImageProcessor()(video.frames, merge_size=2)  # [T, H, W, 3]: one item, t = T
    as_video = ImageProcessor()(video)
    assert as_array.grid_sizes[:, 0].tolist() == [4]
    assert as_video.grid_sizes[:, 0].tolist() == [1, 1, 1, 1]


def test_batch_packs_images_and_videos(clip: Path) -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    small = load_video(clip, fps=3.0, max_frames=5)
    processor = ImageProcessor(max_tokens=600)
    out = processor.batch([photo, small, clip, photo], merge_size=1)
    parts = [processor.batch([photo]), processor(small), processor(clip), processor.batch([photo])]
    assert torch.equal(out.pixel_values, torch.cat([p.pixel_values for p in parts]))
    assert torch.equal(out.grid_sizes, torch.cat([p.grid_sizes for p in parts]))
    assert out.merge_sizes.tolist() == [1] + [2] * (len(small) + len(load_video(clip))) + [1]
    merged = processor.batch([small], video_merge_size=1)
    assert merged.merge_sizes.tolist() == [1] * len(small)
    assert torch.equal(merged.pixel_values, processor(small, merge_size=1).pixel_values)


def test_video_item_errors(tmp_path: Path, clip: Path) -> None:
    processor = ImageProcessor()
    video = load_video(clip, max_frames=3)
    with pytest.raises(ValueError, match="frame_types come with the video"):
        processor(video, frame_types=[0, 1, 1])
    with pytest.raises(ValueError, match=r"images\[1\]: a video is one item"):
        processor([video.frames[0], video])
    with pytest.raises(ValueError, match=r"images\[0\]: a video is one item"):
        processor([clip])
    with pytest.raises(VideoError, match="missing.mp4"):
        processor(tmp_path / "missing.mp4")
    (tmp_path / "notes.mkv").write_text("not a video")
    with pytest.raises(VideoError, match="notes.mkv"):
        processor.batch([video, tmp_path / "notes.mkv"])
    with pytest.raises(ValueError, match="sequence of images or videos"):
        processor.batch(video)
