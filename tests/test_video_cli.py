"""``penguin-vl encode`` with video files: sampling flags, features beside timestamps and frame types,
broken files skipped and reported, progress in frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from penguin_vl import PenguinEncoder, load_video
from penguin_vl import encode as enc
from penguin_vl.cli import main
from tests.utils import assert_rel_close
from tests.video_samples import make_video

# packed batches against one input at a time, float32 on the CPU: only summation order differs (~1e-7)
PACKED_TOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init-checkpoint", str(path), "--tiny", "--dtype", "float32", "--seed", "3"]) == 0
    return path


@pytest.fixture(scope="module")
def model(ckpt: Path) -> PenguinEncoder:
    return PenguinEncoder.from_pretrained(ckpt, dtype=torch.float32, backend="torch")


@pytest.fixture(scope="module")
def processor():
    return enc.make_processor(None, 14)


def _features(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture
def videos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    d = Path("media")
    d.mkdir()
    make_video(d / "talk.mp4", size=(96, 72), frames=120)
    make_video(d / "clip.webm", codec="libvpx-vp9", size=(80, 60), frames=45, rate=15)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(d / "photo.png")
    (d / "broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3" + b"\x00" * 200)  # an EBML header and nothing else
    return d


def _video_features(model, processor, path: Path, **sampling) -> tuple[torch.Tensor, object]:
    video = load_video(path, **sampling)
    out = processor(list(video.frames), merge_size=2, frame_types=video.frame_types)
    return model(out.pixel_values, out.grid_sizes, out.merge_sizes), video


def test_videos_beside_images(videos, model, processor, ckpt, capsys):
    args = ["encode", "media", "--model", str(ckpt), "--out", "o.safetensors", "--fps", "2", "--max-frames", "5"]
    assert main([*args, "--progress"]) == 1  # one input could not be read
    err = capsys.readouterr().err
    assert "skipped media/broken.mkv: VideoError" in err and "media/broken.mkv" in err
    assert "frames" in err  # the progress line and the summary count frames
    tensors, _ = _features(Path("o.safetensors"))
    for name, size in (("media/talk.mp4", 5), ("media/clip.webm", 5)):
        expected, video = _video_features(model, processor, Path(name), fps=2.0, max_frames=5)
        assert_rel_close(tensors[f"{name}.features"], expected, PACKED_TOL, name)
        assert tensors[f"{name}.timestamps"].dtype == torch.float64
        assert np.array_equal(tensors[f"{name}.timestamps"].numpy(), video.timestamps)
        assert np.array_equal(tensors[f"{name}.frame_types"].numpy(), video.frame_types)
        assert tensors[f"{name}.grid"].shape == (size, 3) and tensors[f"{name}.merge"].tolist() == [2] * size
    assert "media/photo.png.features" in tensors and "media/photo.png.timestamps" not in tensors


def test_window_and_out_dir(videos, model, processor, ckpt):
    args = ["encode", "media/talk.mp4", "--model", str(ckpt), "--out-dir", "out", "--fps", "3"]
    assert main([*args, "--start", "1.0", "--end", "3.5"]) == 0
    tensors, meta = _features(next(Path("out").glob("*.safetensors")))
    expected, video = _video_features(model, processor, Path("media/talk.mp4"), fps=3.0, start=1.0, end=3.5)
    assert meta["name"] == "media/talk.mp4"
    assert_rel_close(tensors["features"], expected, PACKED_TOL, "window")
    assert np.array_equal(tensors["timestamps"].numpy(), video.timestamps)
    assert np.array_equal(tensors["frame_types"].numpy(), video.frame_types)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fps", "0"], "fps must be"),
        (["--fps", "nan"], "fps must be"),
        (["--start", "4", "--end", "2"], "start (4.0) must be before end"),
        (["--start", "-1"], "start must be"),
    ],
)
def test_bad_sampling_flags(videos, ckpt, capsys, flags, message):
    args = ["encode", "media/talk.mp4", "--model", str(ckpt), "--out", "o.safetensors", *flags]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not Path("o.safetensors").exists()
