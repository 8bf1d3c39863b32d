"""Drop-in acceleration of upstream-shaped modules (the real hub model cannot be downloaded here)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from penguin_vl.hf import accelerate_encoder, accelerate_penguin_vl, find_encoders
from tests.test_model import GOLDEN, GOLDEN_TOL, requires_golden
from tests.utils import assert_rel_close


class _Norm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Bag(nn.Module):
    """An attribute container, as upstream's submodules look from outside."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class UpstreamLikeEncoder(nn.Module):
    """The upstream encoder's attribute tree and forward signature; its own forward is a sentinel."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.config = SimpleNamespace(to_dict=lambda: dict(cfg))
        d, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
        h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.embeddings = _Bag(patch_embedding=nn.Conv2d(3, d, cfg["patch_size"], stride=cfg["patch_size"]))
        layers = [
            _Bag(
                input_layernorm=_Norm(d),
                self_attn=_Bag(
                    q_proj=nn.Linear(d, h * hd, bias=False),
                    k_proj=nn.Linear(d, kv * hd, bias=False),
                    v_proj=nn.Linear(d, kv * hd, bias=False),
                    o_proj=nn.Linear(h * hd, d, bias=False),
                    q_norm=_Norm(hd),
                    k_norm=_Norm(hd),
                ),
                post_attention_layernorm=_Norm(d),
                mlp=_Bag(
                    gate_proj=nn.Linear(d, inter, bias=False),
                    up_proj=nn.Linear(d, inter, bias=False),
                    down_proj=nn.Linear(inter, d, bias=False),
                ),
            )
            for _ in range(cfg["num_hidden_layers"])
        ]
        self.encoder = _Bag(layers=nn.ModuleList(layers), norm=_Norm(d))

    def forward(self, pixel_values, grid_sizes, merge_sizes, output_hidden_states=False, **kwargs):
        return "upstream forward"


@pytest.fixture()
def upstream() -> UpstreamLikeEncoder:
    cfg = json.loads((GOLDEN / "encoder_shared" / "config.json").read_text())
    module = UpstreamLikeEncoder(cfg)
    module.load_state_dict(load_file(GOLDEN / "encoder_shared" / "model.safetensors"), strict=True)
    return module.eval()


@pytest.fixture(scope="module")
def golden_io() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "encoder_shared_io.safetensors")


@requires_golden
def test_accelerated_upstream_matches_golden(upstream, golden_io):
    params_before = {n: p for n, p in upstream.named_parameters()}
    assert accelerate_encoder(upstream, backend="torch") is upstream
    out = upstream(golden_io["pixel_values"], golden_io["grid_sizes"], golden_io["merge_sizes"])
    assert_rel_close(out, golden_io["features"], GOLDEN_TOL, "accelerated upstream vs golden")
    # Shared, not copied: the module still owns exactly the Parameters it had.
    assert {n: p for n, p in upstream.named_parameters()} == params_before
    with torch.no_grad():
        upstream.encoder.norm.weight.mul_(2.0)
    out2 = upstream(golden_io["pixel_values"], golden_io["grid_sizes"], golden_io["merge_sizes"])
    torch.testing.assert_close(out2, 2.0 * out)


@requires_golden
def test_unsupported_arguments_go_to_the_original_forward(upstream, golden_io):
    accelerate_encoder(upstream, backend="torch")
    args = (golden_io["pixel_values"], golden_io["grid_sizes"], golden_io["merge_sizes"])
    assert upstream(*args, output_hidden_states=True) == "upstream forward"
    assert upstream(*args, return_dict=True) == "upstream forward"
    assert isinstance(upstream(*args, output_hidden_states=False), torch.Tensor)
    assert isinstance(upstream(pixel_values=args[0], grid_sizes=args[1], merge_sizes=args[2]), torch.Tensor)


@requires_golden
def test_vision_tower_inside_a_penguin_vl_model(upstream, golden_io):
    vl = _Bag(
        model=_Bag(
            vision_encoder=upstream,
            vision_projector=_Bag(readout=nn.Sequential(nn.Linear(256, 32), nn.GELU(), nn.Linear(32, 32))),
            embed_tokens=nn.Embedding(10, 32),
        )
    )
    assert [name for name, _ in find_encoders(vl)] == ["model.vision_encoder"]
    accelerate_penguin_vl(vl, backend="torch")
    out = vl.model.vision_encoder(golden_io["pixel_values"], golden_io["grid_sizes"], golden_io["merge_sizes"])
    assert_rel_close(out, golden_io["features"], GOLDEN_TOL, "vision tower vs golden")


def test_refuses_modules_of_another_shape():
    with pytest.raises(ValueError, match="not laid out like"):
        accelerate_encoder(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Penguin-VL vision encoder"):
        accelerate_penguin_vl(nn.Sequential(nn.Linear(2, 2)))
