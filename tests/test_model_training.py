"""The encoder trains on the torch backend: gradients against plain autograd of an unfused model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from penguin_kernels import reference
from penguin_vl import PenguinEncoder, PenguinEncoderConfig, ProjectorConfig
from penguin_vl.model import check_grid, merge_tokens
from tests.utils import assert_rel_close

CFG = PenguinEncoderConfig(
    hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, rope_theta=1e4, patch_size=2, num_channels=3, attention_bias=True,
)  # fmt: skip
GRIDS, MERGES = [(1, 1, 1), (1, 4, 6), (2, 2, 4), (1, 3, 5)], [1, 2, 2, 1]
# float64 both ways, op orders differ only in the fused GEMMs: agreement near the float64 unit roundoff.
GRAD_TOL = 1e-10


def _model(dtype: torch.dtype = torch.float64) -> PenguinEncoder:
    proj = ProjectorConfig(in_dim=CFG.hidden_size, out_dim=24)
    return PenguinEncoder.from_config(CFG, projector=proj, dtype=dtype, backend="torch", seed=5).train()


def _batch(dtype: torch.dtype = torch.float64, seed: int = 0):
    n = sum(t * h * w for t, h, w in GRIDS)
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(n, CFG.patch_dim, generator=gen, dtype=dtype)
    return pixel_values.requires_grad_(), torch.tensor(GRIDS), torch.tensor(MERGES)


def unfused_features(w: dict[str, torch.Tensor], c: PenguinEncoderConfig, pixel_values, grid_sizes, merge_sizes):
    """SPEC section 4 step by step on the released tensor names: separate q/k/v and gate/up linears."""
    items = check_grid(pixel_values, grid_sizes, merge_sizes, c.patch_dim)
    positions, cu_seqlens = reference.rope_positions(grid_sizes, merge_sizes)
    conv = w["embeddings.patch_embedding.weight"]
    x = F.linear(pixel_values, conv.reshape(conv.shape[0], -1), w["embeddings.patch_embedding.bias"])
    n = x.shape[0]
    for i in range(c.num_hidden_layers):
        p = f"encoder.layers.{i}."
        h = reference.rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
        proj = {
            n_: F.linear(h, w[f"{p}self_attn.{n_}_proj.weight"], w.get(f"{p}self_attn.{n_}_proj.bias")) for n_ in "qkv"
        }
        q = proj["q"].view(n, c.num_attention_heads, c.head_dim)
        k = proj["k"].view(n, c.num_key_value_heads, c.head_dim)
        v = proj["v"].view(n, c.num_key_value_heads, c.head_dim)
        q, k = reference.qk_norm_rope_2d(
            q, k, w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"], positions,
            theta=c.rope_theta, eps=c.rms_norm_eps,
        )  # fmt: skip
        a = reference.varlen_attention(q, k, v, cu_seqlens).reshape(n, -1)
        x = x + F.linear(a, w[p + "self_attn.o_proj.weight"], w.get(p + "self_attn.o_proj.bias"))
        h2 = reference.rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = F.linear(h2, w[p + "mlp.gate_proj.weight"])
        x = x + F.linear(F.silu(gate) * F.linear(h2, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"])
    return merge_tokens(reference.rms_norm(x, w["encoder.norm.weight"], c.rms_norm_eps), items)


def _unfused_forward(w: dict[str, torch.Tensor], pixel_values, grid_sizes, merge_sizes) -> torch.Tensor:
    x = unfused_features(w, CFG, pixel_values, grid_sizes, merge_sizes)
    hidden = F.gelu(F.linear(x, w["projector.readout.0.weight"], w["projector.readout.0.bias"]))
    return F.linear(hidden, w["projector.readout.2.weight"], w["projector.readout.2.bias"])


def _loss(out: torch.Tensor) -> torch.Tensor:
    # a fixed random direction, so every output element carries its own weight in the gradient
    gen = torch.Generator().manual_seed(1)
    return (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()


def _released_grads(model: PenguinEncoder) -> dict[str, torch.Tensor]:
    """The model's gradients under the released names (the fused ones split like the weights)."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data, grads[name] = grads[name], p.data
        named = model.state_dict()
        for name, p in model.named_parameters():
            p.data, grads[name] = grads[name], p.data
    return named


def test_gradients_match_plain_autograd_of_the_unfused_model():
    model = _model()
    pv, gs, ms = _batch()
    out = model(pv, gs, ms, project=True)
    assert out.grad_fn is not None
    _loss(out).backward()
    ours = _released_grads(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    weights = {name: t.detach().clone().requires_grad_() for name, t in model.state_dict().items()}
    pv_ref = pv.detach().clone().requires_grad_()
    _loss(_unfused_forward(weights, pv_ref, gs, ms)).backward()
    assert sorted(ours) == sorted(weights)
    for name, w in weights.items():
        assert_rel_close(ours[name], w.grad, GRAD_TOL, name)
    assert_rel_close(pv.grad, pv_ref.grad, GRAD_TOL, "pixel_values")


def test_gradcheck_through_the_encoder_float64():
    cfg = PenguinEncoderConfig(
        hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, rope_theta=1e4, patch_size=1, num_channels=2,
    )  # fmt: skip
    model = PenguinEncoder.from_config(cfg, dtype=torch.float64, backend="torch", seed=2)
    gs, ms = torch.tensor([[1, 2, 2], [1, 1, 3]]), torch.tensor([2, 1])
    pv = torch.randn(7, cfg.patch_dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x, gs, ms), (pv,))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        model = _model()
        model.gradient_checkpointing = recompute
        pv, gs, ms = _batch()
        _loss(model(pv, gs, ms, project=True)).backward()
        grads.append({**{n: p.grad for n, p in model.named_parameters()}, "pixel_values": pv.grad})
    plain, recomputed = grads
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=0, atol=0, msg=name)
    assert PenguinEncoder(CFG, gradient_checkpointing=True).gradient_checkpointing


def test_no_graph_where_the_caller_asks():
    model = _model()
    pv, gs, ms = _batch()
    with torch.no_grad():
        assert model(pv, gs, ms).grad_fn is None
    with torch.inference_mode():
        assert model(pv, gs, ms).grad_fn is None
    assert model.eval()(pv, gs, ms).grad_fn is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_optimizer_step_lowers_the_loss(dtype):
    model = _model(dtype)
    pv, gs, ms = _batch(dtype)
    pv = pv.detach()
    target = torch.randn(model(pv, gs, ms).shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(model(pv, gs, ms).float(), target.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0]
