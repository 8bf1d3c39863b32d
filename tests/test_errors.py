"""Bad and unusual inputs through the command line and the Python API: each ends in a clear error naming
the culprit, a warning where the result is the reference's, or a complete output; finished work is never
lost (interrupted and resumed runs)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from penguin_kernels import reference
from penguin_vl import CheckpointError, ImageProcessor, PenguinEncoder, PenguinEncoderConfig, load_video
from penguin_vl import encode as enc
from penguin_vl import processor as proc
from penguin_vl.cli import build_parser, main
from penguin_vl.encode import sinks
from tests.test_model import GOLDEN, requires_golden
from tests.utils import assert_rel_close

# one forward per frame against one forward per input, float32 on the CPU: only summation order differs
PACKED_TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init-checkpoint", str(path), "--tiny", "--dtype", "float32", "--seed", "5"]) == 0
    return path


@pytest.fixture(scope="module")
def model(ckpt) -> PenguinEncoder:
    return PenguinEncoder.from_pretrained(ckpt, dtype=torch.float32, backend="torch")


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    d = Path("data")
    for i, size in enumerate([(45, 31), (20, 70), (64, 40), (30, 30)]):
        _image(d / f"img{i}.png", size, i)
    return d


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.mark.parametrize("out", ["--out", "--out-dir"])
def test_merge_size_3_is_written(data, ckpt, out):
    """A merge size other than 1 and 2 takes the interpolation path, whose result is not contiguous."""
    target = "o.safetensors" if out == "--out" else "od"
    rc = main(["encode", "data/img2.png", "--model", str(ckpt), "--merge-size", "3", out, target])
    assert rc == 0
    path = Path(target) if out == "--out" else Path(target) / "data__img2.png.safetensors"
    tensors, _ = _tensors(path)
    key = "data/img2.png.features" if out == "--out" else "features"
    assert tensors[key].shape[0] > 0 and torch.isfinite(tensors[key]).all()


@pytest.mark.parametrize("sink", ["file", "dir"])
def test_sinks_write_strided_tensors(tmp_path, sink):
    features = torch.arange(24, dtype=torch.float32).view(4, 6).t()  # [6, 4], column-major
    grid, merge = torch.tensor([[1, 2, 3]]), torch.tensor([1])
    meta = {"world_size": "1", "rank": "0", "run": "x", "inputs": "[]", "failed": "{}"}
    if sink == "file":
        s = enc.FileSink(tmp_path / "o.safetensors")
        s.add("a", features, grid, merge)
        s.commit(meta)
        assert torch.equal(load_file(tmp_path / "o.safetensors")["a.features"], features)
    else:
        s = enc.DirSink(tmp_path / "od", ["a"], ["a"])
        s.begin(meta)
        s.add("a", features, grid, merge)
        assert torch.equal(load_file(tmp_path / "od" / "a.safetensors")["features"], features)


def test_16_bit_png_warns_and_keeps_the_reference_result(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.linspace(0, 65535, 40 * 30, dtype=np.uint16).reshape(30, 40)).save(path)
    processor = ImageProcessor()
    with pytest.warns(proc.ImageWarning, match=r"deep\.png: more than 8 bits per sample \(mode I;16"):
        out = processor([str(path)])
    with Image.open(path) as img:
        expected = processor([np.asarray(img.convert("RGB"))])  # what the reference's convert("RGB") gives
    assert torch.equal(out.pixel_values, expected.pixel_values)


def _animated_gif(path: Path, frames: int = 3) -> Path:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
    return path


def test_animated_gif_is_refused_as_an_image(tmp_path):
    path = _animated_gif(tmp_path / "anim.gif")
    processor = ImageProcessor()
    with pytest.raises(ValueError, match=r"anim\.gif.*3 frames.*load_video"):
        processor([str(path)])
    with Image.open(path) as img, pytest.raises(ValueError, match=r"anim\.gif.*3 frames"):
        processor.batch([img])
    with Image.open(path) as img:  # one frame, made explicit, is an image
        processor.batch([img.convert("RGB")])


def test_image_warnings_on_the_command_line(data, ckpt, capsys):
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save("data/deep.png")
    _animated_gif(Path("data/anim.gif"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command reports on its own lines, never through the warnings module
        rc = main(["encode", "data", "--model", str(ckpt), "--out", "o.safetensors"])
    err = capsys.readouterr().err
    assert rc == 0  # the animated GIF is read as a clip, with the reference's rules for GIFs
    assert "penguin-vl: warning: data/deep.png: more than 8 bits per sample" in err
    tensors, meta = _tensors(Path("o.safetensors"))
    assert "data/deep.png.features" in tensors and not json.loads(meta.get("failed", "{}") or "{}")
    video = load_video("data/anim.gif")
    assert torch.equal(tensors["data/anim.gif.timestamps"], torch.from_numpy(video.timestamps))
    assert torch.equal(tensors["data/anim.gif.frame_types"], torch.from_numpy(video.frame_types))
    assert int(tensors["data/anim.gif.grid"][..., 0].sum()) == len(video.frames)


class _Recorder:
    def __init__(self) -> None:
        self.updates: list[float] = []

    def update(self, items: float, tokens: int, failed: int = 0, frames: int = 0) -> None:
        self.updates.append(items)

    def close(self) -> None:
        pass


def test_progress_moves_per_item_and_per_frame_on_cpu(data, model):
    """One packed batch of four images and a six-frame clip: on a CPU the bar moves for every image and
    for every frame of the clip, and the features equal one forward per input."""
    np.save("data/clip.npy", np.random.default_rng(9).integers(0, 256, (6, 28, 42, 3), dtype=np.uint8))
    inputs = enc.collect_inputs(["data"])
    processor = enc.make_processor(None, 14)
    progress = _Recorder()
    sink = enc.DirSink(Path("od"), [i.name for i in inputs], [i.name for i in inputs])
    meta = {"world_size": "1", "rank": "0", "run": "x"}
    enc.encode(model, processor, inputs, sink, metadata=meta, batch_tokens=10**6, workers=1, progress=progress)
    assert len(progress.updates) == 4 + 6 and sum(progress.updates) == pytest.approx(len(inputs))
    for inp in inputs:
        prepared = enc.prepare(inp, processor, 1, 2)
        expected = model(prepared.pixel_values, prepared.grid_sizes, prepared.merge_sizes)
        got = load_file(Path("od") / sink.files[inp.name])["features"]
        assert_rel_close(got, expected, PACKED_TOL)


def _interrupt_at(monkeypatch, call: int, error: type[BaseException] = KeyboardInterrupt) -> list[int]:
    calls: list[int] = []
    forward = PenguinEncoder.forward

    def forward_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error("simulated")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PenguinEncoder, "forward", forward_then_fail)
    return calls


def test_interrupted_overwrite_keeps_the_old_index(data, ckpt, monkeypatch, capsys):
    args = ["encode", "data", "--model", str(ckpt), "--out-dir", "od"]
    assert main(args) == 0
    index = Path("od/index.json").read_bytes()
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        assert main([*args, "--overwrite", "--merge-size", "2", "--batch-tokens", "1"]) == 130
    assert Path("od/index.json").read_bytes() == index
    for file in json.loads(index)["inputs"].values():
        load_file(Path("od") / file)  # every file complete: the old run's or the new one's


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"penguin-vl {enc.package_version()}"


def test_output_that_cannot_be_written_is_named_and_earlier_files_stay(data, ckpt, monkeypatch, capsys):
    Path("afile").write_text("")
    assert main(["encode", "data", "--model", str(ckpt), "--out-dir", "afile/od"]) == 2
    assert "cannot write afile/od/" in capsys.readouterr().err

    save = sinks.save_file
    calls = []

    def disk_full(tensors, filename, metadata=None):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(sinks, "save_file", disk_full)
    assert main(["encode", "data", "--model", str(ckpt), "--out-dir", "od"]) == 2
    err = capsys.readouterr().err
    assert "cannot write od/data__img1.png.safetensors: No space left on device" in err and "--resume" in err
    assert sorted(p.name for p in Path("od").iterdir()) == ["data__img0.png.safetensors"]
    load_file("od/data__img0.png.safetensors")


@pytest.mark.parametrize("damage", ["garbage", "not-a-part"])
def test_merge_index_names_a_damaged_part(data, ckpt, monkeypatch, capsys, damage):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["encode", "data", "--model", str(ckpt), "--out-dir", "od"]) == 0
    Path("od/index.rank00001-of-00002.json").write_text("{" if damage == "garbage" else '{"run": "x"}')
    assert main(["merge-index", "od"]) == 2
    assert "od/index.rank00001-of-00002.json: not a part of a run's index" in capsys.readouterr().err


def test_model_features_are_contiguous_for_merge_size_3(model):
    pixels = torch.randn(6 * 9, 3 * 14 * 14)
    features = model(pixels, torch.tensor([[1, 6, 9]]), torch.tensor([3]))
    assert features.shape == (2 * 3, 64) and features.is_contiguous()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_are_named(data, ckpt, tmp_path, capsys, damage):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else b"\x00" * 64)
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        PenguinEncoder.from_pretrained(bad)
    assert main(["encode", "data/img0.png", "--model", str(bad), "--out", "o.safetensors"]) == 2
    assert str(weights) in capsys.readouterr().err


@pytest.mark.parametrize("text", ['{"hidden_size": 64,', "[1, 2]", '{"hidden_size": null}'])
def test_invalid_config_is_named(data, ckpt, tmp_path, capsys, text):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(bad / "config.json"))):
        PenguinEncoder.from_pretrained(bad)
    assert main(["encode", "data/img0.png", "--model", str(bad), "--out", "o.safetensors"]) == 2
    assert str(bad / "config.json") in capsys.readouterr().err


# Values of another JSON type than the field's, for the tiny checkpoint (64 wide, 4 heads of 16, 2 KV heads):
# most would convert to the very value the file holds, so a load that converted could not be told apart.
WRONG_TYPES = [
    ("head_dim", 2.5, "an integer"),
    ("head_dim", 16.0, "an integer"),
    ("num_attention_heads", "4", "an integer"),
    ("hidden_size", 64.0, "an integer"),
    ("num_hidden_layers", "2", "an integer"),
    ("num_key_value_heads", True, "an integer"),
    ("patch_size", [14], "an integer"),
    ("intermediate_size", {"value": 128}, "an integer"),
    ("num_channels", "3", "an integer"),
    ("rms_norm_eps", "1e-6", "a number"),
    ("rope_theta", True, "a number"),
    ("rope_theta", None, "a number"),
    ("attention_bias", "false", "true or false"),
    ("attention_bias", 0, "true or false"),
]
WRONG_VALUES = [("head_dim", 0), ("num_key_value_heads", -2), ("rms_norm_eps", -1e-6), ("rope_theta", float("inf"))]


def _with_config_value(ckpt: Path, tmp_path: Path, key: str, value: object) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize(("key", "value", "expected"), WRONG_TYPES, ids=lambda v: repr(v))
def test_config_value_of_another_type_is_refused(data, ckpt, tmp_path, capsys, key, value, expected):
    bad = _with_config_value(ckpt, tmp_path, key, value)
    said = f"{key} must be {expected}, got {value!r}"
    with pytest.raises(CheckpointError, match=re.escape(f"{bad / 'config.json'}: config: {said}")):
        PenguinEncoder.from_pretrained(bad)
    with pytest.raises(TypeError, match=re.escape(said)):
        PenguinEncoderConfig.from_dict(json.loads((bad / "config.json").read_text()))
    capsys.readouterr()
    assert main(["encode", "data/img0.png", "--model", str(bad), "--out", "o.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("penguin-vl: error: ") and said in err and "Traceback" not in err
    assert not Path("o.safetensors").exists()


@pytest.mark.parametrize(("key", "value"), WRONG_VALUES, ids=lambda v: repr(v))
def test_config_value_out_of_range_is_refused(ckpt, tmp_path, key, value):
    bad = _with_config_value(ckpt, tmp_path, key, value)
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: config: {key} must be a positive")):
        PenguinEncoder.from_pretrained(bad)


@pytest.mark.parametrize(("key", "value", "expected"), WRONG_TYPES[:4] + WRONG_TYPES[-3:], ids=lambda v: repr(v))
def test_config_built_in_python_refuses_another_type(key, value, expected):
    with pytest.raises(TypeError, match=re.escape(f"{key} must be {expected}, got {value!r}")):
        PenguinEncoderConfig(**{key: value})


@requires_golden
def test_golden_config_loads_as_written():
    config = PenguinEncoderConfig.from_pretrained(GOLDEN / "encoder_shared")
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        256, 4, 2, 64,
    )  # fmt: skip
    assert (config.rms_norm_eps, config.rope_theta, config.attention_bias) == (1e-6, 10000.0, False)


def test_config_values_of_the_right_type_load(ckpt):
    written = json.loads((ckpt / "config.json").read_text())
    tiny = PenguinEncoderConfig.from_dict(written)
    assert PenguinEncoder.from_pretrained(ckpt).config == tiny
    assert PenguinEncoderConfig.from_dict(PenguinEncoderConfig().to_dict()) == PenguinEncoderConfig()
    # an integer for a float field is that number; null KV heads and head_dim mean absent, as in Qwen3
    same = {**written, "rms_norm_eps": 1, "rope_theta": 10000, "num_key_value_heads": None, "head_dim": None}
    loaded = PenguinEncoderConfig.from_dict(same)
    assert (loaded.rms_norm_eps, loaded.rope_theta) == (1.0, 10000.0)
    assert isinstance(loaded.rms_norm_eps, float) and isinstance(loaded.rope_theta, float)
    assert (loaded.num_key_value_heads, loaded.head_dim) == (tiny.num_attention_heads, 16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="says what happens on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_says_so(ckpt, device):
    with pytest.raises(ValueError, match="CUDA is not available"):
        PenguinEncoder.from_pretrained(ckpt, device=device)


def test_readme_cpu_snippet_runs_on_a_cpu(ckpt, monkeypatch):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (snippet,) = [b for b in blocks if 'device="cpu"' in b]
    monkeypatch.chdir(REPO / "examples")
    scope: dict = {}
    exec(snippet.replace('"tencent/Penguin-Encoder"', repr(str(ckpt))), scope)  # noqa: S102 (the README's own code)
    assert scope["features"].shape[1] == 64 and torch.isfinite(scope["features"]).all()


def test_token_budget_counts_tokens_after_merging(data, ckpt, capsys):
    help_text = build_parser()._subparsers._group_actions[0].choices["encode"].format_help()
    assert "counted after merging" in " ".join(help_text.split())
    assert main(["encode", "data/img2.png", "--model", str(ckpt), "--out", "o.safetensors"]) == 0
    budget = 6
    rc = main(["encode", "data/img2.png", "--model", str(ckpt), "--merge-size", "2", "--max-tokens", str(budget),
               "--min-tokens", "1", "--out", "m.safetensors"])  # fmt: skip
    assert rc == 0
    tensors, _ = _tensors(Path("m.safetensors"))
    features, grid = tensors["data/img2.png.features"], tensors["data/img2.png.grid"]
    patches = int(grid.prod())
    assert features.shape[0] <= budget < patches and patches == 4 * features.shape[0]


@pytest.mark.parametrize(
    "call, culprit",
    [
        (lambda q, cu: reference.varlen_attention(q, q, q, cu + 1), "cu_seqlens"),
        (lambda q, cu: reference.varlen_attention(q, q, q, cu[:-1]), "cu_seqlens"),
        (lambda q, cu: reference.varlen_attention(q, q, q, cu.float()), "cu_seqlens"),
        (lambda q, cu: reference.varlen_attention(q, q[:, :1, :8], q, cu), "k"),
        (lambda q, cu: reference.varlen_attention(q[0], q, q, cu), "q"),
        (lambda q, cu: reference.rms_norm(q, torch.ones(5), 1e-6), "weight"),
        (lambda q, cu: reference.linear(q[:, 0], torch.ones(3, 5)), "weight"),
        (lambda q, cu: reference.rope_positions(torch.tensor([[1, 3, 4]]), torch.tensor([2])), "item 0"),
        (lambda q, cu: reference.rope_2d(q, torch.zeros(q.shape[0], 3, dtype=torch.int32), 1e4), "positions"),
        (
            lambda q, cu: reference.projector_mlp(
                q[:, 0], torch.ones(4, 16), torch.ones(3), torch.ones(4, 4), torch.ones(4)
            ),
            "b1",
        ),  # fmt: skip
    ],
    ids=[
        "cu-not-from-0",
        "cu-short",
        "cu-float",
        "k-head-dim",
        "q-2d",
        "norm-weight",
        "linear-weight",
        "grid-merge",
        "positions",
        "projector-bias",
    ],  # fmt: skip
)
def test_reference_functions_check_their_inputs(call, culprit):
    q = torch.randn(7, 2, 16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises((TypeError, ValueError), match=rf"\b{culprit}\b"):
        call(q, cu)


def test_rank_that_is_not_a_number_is_named(data, ckpt, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "first")
    assert main(["encode", "data/img0.png", "--model", str(ckpt), "--out", "o.safetensors"]) == 2
    assert "RANK='first'" in capsys.readouterr().err
