"""The reference encoder: golden parity, packing, merge, dtypes, and checkpoint loading errors."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import penguin_kernels
from penguin_kernels import reference
from penguin_vl import CheckpointError, PenguinEncoder, PenguinEncoderConfig, ProjectorConfig, save_encoder
from penguin_vl.model import check_grid, merge_tokens, packing, resolve_backend
from tests.utils import assert_rel_close

GOLDEN = Path(os.environ.get("PENGUIN_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))
requires_golden = pytest.mark.skipif(
    not (GOLDEN / "encoder_shared").is_dir(), reason=f"goldens not found in {GOLDEN} (set PENGUIN_GOLDEN_DIR)"
)

# Relative Frobenius error of a low-precision run against the float32 run of the same weights. Two
# layers of ~15 rounded ops each at unit roundoff u (bf16 2^-8, fp16 2^-11) compound to a few u; the
# bounds are ~4x what the golden model measures (bf16 8.3e-3, fp16 1.0e-3).
LOW_PRECISION_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
# float32 against upstream: different but equivalent op orders (Conv2d vs linear, SDPA kernels).
GOLDEN_TOL = 1e-5

TINY = PenguinEncoderConfig(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rope_theta=1e4, patch_size=2, num_channels=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def golden_io() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "encoder_shared_io.safetensors")


@pytest.fixture(scope="module")
def golden_model() -> PenguinEncoder:
    return PenguinEncoder.from_pretrained(GOLDEN / "encoder_shared", backend="torch")


def tiny_model(projector: bool = False, seed: int = 0) -> PenguinEncoder:
    proj = ProjectorConfig(in_dim=TINY.hidden_size, out_dim=80) if projector else None
    return PenguinEncoder.from_config(TINY, projector=proj, backend="torch", seed=seed)


def random_batch(cfg: PenguinEncoderConfig, grids: list[tuple[int, int, int]], merges: list[int], seed: int = 0):
    n = sum(t * h * w for t, h, w in grids)
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(n, cfg.patch_dim, generator=gen)
    return pixel_values, torch.tensor(grids), torch.tensor(merges)


@requires_golden
def test_golden_parity_float32(golden_model, golden_io):
    out = golden_model(golden_io["pixel_values"], golden_io["grid_sizes"], golden_io["merge_sizes"])
    assert out.dtype == torch.float32
    assert_rel_close(out, golden_io["features"], GOLDEN_TOL, "features vs upstream golden")


@requires_golden
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_against_float32(golden_model, golden_io, dtype):
    model = PenguinEncoder.from_pretrained(GOLDEN / "encoder_shared", dtype=dtype, backend="torch")
    assert model.dtype == dtype
    out = model(golden_io["pixel_values"], golden_io["grid_sizes"], golden_io["merge_sizes"])
    assert out.dtype == dtype
    expected = golden_model(golden_io["pixel_values"], golden_io["grid_sizes"], golden_io["merge_sizes"])
    assert_rel_close(out.float(), expected, LOW_PRECISION_TOL[dtype], f"{dtype} vs float32")


def test_packed_batch_equals_items_one_at_a_time():
    model = tiny_model()
    grids = [(1, 1, 1), (1, 6, 10), (3, 4, 6), (1, 2, 2), (2, 8, 4)]
    merges = [1, 1, 2, 2, 4]
    pv, gs, ms = random_batch(TINY, grids, merges)
    packed = model(pv, gs, ms)
    pieces, start = [], 0
    for i, (t, h, w) in enumerate(grids):
        n = t * h * w
        pieces.append(model(pv[start : start + n], gs[i : i + 1], ms[i : i + 1]))
        start += n
    assert packed.shape == (sum(t * h * w // merges[i] ** 2 for i, (t, h, w) in enumerate(grids)), TINY.hidden_size)
    torch.testing.assert_close(packed, torch.cat(pieces), rtol=1e-5, atol=1e-6)


def test_one_token_image():
    model = tiny_model()
    pv, gs, ms = random_batch(TINY, [(1, 1, 1)], [1])
    out = model(pv, gs, ms)
    assert out.shape == (1, TINY.hidden_size) and torch.isfinite(out).all()


def test_clip_frames_attend_only_within_their_frame():
    # Frame 0 of a merge-2 clip must not change when frame 1's pixels do.
    model = tiny_model()
    pv, gs, ms = random_batch(TINY, [(2, 4, 6)], [2])
    out = model(pv, gs, ms)
    pv2 = pv.clone()
    pv2[24:] += 1.0
    out2 = model(pv2, gs, ms)
    assert out.shape == (12, TINY.hidden_size)
    torch.testing.assert_close(out[:6], out2[:6], rtol=0, atol=0)
    assert not torch.allclose(out[6:], out2[6:])


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_merge_is_bilinear_resize_of_the_raster_grid(m):
    t, h, w, d = 2, 3 * m, 2 * m, 5
    raster = torch.randn(t, h, w, d, dtype=torch.float64)
    block = raster.view(t, h // m, m, w // m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, d)
    expected = F.interpolate(raster.permute(0, 3, 1, 2), size=(h // m, w // m), mode="bilinear", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(-1, d)
    torch.testing.assert_close(merge_tokens(block, [(t, h, w, m)]), expected)


def test_projector_output():
    model = tiny_model(projector=True)
    pv, gs, ms = random_batch(TINY, [(1, 4, 4)], [2])
    feats = model(pv, gs, ms)
    projected = model(pv, gs, ms, project=True)
    l1, l2 = model.projector.readout[0], model.projector.readout[2]
    torch.testing.assert_close(projected, l2(F.gelu(l1(feats))))
    with pytest.raises(ValueError, match="projector"):
        tiny_model()(pv, gs, ms, project=True)


def _write_full_checkpoint(model: PenguinEncoder, path: Path) -> None:
    """A Penguin-VL-style checkpoint: prefixed encoder + projector + LLM tensors, sharded."""
    save_encoder(model, path, prefix="model.vision_encoder.", max_shard_bytes=64 * 1024)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    llm = {"model.embed_tokens.weight": torch.randn(10, 8), "lm_head.weight": torch.randn(10, 8)}
    save_file(llm, path / "llm.safetensors")
    index["weight_map"].update(dict.fromkeys(llm, "llm.safetensors"))
    index_file.write_text(json.dumps(index))


def test_full_checkpoint_sharded_with_projector(tmp_path, monkeypatch):
    model = tiny_model(projector=True, seed=3)
    _write_full_checkpoint(model, tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    read = []
    import penguin_vl.loading as loading

    real_safe_open = loading.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self._f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self._inner.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(loading, "safe_open", Recording)
    loaded = PenguinEncoder.from_pretrained(tmp_path, backend="torch")
    assert not any(name.startswith(("lm_head", "model.embed_tokens")) for name in read)
    assert loaded.projector is not None and loaded.projector.config == ProjectorConfig(TINY.hidden_size, 80)
    pv, gs, ms = random_batch(TINY, [(1, 4, 6), (2, 2, 2)], [1, 2])
    torch.testing.assert_close(loaded(pv, gs, ms, project=True), model(pv, gs, ms, project=True), rtol=0, atol=0)
    without = PenguinEncoder.from_pretrained(tmp_path, backend="torch", load_projector=False)
    assert without.projector is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_dtype_and_device_honoured(tmp_path, dtype):
    save_encoder(tiny_model(), tmp_path)
    model = PenguinEncoder.from_pretrained(tmp_path, dtype=dtype, device="cpu", backend="torch")
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in model.parameters())


def test_stored_dtype_is_the_default(tmp_path):
    save_encoder(tiny_model().to(torch.bfloat16), tmp_path)
    assert PenguinEncoder.from_pretrained(tmp_path, backend="torch").dtype == torch.bfloat16


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    save_encoder(tiny_model(), tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("encoder.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['encoder\.layers\.1\.mlp\.up_proj\.weight'\]"):
        PenguinEncoder.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    save_encoder(tiny_model(), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"encoder.layers.2.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['encoder\.layers\.2\.mlp\.up_proj\.weight'\]"):
        PenguinEncoder.from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    save_encoder(tiny_model(), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"encoder.norm.weight": torch.ones(TINY.hidden_size + 1)}))
    with pytest.raises(CheckpointError, match=r"encoder\.norm\.weight: \[65\], expected \[64\]"):
        PenguinEncoder.from_pretrained(tmp_path)


def test_missing_projector_tensor_is_named(tmp_path):
    _write_full_checkpoint(tiny_model(projector=True), tmp_path)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.vision_projector.readout.2.bias"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.vision_projector\.readout\.2\.bias"):
        PenguinEncoder.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    _write_full_checkpoint(tiny_model(), tmp_path)
    (tmp_path / "llm.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="llm.safetensors"):
        PenguinEncoder.from_pretrained(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    save_encoder(tiny_model(), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not loaded"):
        PenguinEncoder.from_pretrained(tmp_path)


def test_rope_scaling_is_refused(tmp_path):
    save_encoder(tiny_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        PenguinEncoder.from_pretrained(tmp_path)


def test_config_defaults_and_nesting():
    base = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
            "patch_size": 2, "model_type": "penguinvl_vision_encoder"}  # fmt: skip
    cfg = PenguinEncoderConfig.from_dict(base)
    assert (cfg.head_dim, cfg.rope_theta, cfg.num_key_value_heads) == (16, 10000.0, 4)
    nested = {"model_type": "penguinvl", "hidden_size": 2048, "vision_encoder_config": base}
    assert PenguinEncoderConfig.from_dict(nested) == cfg
    with pytest.raises(ValueError, match="no vision encoder config"):
        PenguinEncoderConfig.from_dict({"model_type": "qwen3", "hidden_size": 8})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        PenguinEncoderConfig.from_dict({**base, "num_key_value_heads": 3})


def test_bad_dtype_argument(tmp_path):
    save_encoder(tiny_model(), tmp_path)
    with pytest.raises(TypeError, match="dtype"):
        PenguinEncoder.from_pretrained(tmp_path, dtype=torch.int8)


@pytest.mark.parametrize(
    "grids, merges, pv_rows, match",
    [
        ([(1, 3, 4)], [2], 12, "not divisible by the merge size 2"),
        ([(1, 4, 4)], [1], 15, "15 rows but the grids hold 16"),
        ([(0, 4, 4)], [1], 0, "must be positive"),
        ([(1, 4, 4)], [0], 16, "must be positive"),
    ],
    ids=["indivisible", "row-count", "zero-t", "zero-merge"],
)
def test_bad_grid_is_refused(grids, merges, pv_rows, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(pv_rows, TINY.patch_dim), torch.tensor(grids), torch.tensor(merges))


def test_bad_pixel_values_shape_and_backend():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 12\]"):
        model(torch.randn(4, 13), torch.tensor([[1, 2, 2]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cuda")


# The ops the encoder's layers call through its backend's ops module.
MODEL_OPS = ("linear", "rms_norm", "qk_norm_rope_2d", "varlen_attention_op", "swiglu_mlp", "projector_mlp")


@pytest.mark.parametrize("name", [*MODEL_OPS, "rope_positions"])
def test_kernels_and_reference_offer_one_signature(name):
    # ``config`` selects a kernel's launch configuration; it has no meaning for the reference.
    def params(fn):
        return [p for p in inspect.signature(fn).parameters.values() if p.name != "config"]

    assert params(getattr(penguin_kernels, name)) == params(getattr(reference, name))


def test_packing_matches_the_reference_positions():
    """The host-built positions and cu_seqlens equal the reference's, bit for bit, on random grids."""
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        b = int(torch.randint(1, 5, (1,), generator=gen))
        ms = torch.randint(1, 4, (b,), generator=gen)
        hw = torch.randint(1, 6, (b, 2), generator=gen) * ms[:, None]
        gs = torch.cat([torch.randint(1, 4, (b, 1), generator=gen), hw], dim=1)
        pixels = torch.zeros(int(gs.prod(dim=1).sum()), 12)
        positions, cu, max_seqlen = packing(check_grid(pixels, gs, ms, 12), torch.device("cpu"))
        want_positions, want_cu = reference.rope_positions(gs, ms)
        assert positions.dtype == cu.dtype == torch.int32
        assert torch.equal(positions, want_positions) and torch.equal(cu, want_cu)
        assert max_seqlen == int((gs[:, 1] * gs[:, 2]).max())
        # the kernels' pointers are specialised on 16-byte alignment
        assert positions.data_ptr() % 16 == 0 and cu.data_ptr() % 16 == 0


def test_reference_positions_check_their_hints():
    gs, ms = torch.tensor([[2, 4, 6], [1, 2, 2]]), torch.tensor([2, 1])
    positions, cu = reference.rope_positions(gs, ms, total_tokens=52, num_frames=3)
    assert positions.shape == (52, 2) and cu.tolist() == [0, 24, 48, 52]
    with pytest.raises(ValueError, match="disagree"):
        reference.rope_positions(gs, ms, total_tokens=51, num_frames=3)


def test_auto_backend_takes_the_kernels_only_for_head_dims_they_run():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cuda, 128) == "triton"
    assert resolve_backend("auto", cuda, 64) == "triton"
    assert resolve_backend("auto", cuda, 16) == "torch"  # e.g. the tiny test checkpoints
    assert resolve_backend("auto", cpu, 128) == "torch"
    with pytest.raises(ValueError, match="heads of"):
        resolve_backend("triton", cuda, 16)
