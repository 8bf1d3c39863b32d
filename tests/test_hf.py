"""Drop-in acceleration of upstream-shaped modules (the real hub model cannot be downloaded here)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from penguin_vl import PenguinEncoder, PenguinEncoderConfig
from penguin_vl.hf import accelerate_encoder, accelerate_penguin_vl, find_encoders
from tests.test_model import GOLDEN, GOLDEN_TOL, requires_golden
from tests.test_model_training import unfused_features
from tests.utils import INTERPRETER, assert_rel_close, device


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


SMALL = {
    "model_type": "penguinvl_vision_encoder", "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 1e4, "patch_size": 2,
}  # fmt: skip
GRIDS = (torch.tensor([[1, 4, 6], [2, 2, 2], [1, 1, 1]]), torch.tensor([2, 2, 1]))


def _small(dtype: torch.dtype = torch.float64) -> tuple[UpstreamLikeEncoder, PenguinEncoder]:
    """An upstream-like module and a PenguinEncoder holding the same weights."""
    ours = PenguinEncoder.from_config(PenguinEncoderConfig.from_dict(SMALL), dtype=dtype, backend="torch", seed=4)
    module = UpstreamLikeEncoder(SMALL).to(dtype)
    module.load_state_dict(ours.state_dict(), strict=True)
    return module, ours


def _pixels(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    n = int(GRIDS[0].prod(dim=1).sum())
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_gradients_reach_the_modules_own_parameters():
    module, ours = _small()
    params = dict(module.named_parameters())
    accelerate_encoder(module.train(), backend="torch")
    pv = _pixels().requires_grad_()
    module(pv, *GRIDS).square().sum().backward()
    assert dict(module.named_parameters()) == params
    pv_ours = pv.detach().clone().requires_grad_()
    ours.train()(pv_ours, *GRIDS).square().sum().backward()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.grad)
    expected = ours.state_dict()  # the gradients, split into the released names
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert_rel_close(p.grad, expected[name], 1e-10, name)
    assert_rel_close(pv.grad, pv_ours.grad, 1e-10, "pixel_values")


def test_an_optimizer_built_before_still_trains_the_module():
    module, _ = _small(torch.float32)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    accelerate_encoder(module.train(), backend="torch")
    q_before = module.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
    pv = _pixels(torch.float32)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = module(pv, *GRIDS).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0]
    assert not torch.equal(module.encoder.layers[0].self_attn.q_proj.weight, q_before)


def test_cached_fused_weights_follow_weight_changes():
    module, ours = _small()
    accelerate_encoder(module, backend="torch")
    pv = _pixels()
    with torch.inference_mode():
        first = module(pv, *GRIDS)
        torch.testing.assert_close(first, ours(pv, *GRIDS), rtol=0, atol=0)
    with torch.no_grad():
        module.encoder.layers[1].mlp.up_proj.weight.mul_(0.5)
        ours.encoder.layers[1].mlp.gate_up_proj.weight[SMALL["intermediate_size"] :].mul_(0.5)
    with torch.inference_mode():
        second = module(pv, *GRIDS)
    assert not torch.equal(first, second)
    with torch.inference_mode():
        torch.testing.assert_close(second, ours(pv, *GRIDS), rtol=0, atol=0)
    module.to(torch.float32)
    with torch.inference_mode():
        assert module(pv, *GRIDS).dtype == torch.float32


def test_deepcopy_runs_its_own_weights_and_state_dict_is_unchanged():
    module, _ = _small()
    names = list(module.state_dict())
    accelerate_encoder(module, backend="torch")
    assert list(module.state_dict()) == names
    pv = _pixels()
    with torch.inference_mode():
        before = module(pv, *GRIDS)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.encoder.norm.weight.mul_(3.0)
    with torch.inference_mode():
        torch.testing.assert_close(twin(pv, *GRIDS), 3.0 * before)
        torch.testing.assert_close(module(pv, *GRIDS), before, rtol=0, atol=0)


def test_calls_the_kernels_cannot_run_go_to_the_original_forward():
    module, _ = _small(torch.float32)
    module.encoder.layers[0].mlp.down_proj.to(torch.float16)
    accelerate_encoder(module, backend="triton")
    assert module(_pixels(torch.float32), *GRIDS) == "upstream forward"
    with pytest.raises(ValueError, match="backend"):
        accelerate_encoder(module, backend="cuda")


class UpstreamComputingEncoder(UpstreamLikeEncoder):
    """The upstream layout with a forward of its own: SPEC section 4 on its separate Parameters."""

    def forward(self, pixel_values, grid_sizes, merge_sizes, output_hidden_states=False, **kwargs):
        config = PenguinEncoderConfig.from_dict(self.config.to_dict())
        return unfused_features(dict(self.named_parameters()), config, pixel_values, grid_sizes, merge_sizes)


class _Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.readout = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(x)


class _VLM(nn.Module):
    """A Penguin-VL-shaped model: vision encoder, projector, and a head standing in for the LLM."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Bag(vision_encoder=UpstreamComputingEncoder(SMALL), vision_projector=_Projector(32, 24))
        self.lm_head = nn.Linear(24, 5)

    def forward(self, pixel_values, grid_sizes, merge_sizes, labels):
        feats = self.model.vision_projector(self.model.vision_encoder(pixel_values, grid_sizes, merge_sizes))
        return F.cross_entropy(self.lm_head(feats), labels)


def test_training_step_of_a_vlm_matches_the_unaccelerated_one():
    torch.manual_seed(0)
    plain = _VLM().double().train()
    accelerated = accelerate_penguin_vl(copy.deepcopy(plain), backend="torch")
    pv = _pixels()
    labels = torch.randint(0, 5, (9,), generator=torch.Generator().manual_seed(2))
    results = []
    for vlm in (plain, accelerated):
        opt = torch.optim.AdamW(vlm.parameters(), lr=1e-3)
        loss = vlm(pv, *GRIDS, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters()}
        opt.step()
        results.append((loss.detach(), grads, vlm(pv, *GRIDS, labels).detach()))
    (loss_a, grads_a, after_a), (loss_b, grads_b, after_b) = results
    assert accelerated.model.vision_encoder.forward.__func__ is not UpstreamComputingEncoder.forward
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert_rel_close(grads_b[name], g, 1e-10, name)
    torch.testing.assert_close(after_b, after_a, rtol=1e-10, atol=0)


KERNEL_SIZED = {**SMALL, "head_dim": 64, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETER), reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_drop_in_matches_the_torch_backend():
    ours = PenguinEncoder.from_config(PenguinEncoderConfig.from_dict(KERNEL_SIZED), backend="torch", seed=6)
    module = UpstreamLikeEncoder(KERNEL_SIZED)
    module.load_state_dict(ours.state_dict(), strict=True)
    module.to(device())
    accelerate_encoder(module, backend="triton")
    pv = _pixels(torch.float32)
    with torch.inference_mode():
        out = module(pv.to(device()), *GRIDS)
        assert_rel_close(out.cpu(), ours(pv, *GRIDS), 1e-5, "triton drop-in vs torch backend")
