"""The Triton backend of the encoder against the reference path (interpreter on CPU, kernels on GPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from penguin_vl import PenguinEncoder, PenguinEncoderConfig, ProjectorConfig
from penguin_vl.cuda_graph import capture_cuda_graph
from penguin_vl.model import check_grid, merge_tokens, ops_for, packing
from tests.test_model import GOLDEN, GOLDEN_TOL, requires_golden
from tests.utils import HAS_CUDA, INTERPRETER, assert_rel_close, device, requires_cuda

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)

# bf16 on GPU against the float32 reference, 2 layers (golden model) and 28 layers (released dims):
# each layer adds a few bf16 roundings (unit roundoff 2^-8) of O(1) activations.
BF16_TOL = {2: 3e-2, 28: 6e-2}

MIXED = ([(1, 1, 1), (1, 6, 10), (3, 4, 6), (1, 14, 4), (2, 8, 8)], [1, 1, 2, 1, 4])


def _batch(cfg: PenguinEncoderConfig, grids, merges, dev, seed: int = 0):
    n = sum(t * h * w for t, h, w in grids)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.patch_dim, generator=gen).to(dev), torch.tensor(grids), torch.tensor(merges)


@requires_golden
@requires_kernels
@torch.inference_mode()
def test_triton_backend_matches_golden_float32():
    io = load_file(GOLDEN / "encoder_shared_io.safetensors")
    model = PenguinEncoder.from_pretrained(GOLDEN / "encoder_shared", device=device(), backend="triton")
    assert model.backend == "triton"
    out = model(io["pixel_values"], io["grid_sizes"], io["merge_sizes"])
    assert_rel_close(out.cpu(), io["features"], GOLDEN_TOL, "triton backend vs golden")


@requires_golden
@requires_kernels
@torch.inference_mode()
def test_triton_equals_torch_backend_on_mixed_items_fp16():
    cfg = PenguinEncoderConfig.from_pretrained(GOLDEN / "encoder_shared")
    ref = PenguinEncoder.from_pretrained(GOLDEN / "encoder_shared", backend="torch")
    fast = PenguinEncoder.from_pretrained(
        GOLDEN / "encoder_shared", dtype=torch.float16, device=device(), backend="triton"
    )
    pv, gs, ms = _batch(cfg, *MIXED, "cpu")
    expected = ref(pv, gs, ms)
    out = fast(pv.to(device()), gs, ms)
    assert out.dtype == torch.float16
    # fp16 (unit roundoff 2^-11) through 2 layers: the reference path in fp16 lands at ~1e-3.
    assert_rel_close(out.float().cpu(), expected, 4e-3, "triton fp16 vs torch fp32")


@requires_kernels
@torch.inference_mode()
def test_backend_switch_and_to_keep_the_weights():
    cfg = PenguinEncoderConfig(
        hidden_size=64, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, patch_size=2,
    )  # fmt: skip
    model = PenguinEncoder.from_config(cfg, backend="torch")
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pv, gs, ms = _batch(cfg, [(1, 4, 4), (2, 2, 2)], [1, 2], device())
    expected = model(pv.cpu(), gs, ms)
    model.set_backend("triton")
    assert dict(model.named_parameters()) == params
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    out32 = model.to(device())(pv, gs, ms)
    assert_rel_close(out32.cpu(), expected, GOLDEN_TOL, "triton vs torch backend, float32")
    out16 = model.to(torch.float16)(pv, gs, ms)
    assert out16.dtype == torch.float16
    assert_rel_close(out16.float(), out32, 4e-3, "after .to(float16)")


@requires_kernels
def test_triton_backend_records_no_graph_under_no_grad():
    cfg = PenguinEncoderConfig(
        hidden_size=64, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, patch_size=2,
    )  # fmt: skip
    model = PenguinEncoder.from_config(cfg, device=device(), backend="triton")
    pv, gs, ms = _batch(cfg, [(1, 4, 4)], [1], device())
    with torch.no_grad():
        out = model(pv, gs, ms)
    assert out.grad_fn is None and torch.isfinite(out).all()


@requires_cuda
@torch.inference_mode()
def test_bf16_released_dims_against_float32_reference():
    cfg = PenguinEncoderConfig()
    ref = PenguinEncoder.from_config(cfg, device="cuda", backend="torch")
    fast = PenguinEncoder.from_config(cfg, dtype=torch.bfloat16, device="cuda", backend="triton")
    pv, gs, ms = _batch(cfg, [(1, 32, 32), (2, 16, 24), (1, 1, 1), (1, 46, 82)], [1, 2, 1, 1], "cuda")
    assert_rel_close(fast(pv, gs, ms).float(), ref(pv, gs, ms), BF16_TOL[28], "bf16 triton vs fp32 torch")


@requires_cuda
@torch.inference_mode()
def test_projector_path_bf16():
    cfg = PenguinEncoderConfig(num_hidden_layers=2)
    proj = ProjectorConfig(in_dim=cfg.hidden_size, out_dim=2048)
    ref = PenguinEncoder.from_config(cfg, projector=proj, device="cuda", backend="torch")
    fast = PenguinEncoder.from_config(cfg, projector=proj, dtype=torch.bfloat16, device="cuda", backend="triton")
    pv, gs, ms = _batch(cfg, [(1, 16, 16), (4, 8, 8)], [1, 2], "cuda")
    out = fast(pv, gs, ms, project=True)
    assert_rel_close(out.float(), ref(pv, gs, ms, project=True), BF16_TOL[2], "projected bf16 vs fp32")


@requires_cuda
@torch.inference_mode()
def test_torch_compile_and_cuda_graph():
    cfg = PenguinEncoderConfig(num_hidden_layers=2)
    model = PenguinEncoder.from_config(cfg, dtype=torch.bfloat16, device="cuda", backend="triton")
    pv, gs, ms = _batch(cfg, [(1, 16, 16), (2, 8, 12)], [1, 2], "cuda")
    eager = model(pv, gs, ms)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(pv, gs, ms), eager, rtol=2e-2, atol=2e-2)
    # Every layer in one graph: fullgraph=True raises on any graph break.
    items = check_grid(pv, gs, ms, cfg.patch_dim)
    positions, cu_seqlens, max_seqlen = packing(ops_for("triton"), gs, ms, items, model.device)
    layers = torch.compile(model.encode_packed, fullgraph=True)
    x = layers(pv.to(torch.bfloat16), positions, cu_seqlens, max_seqlen)
    torch.testing.assert_close(merge_tokens(x, items), eager, rtol=2e-2, atol=2e-2)
    run = capture_cuda_graph(model, gs, ms)
    torch.testing.assert_close(run(pv).clone(), eager, rtol=0, atol=0)
    pv2 = torch.randn_like(pv)
    torch.testing.assert_close(run(pv2).clone(), model(pv2, gs, ms), rtol=0, atol=0)
