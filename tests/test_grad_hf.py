"""The Hugging Face drop-in trains on the Triton backend.

A Penguin-VL-shaped model (the upstream encoder's attribute tree with a forward of its own, the
projector and a head standing in for the LLM) takes one optimizer step with its vision encoder
unfrozen, with and without ``accelerate_penguin_vl(..., backend="triton")``: the loss, every
gradient and the loss after the step must agree. float32 (the kernels' parity dtype): the two runs
differ in float32 summation order only, so 1e-5 relative on the losses and 1e-4 on the gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import penguin_kernels
from penguin_vl.hf import accelerate_penguin_vl
from tests.test_hf import GRIDS, KERNEL_SIZED, UpstreamComputingEncoder, _Bag, _pixels, _Projector
from tests.utils import HAS_CUDA, INTERPRETER, assert_rel_close, device

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)


class _VLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        hidden = KERNEL_SIZED["hidden_size"]
        encoder = UpstreamComputingEncoder(KERNEL_SIZED)
        self.model = _Bag(vision_encoder=encoder, vision_projector=_Projector(hidden, 24))
        self.lm_head = nn.Linear(24, 5)

    def forward(self, pixel_values, grid_sizes, merge_sizes, labels):
        feats = self.model.vision_projector(self.model.vision_encoder(pixel_values, grid_sizes, merge_sizes))
        return F.cross_entropy(self.lm_head(feats), labels)


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of ``penguin_kernels.<name>`` (what the model and the drop-in call)."""
    calls = []
    original = getattr(penguin_kernels, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(penguin_kernels, name, counted)
    return calls


@requires_kernels
def test_training_step_with_the_triton_encoder_matches_the_unaccelerated_one(monkeypatch):
    torch.manual_seed(0)
    plain = _VLM().to(device()).train()
    accelerated = accelerate_penguin_vl(copy.deepcopy(plain), backend="triton")
    attention_calls = _counting(monkeypatch, "varlen_attention_op")
    projector_calls = _counting(monkeypatch, "projector_mlp")
    pv = _pixels(torch.float32).to(device())
    grids = tuple(g.to(device()) for g in GRIDS)
    labels = torch.randint(0, 5, (9,), generator=torch.Generator().manual_seed(2)).to(device())
    results = []
    for vlm in (plain, accelerated):
        opt = torch.optim.AdamW(vlm.parameters(), lr=1e-3)
        loss = vlm(pv, *grids, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters()}
        opt.step()
        results.append((loss.detach(), grads, vlm(pv, *grids, labels).detach()))
    (loss_a, grads_a, after_a), (loss_b, grads_b, after_b) = results
    # the accelerated step ran the kernels (and their backward), not the original forwards
    assert attention_calls and projector_calls
    assert_rel_close(loss_b, loss_a, 1e-5, "loss")
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert_rel_close(grads_b[name], g, 1e-4, name)
    assert_rel_close(after_b, after_a, 1e-5, "loss after the step")
