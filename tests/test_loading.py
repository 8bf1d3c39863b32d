"""Checkpoint names and layouts: the fused model speaks the released names; full Penguin-VL directories load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from penguin_vl import CheckpointError, PenguinEncoder, PenguinEncoderConfig, ProjectorConfig, save_encoder
from penguin_vl.loading import FUSED_LINEARS
from tests.test_model import TINY, random_batch, tiny_model

RELEASED_LAYER_NAMES = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
    "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
    "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
}  # fmt: skip
PREFIX = "model.vision_encoder.vision_encoder."


def test_state_dict_speaks_the_released_names():
    model = tiny_model(projector=True)
    state = model.state_dict()
    layer = {k.removeprefix("encoder.layers.1.") for k in state if k.startswith("encoder.layers.1.")}
    assert layer == RELEASED_LAYER_NAMES
    assert not any(fused in k for k in state for fused in FUSED_LINEARS)
    attn = model.encoder.layers[1].self_attn
    q, k, v = (state[f"encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), attn.qkv_proj.weight)
    assert q.shape == (TINY.q_dim, TINY.hidden_size) and v.shape == (TINY.kv_dim, TINY.hidden_size)


def test_load_state_dict_of_released_names_fuses_them():
    source = tiny_model(projector=True, seed=1)
    target = tiny_model(projector=True, seed=2)
    target.load_state_dict(source.state_dict(), strict=True)
    for (name, a), b in zip(source.named_parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b), name
    with torch.device("meta"):
        meta = PenguinEncoder(TINY, ProjectorConfig(TINY.hidden_size, 80))
    meta.load_state_dict(source.state_dict(), assign=True)
    pv, gs, ms = random_batch(TINY, [(1, 4, 6)], [2])
    torch.testing.assert_close(meta(pv, gs, ms), source(pv, gs, ms), rtol=0, atol=0)


def test_partial_released_group_is_reported_by_load_state_dict():
    state = tiny_model().state_dict()
    del state["encoder.layers.0.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"encoder\.layers\.0\.mlp\.gate_up_proj\.weight"):
        tiny_model().load_state_dict(state)


def _full_directory(tmp_path: Path, model: PenguinEncoder) -> Path:
    """A full Penguin-VL directory as the reference's ``save_pretrained`` writes it: the encoder under
    ``model.vision_encoder.vision_encoder.``, the projector, LLM tensors, and an LLM config.json."""
    root = tmp_path / "penguin-vl"
    save_encoder(model, root, prefix=PREFIX, max_shard_bytes=64 * 1024)
    index_file = root / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    llm = {"model.embed_tokens.weight": torch.randn(10, 8), "lm_head.weight": torch.randn(10, 8)}
    save_file(llm, root / "llm.safetensors")
    index["weight_map"].update(dict.fromkeys(llm, "llm.safetensors"))
    index_file.write_text(json.dumps(index))
    return root


def _llm_config(**entries) -> str:
    config = {"model_type": "penguinvl_qwen3", "hidden_size": 80, "num_hidden_layers": 2, "vocab_size": 10}
    return json.dumps({**config, **entries})


def _encoder_config_dir(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(TINY.to_dict()))
    return directory


@pytest.mark.parametrize("layout", ["nested", "subdirectory", "relative", "absolute", "basename", "hub"])
def test_full_penguin_vl_directory_loads(tmp_path, monkeypatch, layout):
    model = tiny_model(projector=True, seed=7)
    root = _full_directory(tmp_path, model)
    assert any(
        k.startswith(PREFIX) for k in json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    )
    if layout == "subdirectory":
        _encoder_config_dir(root / "vision_encoder")
        (root / "config.json").write_text(_llm_config())
    elif layout == "relative":
        _encoder_config_dir(root / "encoders" / "penguin")
        (root / "config.json").write_text(_llm_config(vision_encoder="encoders/penguin"))
    elif layout == "absolute":
        elsewhere = _encoder_config_dir(tmp_path / "elsewhere" / "encoder")
        (root / "config.json").write_text(_llm_config(mm_vision_encoder=str(elsewhere)))
    elif layout == "basename":
        _encoder_config_dir(root / "Penguin-Encoder")
        (root / "config.json").write_text(_llm_config(vision_encoder="/trained/on/another/host/Penguin-Encoder"))
    elif layout == "hub":
        cache = tmp_path / "hub"
        _encoder_config_dir(cache / "models--tencent--Penguin-Encoder" / "snapshots" / "abc123")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        (root / "config.json").write_text(_llm_config(vision_encoder="tencent/Penguin-Encoder"))
    loaded = PenguinEncoder.from_pretrained(root, backend="torch")
    assert loaded.config == TINY
    assert loaded.projector is not None and loaded.projector.config == ProjectorConfig(TINY.hidden_size, 80)
    pv, gs, ms = random_batch(TINY, [(1, 4, 6), (2, 2, 2)], [1, 2])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(pv, gs, ms, project=True), model(pv, gs, ms, project=True), rtol=0, atol=0)


def test_named_encoder_that_is_not_there_is_named(tmp_path):
    root = _full_directory(tmp_path, tiny_model(projector=True))
    (root / "config.json").write_text(_llm_config(mm_vision_encoder="checkpoints/penguin-encoder"))
    with pytest.raises(
        FileNotFoundError, match=r"mm_vision_encoder='checkpoints/penguin-encoder'.*penguin-encoder/config\.json"
    ):
        PenguinEncoder.from_pretrained(root)


def test_config_without_any_encoder_is_refused(tmp_path):
    root = _full_directory(tmp_path, tiny_model(projector=True))
    (root / "config.json").write_text(_llm_config())
    with pytest.raises(ValueError, match="no vision encoder config found"):
        PenguinEncoder.from_pretrained(root)


def test_missing_encoder_tensor_of_a_full_directory_is_named(tmp_path):
    root = _full_directory(tmp_path, tiny_model(projector=True))
    index_file = root / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][PREFIX + "encoder.layers.1.self_attn.v_proj.weight"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model\.vision_encoder\.vision_encoder\.encoder\.layers\.1\.self_attn\.v_proj"
    ):
        PenguinEncoder.from_pretrained(root)


def test_encoder_config_round_trips_through_the_nested_layout(tmp_path):
    root = _full_directory(tmp_path, tiny_model(projector=True))
    assert PenguinEncoderConfig.from_pretrained(root) == TINY
