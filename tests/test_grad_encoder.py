"""The whole encoder trains on the Triton backend: its gradients against the torch backend's.

Released dims (hidden 1024, 16 query heads, 8 KV heads, head_dim 128, SwiGLU 3072, and the 2B
projector 1024 -> 2048) with two layers, float32, on a packed batch of an image, a one-token image,
an image without merge and a two-frame clip: 31 tokens, one row tile of the interpreter's GEMM (the
released widths make this the costliest CPU test of the backward, ~1 minute). Every parameter's
gradient and that of ``pixel_values`` must match the torch backend's to a relative error of 1e-4
(the target; the kernels and the reference differ in float32 summation order only, measured ~1e-6).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from penguin_vl import PenguinEncoder, PenguinEncoderConfig, ProjectorConfig
from tests.utils import HAS_CUDA, INTERPRETER, assert_rel_close, device

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)

CONFIG = dataclasses.replace(PenguinEncoderConfig(), num_hidden_layers=2)
PROJECTOR = ProjectorConfig(in_dim=1024, out_dim=2048)
GRIDS, MERGES = [(1, 4, 4), (1, 1, 1), (1, 2, 3), (2, 2, 2)], [2, 1, 1, 2]
TOL = 1e-4


def _models(config=CONFIG, projector=PROJECTOR) -> tuple[PenguinEncoder, PenguinEncoder]:
    triton_model = PenguinEncoder.from_config(config, projector=projector, backend="torch", seed=3)
    triton_model = triton_model.to(device()).set_backend("triton").train()
    torch_model = copy.deepcopy(triton_model).set_backend("torch")
    return triton_model, torch_model


def _batch(config=CONFIG):
    gen = torch.Generator().manual_seed(0)
    n = sum(t * h * w for t, h, w in GRIDS)
    pixel_values = torch.randn(n, config.patch_dim, generator=gen).to(device())
    return pixel_values, torch.tensor(GRIDS), torch.tensor(MERGES)


def _gradients(model: PenguinEncoder, pixel_values, grid_sizes, merge_sizes, weights=None):
    """Gradients of ``sum(features * weights)`` for every parameter and ``pixel_values``."""
    model.zero_grad(set_to_none=True)
    pv = pixel_values.detach().clone().requires_grad_()
    features = model(pv, grid_sizes, merge_sizes, project=True)
    if weights is None:
        weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(1)).to(features.device)
    (features * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return grads | {"pixel_values": pv.grad}, features.detach(), weights


@requires_kernels
def test_encoder_gradients_match_the_torch_backend():
    triton_model, torch_model = _models()
    batch = _batch()
    got, features, weights = _gradients(triton_model, *batch)
    expected, expected_features, _ = _gradients(torch_model, *batch, weights)
    assert_rel_close(features.cpu(), expected_features.cpu(), TOL, "features")
    assert got.keys() == expected.keys()
    for name, g in got.items():
        assert g is not None, f"{name} got no gradient"
        assert_rel_close(g.cpu(), expected[name].cpu(), TOL, name)


@requires_kernels
def test_gradient_checkpointing_recomputes_the_same_gradients():
    # kernel-sized dims: the recompute runs the same kernels on the same inputs, so bit for bit
    config = dataclasses.replace(
        CONFIG, hidden_size=128, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=64
    )
    model, _ = _models(config, ProjectorConfig(in_dim=128, out_dim=48))
    batch = _batch(config)
    plain, _, weights = _gradients(model, *batch)
    model.gradient_checkpointing = True
    recomputed, _, _ = _gradients(model, *batch, weights)
    for name, g in plain.items():
        assert torch.equal(recomputed[name], g), f"{name} with gradient checkpointing"
