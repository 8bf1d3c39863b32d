"""The ``penguin-vl`` command: inputs, outputs and their metadata, failures, atomic writes, models, ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from penguin_vl import ImageProcessor, ModelNotFoundError, PenguinEncoder
from penguin_vl import encode as enc
from penguin_vl.cli import main
from penguin_vl.encode import checkpoints, sinks
from tests.utils import assert_rel_close

# Packed batches against one input at a time, both float32 on the CPU: the same math in other matmul
# shapes, so only summation order differs (~1e-7 measured).
PACKED_TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    """The command as it runs without a GPU, wherever the tests run.

    Outputs are compared with float32 references computed on the CPU, and the tiny checkpoint's
    head_dim 16 is not one the Triton kernels take; ``--device auto`` would pick CUDA and Triton on
    a GPU machine. The subprocesses see no GPU either.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init-checkpoint", str(path), "--tiny", "--dtype", "float32", "--seed", "3"]) == 0
    return path


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-vl"
    assert main(["init-checkpoint", str(path), "--tiny", "--full", "--dtype", "float32"]) == 0
    return path


@pytest.fixture(scope="module")
def model(ckpt) -> PenguinEncoder:
    return PenguinEncoder.from_pretrained(ckpt, dtype=torch.float32, backend="torch")


@pytest.fixture(scope="module")
def processor():
    return enc.make_processor(None, 14)


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """Images of odd sizes and modes, a nested directory, a .npy clip and a directory of frames."""
    monkeypatch.chdir(tmp_path)
    d = Path("data")
    _png(d / "a.png", (45, 31), 0)
    _png(d / "b.png", (20, 70), 1, "RGBA")
    _png(d / "sub" / "c10.png", (64, 40), 2, "L")
    _png(d / "sub" / "c9.png", (30, 30), 3)
    Image.open(d / "a.png").convert("RGB").save(d / "sub" / "d.jpg", quality=90)
    _png(d / ".hidden" / "x.png", (20, 20), 4)
    np.save(d / "clip.npy", np.random.default_rng(5).integers(0, 256, (3, 33, 47, 3), dtype=np.uint8))
    for i in range(3):
        _png(Path("frames") / f"f{i}.png", (50, 36), 10 + i)
    return d


def _features(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _expected(model, processor, images, merge: int) -> torch.Tensor:
    out = processor(images, merge_size=merge)
    return model(out.pixel_values, out.grid_sizes, out.merge_sizes)


def test_encode_files_dirs_globs_and_clips(data, model, processor, ckpt, capsys):
    rc = main(
        ["encode", "data/a.png", "data/sub", "data/*.npy", "./data//b.png", "--clip", "frames"]
        + ["--model", str(ckpt), "--out", "out.safetensors", "--workers", "2"]
    )
    assert rc == 0, capsys.readouterr().err
    tensors, meta = _features(Path("out.safetensors"))
    # argument order, natural order inside a directory (c9 before c10), hidden entries skipped
    names = ["data/a.png", "data/sub/c9.png", "data/sub/c10.png", "data/sub/d.jpg", "data/clip.npy", "data/b.png"]
    names.append("frames")
    assert json.loads(meta["inputs"]) == names
    assert set(tensors) == {f"{n}.{k}" for n in names for k in ("features", "grid", "merge")}
    for name in names[:4] + ["data/b.png"]:
        expected = _expected(model, processor, [Image.open(name)], 1)
        assert_rel_close(tensors[f"{name}.features"], expected, PACKED_TOL, name)
        assert tensors[f"{name}.grid"].shape == (1, 3) and tensors[f"{name}.merge"].tolist() == [1]
    frames = list(np.load("data/clip.npy"))
    assert_rel_close(tensors["data/clip.npy.features"], _expected(model, processor, frames, 2), PACKED_TOL, "npy")
    assert tensors["data/clip.npy.grid"].shape == (3, 3) and tensors["data/clip.npy.merge"].tolist() == [2] * 3
    frames = [Image.open(f"frames/f{i}.png") for i in range(3)]
    assert_rel_close(tensors["frames.features"], _expected(model, processor, frames, 2), PACKED_TOL, "frames")
    grid, merge = tensors["frames.grid"], tensors["frames.merge"]
    assert len(tensors["frames.features"]) == int((grid[:, 0] * (grid[:, 1] // merge) * (grid[:, 2] // merge)).sum())


def test_metadata(data, ckpt):
    args = ["encode", "data/a.png", "--model", str(ckpt), "--out", "o.safetensors", "--merge-size", "2"]
    assert main([*args, "--min-tokens", "20", "--batch-tokens", "999"]) == 0
    tensors, meta = _features(Path("o.safetensors"))
    assert meta["format"] == enc.FORMAT
    assert meta["model"] == str(ckpt) and meta["model_path"] == str(ckpt)
    assert meta["random_init"] == "true" and meta["projected"] == "false"
    assert (meta["dtype"], meta["device"], meta["backend"]) == ("float32", "cpu", "torch")
    assert meta["feature_dim"] == str(enc.TINY_CONFIG.hidden_size)
    settings = json.loads(meta["settings"])
    assert settings == {
        "merge_size": 2, "clip_merge_size": 2, "min_tokens": 20, "max_tokens": 16384, "batch_tokens": 999,
        "patch_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255,
        "normalize": True, "video_sampling": {"fps": 1.0, "max_frames": 180, "start": None, "end": None},
    }  # fmt: skip
    assert json.loads(meta["failed"]) == {}
    assert tensors["data/a.png.merge"].tolist() == [2]
    assert tensors["data/a.png.features"].dtype == torch.float32


def test_batches_split_by_token_budget(data, model, processor):
    inputs = enc.collect_inputs(["data"])
    metadata = {"world_size": "1", "rank": "0", "run": "x"}
    whole, one_each = enc.FileSink(Path("whole.safetensors")), enc.FileSink(Path("each.safetensors"))
    s1 = enc.encode(model, processor, inputs, whole, metadata=metadata, batch_tokens=10**6, workers=2)
    s2 = enc.encode(model, processor, inputs, one_each, metadata=metadata, batch_tokens=1, workers=3)
    assert s1.batches == 1 and s2.batches == len(inputs) == s1.items == s2.items
    # a budget that holds exactly the first two inputs: they share a batch, the next one starts another
    first_two = sum(enc.prepare(i, processor, 1, 2).tokens for i in inputs[:2])
    s3 = enc.encode(
        model, processor, inputs, enc.FileSink(Path("two.safetensors")), metadata=metadata, batch_tokens=first_two
    )
    assert 1 < s3.batches < len(inputs)
    assert json.loads(_features(Path("two.safetensors"))[1]["inputs"]) == [i.name for i in inputs]
    assert s1.tokens == s2.tokens > 0 and s1.out_tokens == s2.out_tokens
    a, b = load_file("whole.safetensors"), load_file("each.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_rel_close(a[k].double(), b[k].double(), PACKED_TOL, k)


def test_out_dir(data, ckpt, model, processor):
    assert main(["encode", "data", "--model", str(ckpt), "--out-dir", "feats", "--clip", "frames"]) == 0
    index = json.loads(Path("feats/index.json").read_text())
    names = [i.name for i in enc.collect_inputs(["data"], ["frames"])]
    assert sorted(index["inputs"]) == sorted(names) and index["failed"] == {}
    assert len(set(index["inputs"].values())) == len(names)
    assert index["metadata"]["model_path"] == str(ckpt)
    tensors, meta = _features(Path("feats") / index["inputs"]["data/a.png"])
    assert meta["name"] == "data/a.png" and set(tensors) == {"features", "grid", "merge"}
    assert_rel_close(tensors["features"], _expected(model, processor, [Image.open("data/a.png")], 1), PACKED_TOL)


def test_output_is_not_overwritten(data, ckpt, capsys):
    args = ["encode", "data/a.png", "--model", str(ckpt)]
    assert main([*args, "--out", "o.safetensors"]) == 0
    before = Path("o.safetensors").read_bytes()
    assert main(["encode", "data/b.png", "--model", str(ckpt), "--out", "o.safetensors"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert Path("o.safetensors").read_bytes() == before
    assert main(["encode", "data/b.png", "--model", str(ckpt), "--out", "o.safetensors", "--overwrite"]) == 0
    assert json.loads(_features(Path("o.safetensors"))[1]["inputs"]) == ["data/b.png"]

    assert main([*args, "--out-dir", "od"]) == 0
    assert main([*args, "--out-dir", "od"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out-dir", "od", "--overwrite"]) == 0

    Path("adir.safetensors").mkdir()
    assert main([*args, "--out", "adir.safetensors", "--overwrite"]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["file", "dir"])
def test_output_appearing_during_the_run_is_not_replaced(data, model, processor, out):
    """Without overwrite, a file that appears under the output name after the start check is kept."""
    inputs = enc.collect_inputs(["data/a.png"])
    meta = {"world_size": "1", "rank": "0", "run": "x"}
    if out == "file":
        target = Path("late.safetensors")
        sink = enc.FileSink(target, overwrite=False)
    else:
        target = Path("late") / "data__a.png.safetensors"
        sink = enc.DirSink(Path("late"), ["data/a.png"], ["data/a.png"], overwrite=False)
    assert not sink.conflicts()
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="--overwrite"):
        enc.encode(model, processor, inputs, sink, metadata=meta, workers=1)
    assert target.read_bytes() == b"someone else's"
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []


def test_failed_inputs_are_skipped_and_reported(data, ckpt, capsys):
    Path("data/trunc.png").write_bytes(Path("data/sub/c10.png").read_bytes()[:200])
    Path("data/text.png").write_text("not an image")
    np.save("data/float.npy", np.zeros((2, 20, 20, 3), dtype=np.float32))
    rc = main(["encode", "data", "--model", str(ckpt), "--out", "o.safetensors"])
    err = capsys.readouterr().err
    assert rc == 1
    bad = ["data/float.npy", "data/text.png", "data/trunc.png"]
    for name in bad:
        assert f"skipped {name}: " in err
    tensors, meta = _features(Path("o.safetensors"))
    assert sorted(json.loads(meta["failed"])) == bad
    assert "uint8 [T, H, W, C]" in json.loads(meta["failed"])["data/float.npy"]
    assert "data/a.png.features" in tensors and not any(k.startswith(tuple(bad)) for k in tensors)
    assert len(json.loads(meta["inputs"])) == 6


def test_nothing_readable_writes_nothing(data, ckpt, capsys):
    Path("data/text.png").write_text("not an image")
    assert main(["encode", "data/text.png", "--model", str(ckpt), "--out", "o.safetensors"]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert not Path("o.safetensors").exists()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("out", ["--out", "--out-dir"])
def test_interrupted_run_leaves_no_output(data, ckpt, monkeypatch, out):
    calls = []
    forward = PenguinEncoder.forward

    def fail_on_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PenguinEncoder, "forward", fail_on_third_batch)
    target = Path("o.safetensors" if out == "--out" else "od")
    with pytest.raises(RuntimeError, match="simulated"):
        main(["encode", "data", "--model", str(ckpt), out, str(target), "--batch-tokens", "1"])
    assert len(calls) == 3
    if out == "--out":
        assert not target.exists()
    else:  # on a CPU each input is written once encoded: two complete files, but no index says the run finished
        written = sorted(p.name for p in target.iterdir())
        assert written == ["data__a.png.safetensors", "data__b.png.safetensors"]
        for name in written:
            load_file(target / name)
    assert _leftovers(Path(".")) == [] and (out == "--out" or _leftovers(target) == [])


def test_interrupt_while_writing_leaves_no_output(data, ckpt, monkeypatch, capsys):
    def partial_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(sinks, "save_file", partial_write)
    assert main(["encode", "data/a.png", "--model", str(ckpt), "--out", "o.safetensors"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not Path("o.safetensors").exists() and _leftovers(Path(".")) == []


def _fake_hub(root: Path, repo: str, ckpt: Path, commit: str = "0123abcd") -> Path:
    """The Hugging Face cache layout: blobs, a snapshot of symlinks to them, refs/main."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in ckpt.iterdir():
        blob = repo_dir / "blobs" / f"sha-{file.name}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_from_the_local_cache(data, ckpt, monkeypatch, tmp_path):
    snapshot = _fake_hub(tmp_path / "hf" / "hub", "acme/penguin-tiny", ckpt)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert enc.resolve_model("acme/penguin-tiny") == snapshot
    assert enc.resolve_model("acme/penguin-tiny@0123abcd") == snapshot
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert enc.resolve_model("acme/penguin-tiny@main") == snapshot
    assert main(["encode", "data/a.png", "--model", "acme/penguin-tiny", "--out", "o.safetensors"]) == 0
    meta = _features(Path("o.safetensors"))[1]
    assert meta["model"] == "acme/penguin-tiny" and meta["model_path"] == str(snapshot)
    with pytest.raises(enc.ModelNotFoundError, match="deadbeef"):
        enc.resolve_model("acme/penguin-tiny@deadbeef")
    # the Python API resolves hub ids the same way
    assert PenguinEncoder.from_pretrained("acme/penguin-tiny", backend="torch").config == enc.TINY_CONFIG
    assert ImageProcessor.from_pretrained("acme/penguin-tiny@main").max_tokens == 16384
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download acme/other"):
        PenguinEncoder.from_pretrained("acme/other")


def test_hub_id_missing_offline_says_what_to_do(data, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["encode", "data/a.png", "--model", "tencent/Penguin-Encoder", "--out", "o.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "huggingface-cli download tencent/Penguin-Encoder" in err and "--model DIR" in err
    assert str(tmp_path / "empty-cache") in err
    assert main(["encode", "data/a.png", "--model", "no/such/dir", "--out", "o.safetensors"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not Path("o.safetensors").exists()


def test_init_checkpoint_round_trip(ckpt, full_ckpt, tmp_path, capsys):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "penguinvl_vision_encoder" and config["penguin_random_init"] is True
    assert "random" in config["penguin_note"].lower()
    loaded = PenguinEncoder.from_pretrained(ckpt, backend="torch")
    assert loaded.config == enc.TINY_CONFIG and loaded.dtype == torch.float32 and loaded.projector is None
    seeded = PenguinEncoder.from_config(enc.TINY_CONFIG, seed=3, backend="torch")
    for (name, a), (_, b) in zip(loaded.state_dict().items(), seeded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    names = load_file(full_ckpt / "model.safetensors").keys()
    assert "model.vision_encoder.embeddings.patch_embedding.weight" in names
    assert "model.vision_projector.readout.2.bias" in names
    vl = PenguinEncoder.from_pretrained(full_ckpt, backend="torch")
    assert vl.projector is not None and vl.projector.config.out_dim == enc.TINY_LLM_HIDDEN
    assert json.loads((full_ckpt / "config.json").read_text())["vision_encoder_config"]["penguin_random_init"]

    assert main(["init-checkpoint", str(ckpt), "--tiny"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    again = tmp_path / "again"
    assert main(["init-checkpoint", str(again), "--tiny", "--seed", "3", "--dtype", "float32"]) == 0
    assert main(["init-checkpoint", str(again), "--tiny", "--overwrite"]) == 0
    assert PenguinEncoder.from_pretrained(again).dtype == torch.bfloat16
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_projected_features(data, full_ckpt, ckpt, capsys):
    assert main(["encode", "data/a.png", "--model", str(full_ckpt), "--out", "p.safetensors", "--project"]) == 0
    tensors, meta = _features(Path("p.safetensors"))
    assert meta["projected"] == "true" and meta["feature_dim"] == str(enc.TINY_LLM_HIDDEN)
    assert tensors["data/a.png.features"].shape[1] == enc.TINY_LLM_HIDDEN
    assert main(["encode", "data/a.png", "--model", str(ckpt), "--out", "q.safetensors", "--project"]) == 2
    assert "no projector" in capsys.readouterr().err


def test_model_random_is_seeded(data, monkeypatch):
    # Released dimensions take a minute on a CPU; the wiring is the same at tiny dimensions.
    monkeypatch.setattr(checkpoints, "PenguinEncoderConfig", lambda: enc.TINY_CONFIG)
    args = ["encode", "data/a.png", "--model", "random"]
    assert main([*args, "--out", "r1.safetensors", "--project"]) == 0
    assert main([*args, "--out", "r2.safetensors", "--project"]) == 0
    assert main([*args, "--out", "r3.safetensors", "--project", "--seed", "1"]) == 0
    (t1, meta), t2, t3 = _features(Path("r1.safetensors")), load_file("r2.safetensors"), load_file("r3.safetensors")
    assert meta["model"] == "random" and meta["random_init"] == "true" and json.loads(meta["settings"])["seed"] == 0
    assert t1["data/a.png.features"].shape[1] == enc.RANDOM_LLM_HIDDEN
    assert torch.equal(t1["data/a.png.features"], t2["data/a.png.features"])
    assert not torch.allclose(t1["data/a.png.features"], t3["data/a.png.features"])


def _as_rank(monkeypatch, rank: int, world_size: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


@pytest.mark.parametrize("out", ["--out", "--out-dir"])
def test_ranks_shard_inputs_and_the_last_writes_the_index(data, ckpt, monkeypatch, out):
    Path("data/text.png").write_text("not an image")
    args = ["encode", "data", "--clip", "frames", "--model", str(ckpt), out]
    names = [i.name for i in enc.collect_inputs(["data"], ["frames"])]
    target = Path("o.safetensors" if out == "--out" else "od")
    index_file = Path("o.index.json" if out == "--out" else "od/index.json")
    _as_rank(monkeypatch, 1, 2)
    assert main([*args, str(target)]) == 0  # a skipped input does not fail a rank (torchrun would stop the rest)
    assert not index_file.exists()
    _as_rank(monkeypatch, 0, 2)
    assert main([*args, str(target)]) == 0
    index = json.loads(index_file.read_text())
    assert index["world_size"] == 2 and list(index["failed"]) == ["data/text.png"]
    good = [n for n in names if n != "data/text.png"]
    assert sorted(index["inputs"]) == sorted(good)
    if out == "--out":
        parts = ["o.rank00000-of-00002.safetensors", "o.rank00001-of-00002.safetensors"]
        assert index["files"] == parts and not target.exists()
        for rank, part in enumerate(parts):
            encoded = json.loads(_features(Path(part))[1]["inputs"])
            assert encoded == [n for n in names[rank::2] if n != "data/text.png"]
            assert all(index["inputs"][n] == part for n in encoded)
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("LOCAL_RANK")
        assert main(["encode", "data", "--clip", "frames", "--model", str(ckpt), "--out", "single.safetensors"]) == 1
        single = load_file("single.safetensors")
        merged = {}
        for part in parts:
            merged.update(load_file(part))
        assert merged.keys() == single.keys()
        for k in single:
            assert_rel_close(merged[k].double(), single[k].double(), PACKED_TOL, k)
    else:
        assert all((target / f).is_file() for f in index["inputs"].values())
    index_file.unlink()
    assert main(["merge-index", str(target)]) == 1  # rebuilt; it lists a failed input
    assert json.loads(index_file.read_text()) == index


def test_index_waits_for_parts_of_the_same_run(data, ckpt, monkeypatch, capsys):
    _as_rank(monkeypatch, 0, 2)
    assert main(["encode", "data/a.png", "data/b.png", "--model", str(ckpt), "--out", "o.safetensors"]) == 0
    _as_rank(monkeypatch, 1, 2)  # another input list: another run
    assert main(["encode", "data/b.png", "data/a.png", "--model", str(ckpt), "--out", "o.safetensors"]) == 0
    assert not Path("o.index.json").exists()
    assert main(["merge-index", "o.safetensors"]) == 2
    assert "different runs" in capsys.readouterr().err


def test_index_ignores_a_stale_part_over_changed_inputs(data, ckpt, monkeypatch):
    """A part left by an earlier run over the same names does not join the index once an input changed."""
    args = ["encode", "data/a.png", "data/b.png", "--model", str(ckpt), "--out", "o.safetensors", "--overwrite"]
    _as_rank(monkeypatch, 0, 2)
    assert main(args) == 0
    _as_rank(monkeypatch, 1, 2)
    assert main(args) == 0
    before = json.loads(Path("o.index.json").read_text())
    _png(Path("data/a.png"), (45, 31), 99)  # rank 0's input changes; only rank 1 runs again
    os.utime("data/a.png", ns=(0, 10**18))
    assert main(args) == 0
    # not rebuilt with rank 0's stale part: the index still records the last finished run, and the part
    # rank 1 rewrote says by its run digest that it belongs to another
    assert json.loads(Path("o.index.json").read_text()) == before
    assert _features(Path("o.rank00001-of-00002.safetensors"))[1]["run"] != before["run"]


def test_collect_inputs_errors(data):
    with pytest.raises(enc.InputError, match="no such file"):
        enc.collect_inputs(["data/missing.png"])
    with pytest.raises(enc.InputError, match="matches nothing"):
        enc.collect_inputs(["data/*.gif"])
    Path("empty").mkdir()
    with pytest.raises(enc.InputError, match="no image files"):
        enc.collect_inputs(["empty"])
    with pytest.raises(enc.InputError, match="not a directory of frames"):
        enc.collect_inputs([], ["data/a.png"])
    with pytest.raises(enc.InputError, match="no image files in"):
        enc.collect_inputs([], ["empty"])
    assert [i.name for i in enc.collect_inputs(["data/a.png", "data/*.png", "data/./a.png"])] == [
        "data/a.png",
        "data/b.png",
    ]
    assert [i.name for i in enc.collect_inputs(["data/**/c*.png"])] == ["data/sub/c9.png", "data/sub/c10.png"]


def test_patterns_skip_what_is_not_an_input(data):
    """A pattern passes over other files and empty directories; a file named explicitly is taken as given."""
    Path("data/notes.txt").write_text("not an image")
    Path("data/empty").mkdir()
    names = [i.name for i in enc.collect_inputs(["data/*"])]
    assert "data/notes.txt" not in names and "data/a.png" in names and "data/sub/c9.png" in names
    assert [i.name for i in enc.collect_inputs(["data/notes.txt"])] == ["data/notes.txt"]
    with pytest.raises(enc.InputError, match="no image files, videos or .npy clips matched"):
        enc.collect_inputs(["data/*.txt"])
    with pytest.raises(enc.InputError, match="no image files, videos or .npy clips matched"):
        enc.collect_inputs(["data/empt*"])


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to encode"),
        (["data/a.png", "--out", "o.npz"], "must end in .safetensors"),
        (["data/a.png", "--min-tokens", "50", "--max-tokens", "20"], "larger than --max-tokens"),
        (["data/a.png", "--device", "cuda:0" if not torch.cuda.is_available() else "x"], "--device"),
    ],
    ids=["no-inputs", "out-suffix", "token-budget", "device"],
)
def test_bad_arguments(data, ckpt, capsys, args, message):
    if "--out" not in args:
        args = [*args, "--out", "o.safetensors"]
    assert main(["encode", *args, "--model", str(ckpt)]) == 2
    assert message in capsys.readouterr().err
    assert not Path("o.safetensors").exists()


def test_progress_and_summary(data, ckpt, capsys):
    assert main(["encode", "data", "--model", str(ckpt), "--out", "o.safetensors", "--progress"]) == 0
    err = capsys.readouterr().err
    n = len(enc.collect_inputs(["data"]))
    bar = err.split("\r")[-1].splitlines()[0]  # the progress line as last drawn
    assert bar.startswith("100%|") and f" {n}/{n} inputs " in bar
    assert "ETA 00:00" in bar and "input/s" in bar and " patches/s" in bar
    summary = err[err.index(bar) + len(bar) :]
    for stage in ("load", "preprocess", "encode", "write", "backend torch", "on cpu"):
        assert stage in summary
    assert main(["encode", "data", "--model", str(ckpt), "--out", "p.safetensors", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_python_m_penguin_vl(data, ckpt):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "penguin_vl", "encode", "data/a.png", "--model", str(ckpt), "--out", "o.safetensors"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "encoded 1 of 1 inputs" in result.stderr and Path("o.safetensors").is_file()


def test_out_dir_file_names_are_distinct_and_flat():
    names = ["a/b.png", "a__b.png", "A__B.png", "/abs/x.png", "../up.png", ".hidden.png", "sp ace?.png"]
    files = sinks._file_names(names)
    assert len({f.lower() for f in files.values()}) == len(names)
    for f in files.values():
        assert "/" not in f and not f.startswith(".") and f.endswith(".safetensors")
    assert files["a/b.png"] == "a__b.png.safetensors" and files["a__b.png"] == "a__b.png~2.safetensors"


def test_out_dir_long_names_fit_the_file_system(data, ckpt):
    deep = Path("data", *(["d" * 60] * 5))
    _png(deep / "x.png", (30, 30), 7)
    _png(deep / "y.png", (30, 30), 8)
    assert main(["encode", str(deep), "--model", str(ckpt), "--out-dir", "feats"]) == 0
    files = json.loads(Path("feats/index.json").read_text())["inputs"]
    assert len(files) == 2 and len(set(files.values())) == 2
    assert all(len(f.encode()) <= 255 and (Path("feats") / f).is_file() for f in files.values())


def test_readme_quick_start_inputs(ckpt, tmp_path):
    """The README's first command, on the tiny checkpoint: the bundled images and the bundled video."""
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "penguin-vl encode" in line)
    words = command.split("penguin-vl encode", 1)[1].split()
    inputs = words[: words.index("--model")]
    assert "examples/pan.mp4" in inputs
    paths = sorted(str(p) for pattern in inputs for p in REPO.glob(pattern))
    out = tmp_path / "features.safetensors"
    assert main(["encode", *paths, "--model", str(ckpt), "--out", str(out), "-q"]) == 0
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        video = str(REPO / "examples" / "pan.mp4")
        timestamps = f.get_tensor(f"{video}.timestamps")
        frame_types = f.get_tensor(f"{video}.frame_types")
        grid = f.get_tensor(f"{video}.grid")
    assert {f"{p}.features" for p in paths} <= keys
    assert timestamps.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert frame_types.tolist()[0] == 0 and 1 in frame_types.tolist()  # a key frame first, repeats typed 1
    assert int(grid[..., 0].sum()) == 4
