"""Training-time cost of every kernel: backward alone (attention) and forward + backward, vs PyTorch.

bf16 on the GPU at released dims (hidden 1024, 16 query heads, 8 KV heads, head_dim 128, SwiGLU
intermediate 3072). Throughput counts the useful work, from explicit formulas:

    attention backward      FLOPs = 2.5 x forward = 2.5 x 4 sum_i L_i^2 H hd   (dV, dP, dQ, dK: 4 matmuls,
                                                                               plus recomputing S: 5 / 2)
    attention fwd + bwd     FLOPs = 3.5 x forward
    GEMM / MLP fwd + bwd    FLOPs = 3 x forward GEMM FLOPs (dX and dW each cost one forward); the
                            backward's recompute of the pre-activation is not counted as useful
    norm / rotary fwd + bwd bytes: each tensor read or written once per pass (formulas at each test)

Providers, timed in the same process on the same inputs:

* ``ours``: the registered ops and their registered backward.
* ``torch``: the plain-PyTorch reference (:mod:`penguin_kernels.reference`) under eager autograd.
* ``torch_varlen`` (attention): ``torch.nn.attention.varlen.varlen_attn`` (flash-attention inside
  PyTorch) and its own backward, where the installed torch has it; K/V repeated per query head
  outside the timed region when it predates ``enable_gqa``.

The backward-only attention test builds each provider's graph once outside the timed region and
times ``torch.autograd.grad(..., retain_graph=True)``: the backward kernels and nothing else.
Target (H100/H200): attention backward at least 450 TFLOP/s on 4k-16k segments at head_dim 128.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import penguin_kernels as pk
from bench.harness import gpu_bench, requires_cuda
from penguin_kernels import reference
from penguin_kernels.attention import varlen_attention_op
from penguin_vl.workloads import WORKLOADS, Workload, uniform

DTYPE = torch.bfloat16
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
HIDDEN, INTER, PROJECTOR = 1024, 3072, 2048
EPS, THETA = 1e-6, 1e6
TOKENS = {"16k": 16384, "64k": 65536}

ATTENTION_CASES: dict[str, Workload] = {
    "uniform_4k": uniform(4096, 65536, name="uniform_4k"),
    "uniform_16k": uniform(16384, 65536, name="uniform_16k"),
    **{name: WORKLOADS[name] for name in ("image_mix", "long", "video")},
}


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def _randn(*shape: int, gen: torch.Generator, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, device="cuda", dtype=DTYPE, generator=gen) * scale
    return t.requires_grad_(grad)


def _attention_graphs(workload: Workload, seed: int) -> dict[str, tuple]:
    """Per provider: ``(output, leaves, output gradient)`` of one forward, built outside the timing."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = workload.tokens
    q = _randn(n, HEADS, HEAD_DIM, gen=gen)
    k = _randn(n, KV_HEADS, HEAD_DIM, gen=gen)
    v = _randn(n, KV_HEADS, HEAD_DIM, gen=gen)
    do = _randn(n, HEADS, HEAD_DIM, gen=gen, grad=False)
    cu, m = workload.cu_seqlens("cuda"), workload.max_seqlen
    graphs = {"ours": (varlen_attention_op(q, k, v, cu, m), (q, k, v), do)}
    varlen_attn, native_gqa = _torch_varlen()
    if varlen_attn is not None:
        if native_gqa:
            out = varlen_attn(q, k, v, cu, cu, m, m, enable_gqa=True)
            graphs["torch_varlen"] = (out, (q, k, v), do)
        else:
            group = HEADS // KV_HEADS
            k_rep = k.detach().repeat_interleave(group, dim=1).requires_grad_()
            v_rep = v.detach().repeat_interleave(group, dim=1).requires_grad_()
            graphs["torch_varlen"] = (varlen_attn(q, k_rep, v_rep, cu, cu, m, m), (q, k_rep, v_rep), do)
    return graphs


def _backward_of(provider: str):
    def run(graphs: dict[str, tuple]):
        out, leaves, do = graphs[provider]
        return torch.autograd.grad(out, leaves, do, retain_graph=True)

    return run


@requires_cuda
@pytest.mark.parametrize("name", list(ATTENTION_CASES), ids=str)
def test_attention_backward(benchmark, ceilings, name):
    workload = ATTENTION_CASES[name]
    inputs = [(_attention_graphs(workload, seed),) for seed in range(2)]
    providers = [p for p in inputs[0][0] if p != "ours"]
    q = inputs[0][0]["ours"][1][0]
    gpu_bench(
        benchmark,
        _backward_of("ours"),
        inputs,
        ceilings=ceilings,
        flops=2.5 * workload.attention_flops(HEADS, HEAD_DIM),
        # read q, k, v, o, dO; write dq, dk, dv (the minimum; lse and delta are ~1/64 of it)
        bytes=4 * q.nbytes + 4 * q.nbytes * KV_HEADS // HEADS,
        baselines={p: _backward_of(p) for p in providers},
        info={"workload": workload.describe(), "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
    )


def _forward_backward(fn):
    """``fn``'s forward and the gradients of every input that requires grad, for output gradients ``grads``."""

    def run(args: tuple, grads: tuple):
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        return torch.autograd.grad(outs, leaves, grads)

    return run


def _bench_fwd_bwd(benchmark, ceilings, ours, torch_fn, inputs, *, flops=None, bytes=None, info=None):
    gpu_bench(
        benchmark,
        _forward_backward(ours),
        inputs,
        ceilings=ceilings,
        flops=flops,
        bytes=bytes,
        baselines={"torch": _forward_backward(torch_fn)},
        info=info,
    )


@requires_cuda
@pytest.mark.parametrize("name", ["uniform_4k", "image_mix", "video"], ids=str)
def test_attention_forward_backward(benchmark, ceilings, name):
    workload = ATTENTION_CASES[name]
    cu, m = workload.cu_seqlens("cuda"), workload.max_seqlen
    inputs = []
    for seed in range(2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        n = workload.tokens
        args = (_randn(n, HEADS, HEAD_DIM, gen=gen), *(_randn(n, KV_HEADS, HEAD_DIM, gen=gen) for _ in range(2)))
        inputs.append((args, (_randn(n, HEADS, HEAD_DIM, gen=gen, grad=False),)))
    _bench_fwd_bwd(
        benchmark,
        ceilings,
        lambda q, k, v: varlen_attention_op(q, k, v, cu, m),
        lambda q, k, v: reference.varlen_attention(q, k, v, cu),
        inputs,
        flops=3.5 * workload.attention_flops(HEADS, HEAD_DIM),
        info={"workload": workload.describe(), "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
    )


@requires_cuda
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_rms_norm_residual_forward_backward(benchmark, ceilings, tokens):
    n = TOKENS[tokens]
    inputs = []
    for seed in range(2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x, residual, dy, ds = (_randn(n, HIDDEN, gen=gen, grad=i < 2) for i in range(4))
        weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda", dtype=DTYPE, generator=gen)).requires_grad_()
        inputs.append(((x, residual, weight), (dy, ds)))
    x = inputs[0][0][0]
    _bench_fwd_bwd(
        benchmark,
        ceilings,
        lambda x, r, w: pk.rms_norm_residual(x, r, w, EPS),
        lambda x, r, w: reference.rms_norm_residual(x, r, w, EPS),
        inputs,
        # forward: read x, residual, write y, s; backward: read s, dy, ds, write dx
        bytes=8 * x.nbytes,
        info={"tokens": n, "hidden": HIDDEN},
    )


@requires_cuda
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_qk_norm_rope_2d_forward_backward(benchmark, ceilings, tokens):
    n = TOKENS[tokens]
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    inputs = []
    for seed in range(2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        qkv = _randn(n, width, gen=gen)
        weights = tuple((1 + 0.1 * torch.randn(HEAD_DIM, device="cuda", dtype=DTYPE)).requires_grad_() for _ in "qk")
        positions = torch.randint(0, 64, (n, 2), device="cuda", dtype=torch.int32, generator=gen)
        grads = (_randn(n, HEADS, HEAD_DIM, gen=gen, grad=False), _randn(n, KV_HEADS, HEAD_DIM, gen=gen, grad=False))
        inputs.append(((qkv, *weights, positions), grads))

    def split(qkv):
        q = qkv[:, : HEADS * HEAD_DIM].view(-1, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(-1, KV_HEADS, HEAD_DIM)
        return q, k

    def ours(qkv, wq, wk, positions):
        return pk.qk_norm_rope_2d(*split(qkv), wq, wk, positions, theta=THETA, eps=EPS)

    def torch_fn(qkv, wq, wk, positions):
        return reference.qk_norm_rope_2d(*split(qkv), wq, wk, positions, theta=THETA, eps=EPS)

    elements = n * (HEADS + KV_HEADS) * HEAD_DIM
    _bench_fwd_bwd(
        benchmark,
        ceilings,
        ours,
        torch_fn,
        inputs,
        # forward: read x, write out; backward: read x and the output gradient, write dx (2 bytes each)
        bytes=5 * 2 * elements,
        info={"tokens": n, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
    )


def _mlp_inputs(n: int, shapes: list[tuple[int, ...]], out_dim: int, seed: int) -> tuple:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    args = tuple(_randn(*s, gen=gen, scale=s[-1] ** -0.5 if len(s) == 2 and s[0] != n else 1.0) for s in shapes)
    return args, (_randn(n, out_dim, gen=gen, grad=False),)


@requires_cuda
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_swiglu_mlp_forward_backward(benchmark, ceilings, tokens):
    n = TOKENS[tokens]
    shapes = [(n, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER), (n, HIDDEN)]
    inputs = [_mlp_inputs(n, shapes, HIDDEN, seed) for seed in range(2)]
    _bench_fwd_bwd(
        benchmark,
        ceilings,
        pk.swiglu_mlp,
        reference.swiglu_mlp,
        inputs,
        flops=3 * (2 * n * HIDDEN * 2 * INTER + 2 * n * INTER * HIDDEN),
        info={"tokens": n, "hidden": HIDDEN, "intermediate": INTER},
    )


@requires_cuda
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_projector_mlp_forward_backward(benchmark, ceilings, tokens):
    n = TOKENS[tokens]
    shapes = [(n, HIDDEN), (PROJECTOR, HIDDEN), (PROJECTOR,), (PROJECTOR, PROJECTOR), (PROJECTOR,)]
    inputs = [_mlp_inputs(n, shapes, PROJECTOR, seed) for seed in range(2)]
    _bench_fwd_bwd(
        benchmark,
        ceilings,
        pk.projector_mlp,
        reference.projector_mlp,
        inputs,
        flops=3 * (2 * n * HIDDEN * PROJECTOR + 2 * n * PROJECTOR * PROJECTOR),
        info={"tokens": n, "in": HIDDEN, "hidden": PROJECTOR},
    )


@requires_cuda
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_linear_gelu_forward_backward(benchmark, ceilings, tokens):
    n = TOKENS[tokens]
    shapes = [(n, HIDDEN), (PROJECTOR, HIDDEN), (PROJECTOR,)]
    inputs = [_mlp_inputs(n, shapes, PROJECTOR, seed) for seed in range(2)]
    _bench_fwd_bwd(
        benchmark,
        ceilings,
        lambda x, w, b: pk.linear(x, w, b, gelu=True),
        lambda x, w, b: F.gelu(reference.linear(x, w, b)),
        inputs,
        flops=3 * 2 * n * HIDDEN * PROJECTOR,
        info={"tokens": n, "k": HIDDEN, "n": PROJECTOR},
    )
