"""Gradients of ``varlen_attention`` against autograd through the float64 reference.

Relative Frobenius error of dq, dk, dv against the float64 reference's gradients on the same
(rounded) inputs and output gradient. The backward recomputes P from the float32 log-sum-exp,
rounds P and dS to the input dtype for its matmuls and each gradient once:

=========  ========  ====================================================================
dtype      tol       why
=========  ========  ====================================================================
float32    2e-6      summation order and exp2 only; measured ~2.5e-7
float16    3e-3      P, dS and the output in 2^-11 steps; measured ~3e-4 (8x headroom)
bfloat16   2.5e-2    the same roundings at 2^-8, 8x fp16; GPU only (bf16 ``tl.dot`` is
                     wrong in the interpreter)
=========  ========  ====================================================================

``torch.autograd.gradcheck`` is not run here: the op takes float16/bfloat16/float32 only, float64
through the interpreter's ``tl.dot`` is not exact, and in float32 finite differences are noisier
than the float64 comparison above. Compile tests and the
fake-tensor half of ``opcheck`` need a GPU: under ``TRITON_INTERPRET=1`` torch's ``wrap_triton``
hands back the interpreted kernel itself, which then runs on FakeTensors and fails.
"""

from __future__ import annotations

import pytest
import torch

from penguin_kernels import reference as ref
from penguin_kernels.attention import varlen_attention, varlen_attention_op
from penguin_kernels.attention_backward import varlen_attention_backward
from tests.utils import HAS_CUDA, INTERPRETER, assert_rel_close, device, kernel_dtypes, requires_cuda

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)

TOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}

SEGMENTS = {
    "odd": [17, 1, 40, 5],
    "empty_and_single": [0, 1, 0, 23, 1, 0],
    "several_blocks": [3, 70],
    "one": [33],
}


def _cu(lengths: list[int], dev: torch.device | str) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(dtype=torch.int32, device=dev)


def _leaves(n: int, heads: int, kv_heads: int, hd: int, dtype: torch.dtype, seed: int):
    """q, k, v requiring grad and an output gradient, on the test device."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((n, heads, hd), (n, kv_heads, hd), (n, kv_heads, hd), (n, heads, hd))
    q, k, v, do = (torch.randn(*s, generator=gen).to(device=device(), dtype=dtype) for s in shapes)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def _reference_grads(q, k, v, do, cu, softmax_scale=None):
    """dq, dk, dv of the float64 reference at the same inputs, on the CPU."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out = ref.varlen_attention(*leaves, cu.cpu(), softmax_scale)
    out.backward(do.cpu().double())
    return [t.grad for t in leaves]


def _grads(q, k, v, do, cu, max_seqlen=None, softmax_scale=None):
    for t in (q, k, v):
        t.grad = None
    varlen_attention(q, k, v, cu, max_seqlen, softmax_scale).backward(do)
    return [t.grad for t in (q, k, v)]


def _check(q, k, v, do, cu, what, softmax_scale=None):
    got = _grads(q, k, v, do, cu, softmax_scale=softmax_scale)
    expected = _reference_grads(q, k, v, do, cu, softmax_scale)
    for name, g, e in zip("qkv", got, expected, strict=True):
        assert g.dtype == q.dtype
        assert_rel_close(g.float().cpu(), e, TOL[q.dtype], f"d{name} {what}")


@requires_kernels
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("lengths", list(SEGMENTS.values()), ids=list(SEGMENTS))
def test_segment_mixes(lengths, dtype):
    q, k, v, do = _leaves(sum(lengths), 4, 2, 64, dtype, seed=len(lengths))
    _check(q, k, v, do, _cu(lengths, device()), f"{lengths}")


@requires_kernels
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("hd", [64, 128], ids=lambda d: f"hd{d}")
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1)], ids=["mha", "gqa2", "gqa4", "gqa8"])
def test_gqa_groups_and_head_dims(heads, kv_heads, hd):
    # float16: the 16-bit path with its roundings, at a cost the interpreter allows for every group
    lengths = [1, 19, 0, 20]
    q, k, v, do = _leaves(sum(lengths), heads, kv_heads, hd, torch.float16, seed=heads * hd)
    _check(q, k, v, do, _cu(lengths, device()), f"H={heads} KV={kv_heads} hd={hd}")


@requires_kernels
def test_group_wider_than_a_tile_pack():
    # 16 query heads per KV head: the dk/dv kernel loops over two chunks of 8 packed heads
    lengths = [7, 12]
    q, k, v, do = _leaves(sum(lengths), 16, 1, 64, torch.float32, seed=16)
    _check(q, k, v, do, _cu(lengths, device()), "group 16")


@requires_kernels
def test_softmax_scale():
    lengths = [6, 21]
    q, k, v, do = _leaves(sum(lengths), 4, 2, 64, torch.float32, seed=11)
    _check(q, k, v, do, _cu(lengths, device()), "scale 0.3", softmax_scale=0.3)


@requires_kernels
def test_log_sum_exp_output():
    lengths = [5, 0, 18]
    q, k, v, _ = _leaves(sum(lengths), 4, 2, 64, torch.float32, seed=3)
    cu = _cu(lengths, device())
    _, lse = torch.ops.penguin.varlen_attention(q, k, v, cu, 18, None)
    assert lse.shape == (sum(lengths), 4) and lse.dtype == torch.float32
    start = 0
    for length in lengths:
        rows = slice(start, start + length)
        kk = k[rows].repeat_interleave(2, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q[rows].double(), kk.double()) * 64**-0.5
        torch.testing.assert_close(lse[rows].double().cpu(), scores.logsumexp(-1).t().cpu(), rtol=1e-6, atol=1e-6)
        start += length


@requires_kernels
def test_packed_batch_equals_per_segment_runs_and_is_deterministic():
    lengths = [9, 0, 30, 1]
    q, k, v, do = _leaves(sum(lengths), 4, 2, 64, torch.float16, seed=7)
    cu = _cu(lengths, device())
    packed = _grads(q, k, v, do, cu, max(lengths))
    # the same inputs again: bit-identical (no atomics, fixed summation order)
    assert all(torch.equal(a, b) for a, b in zip(packed, _grads(q, k, v, do, cu, max(lengths)), strict=True))
    start = 0
    for length in lengths:
        rows = slice(start, start + length)
        parts = [t[rows].detach().requires_grad_() for t in (q, k, v)]
        alone = _grads(*parts, do[rows], _cu([length], device()), max(lengths))
        for name, p, a in zip("qkv", packed, alone, strict=True):
            assert torch.equal(p[rows], a), f"d{name} of segment {rows}"
        start += length


@requires_kernels
def test_views_of_fused_qkv_and_strided_output_gradient():
    heads, kv_heads, hd, lengths = 4, 2, 64, [13, 20]
    n = sum(lengths)
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * hd, generator=gen).to(device())
    qkv.requires_grad_()
    q = qkv[:, : heads * hd].view(n, heads, hd)
    k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(n, kv_heads, hd)
    v = qkv[:, (heads + kv_heads) * hd :].view(n, kv_heads, hd)
    cu = _cu(lengths, device())
    # the output gradient of a transposed consumer: token stride 1 * hd, head stride n * hd
    do = torch.randn(heads, n, hd, generator=gen).to(device()).transpose(0, 1)
    varlen_attention(q, k, v, cu).backward(do)
    expected = torch.cat([g.reshape(n, -1) for g in _reference_grads(q, k, v, do, cu)], dim=1)
    assert_rel_close(qkv.grad.cpu(), expected, TOL[torch.float32], "d(qkv)")


@requires_kernels
def test_activation_checkpointing():
    lengths = [11, 25]
    q, k, v, do = _leaves(sum(lengths), 4, 2, 64, torch.float32, seed=5)
    cu = _cu(lengths, device())
    expected = _grads(q, k, v, do, cu)
    for t in (q, k, v):
        t.grad = None
    out = torch.utils.checkpoint.checkpoint(varlen_attention_op, q, k, v, cu, 25, use_reentrant=False)
    out.backward(do)
    for name, g, e in zip("qkv", (q.grad, k.grad, v.grad), expected, strict=True):
        assert torch.equal(g, e), f"d{name}"


@requires_kernels
@pytest.mark.usefixtures("poisoned_outputs")
def test_no_tokens():
    q, k, v, do = _leaves(0, 4, 2, 64, torch.float32, seed=0)
    dq, dk, dv = varlen_attention_backward(do, q, k, v, do, torch.zeros(0, 4), _cu([0, 0], device()), 0)
    assert dq.shape == (0, 4, 64) and dk.shape == dv.shape == (0, 2, 64)


@requires_kernels
def test_ops_schema_and_autograd_registration():
    lengths = [5, 0, 9]
    q, k, v, do = _leaves(sum(lengths), 4, 2, 64, torch.float32, seed=2)
    cu = _cu(lengths, device())
    utils = ("test_schema", "test_autograd_registration")
    if device() == "cuda":
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.penguin.varlen_attention.default, (q, k, v, cu, 9, None), test_utils=utils)
    with torch.no_grad():
        out, lse = torch.ops.penguin.varlen_attention(q, k, v, cu, 9, None)
    args = (do, q.detach(), k.detach(), v.detach(), out, lse, cu, 9, None)
    torch.library.opcheck(torch.ops.penguin.varlen_attention_backward.default, args, test_utils=utils)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hd", [64, 128], ids=lambda d: f"hd{d}")
def test_gpu_long_segments_released_heads(hd, dtype, poisoned_outputs):
    lengths = [2048 + 3, 1, 700, 0, 77]
    q, k, v, do = _leaves(sum(lengths), 16, 8, hd, dtype, seed=hd)
    _check(q, k, v, do, _cu(lengths, device()), f"long segments hd={hd}")


@requires_cuda
def test_gpu_forward_and_backward_under_torch_compile():
    lengths = [100, 3, 250]
    cu = _cu(lengths, device())
    eager = _leaves(sum(lengths), 8, 2, 128, torch.bfloat16, seed=2)
    compiled = [t.detach().clone().requires_grad_(t.requires_grad) for t in eager]

    def attention(q, k, v):
        return varlen_attention_op(q, k, v, cu, 250)

    # fullgraph: no graph break; AOT autograd traces the registered backward op into the backward graph
    attention(*eager[:3]).backward(eager[3])
    torch.compile(attention, fullgraph=True)(*compiled[:3]).backward(compiled[3])
    for name, c, e in zip("qkv", compiled[:3], eager[:3], strict=True):
        assert torch.equal(c.grad, e.grad), f"d{name}"
