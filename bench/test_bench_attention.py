"""Varlen GQA attention on the SPEC section 7 workloads and uniform segment sweeps, released dims.

One attention layer of the released encoder: bf16, 16 query heads, 8 KV heads, head_dim 128, one
segment per frame. Throughput counts the useful work only::

    FLOPs = 4 * sum_i L_i^2 * heads * head_dim        (QK^T and PV, 2 FLOPs per multiply-add)
    bytes = q + k + v + out                            (each read or written once)

The project op is ``torch.ops.penguin.varlen_attention`` (what the encoder calls: trusted
``cu_seqlens``, no host sync). Baselines, timed in the same process on the same inputs:

* ``torch_sdpa``: :func:`penguin_kernels.reference.varlen_attention`, the fallback of the plain
  PyTorch path: ``scaled_dot_product_attention`` per run of equal-length segments, K/V heads repeated.
* ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash-attention inside PyTorch) where
  the installed torch has it. Before ``enable_gqa`` existed it needs one K/V head per query head; the
  repeated K/V are then built outside the timed region, which favours the baseline.
* ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when flash-attn is installed.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from bench import dry_run
from bench.dry_run import DEVICE, pick
from bench.harness import gpu_bench, requires_cuda
from penguin_kernels import reference
from penguin_kernels.attention import varlen_attention_op
from penguin_vl.workloads import WORKLOADS, Workload, uniform

HEADS, KV_HEADS, HEAD_DIM = pick((16, 8, 128), (2, 1, 64))
# float16 in the dry run: the interpreter computes bfloat16 tl.dot wrongly and the kernels refuse it there.
DTYPE = pick(torch.bfloat16, torch.float16)

CASES: dict[str, Workload] = {
    name: dry_run.workload(name, full)
    for name, full in {
        "uniform_1k": uniform(1024, 65536, name="uniform_1k"),
        "uniform_4k": uniform(4096, 65536, name="uniform_4k"),
        "uniform_16k": uniform(16384, 65536, name="uniform_16k"),
        "uniform_64": uniform(64, 65536, name="uniform_64"),
        **{name: WORKLOADS[name] for name in ("latency", "image_mix", "long", "video")},
    }.items()
}


def _torch_varlen():
    if dry_run.ACTIVE:
        return None, False  # flash-attention inside PyTorch has no CPU kernel
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _inputs(workload: Workload, seed: int, repeat_kv: bool) -> tuple:
    """``(q, k, v, cu_seqlens, max_seqlen, k_rep, v_rep)`` on the GPU; the last two only if asked."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    n = workload.tokens
    q = torch.randn(n, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    group = HEADS // KV_HEADS
    k_rep = k.repeat_interleave(group, dim=1) if repeat_kv else None
    v_rep = v.repeat_interleave(group, dim=1) if repeat_kv else None
    return q, k, v, workload.cu_seqlens(DEVICE), workload.max_seqlen, k_rep, v_rep


def _ours(q, k, v, cu, max_seqlen, *_):
    return varlen_attention_op(q, k, v, cu, max_seqlen)


def _torch_sdpa(q, k, v, cu, *_):
    return reference.varlen_attention(q, k, v, cu)


@requires_cuda
@pytest.mark.parametrize("name", list(CASES), ids=str)
def test_varlen_attention(benchmark, ceilings, name):
    workload = CASES[name]
    varlen_attn, native_gqa = _torch_varlen()
    flash = _flash_attn()
    repeat_kv = varlen_attn is not None and not native_gqa
    inputs = [_inputs(workload, seed, repeat_kv) for seed in range(2)]

    baselines = {"torch_sdpa": _torch_sdpa}
    if varlen_attn is not None:
        if native_gqa:
            baselines["torch_varlen"] = lambda q, k, v, cu, m, *_: varlen_attn(q, k, v, cu, cu, m, m, enable_gqa=True)
        else:
            baselines["torch_varlen"] = lambda q, k, v, cu, m, k_rep, v_rep: varlen_attn(q, k_rep, v_rep, cu, cu, m, m)
    if flash is not None:
        baselines["flash_attn"] = lambda q, k, v, cu, m, *_: flash(q, k, v, cu, cu, m, m)

    q, k, v = inputs[0][:3]
    gpu_bench(
        benchmark,
        _ours,
        inputs,
        ceilings=ceilings,
        flops=workload.attention_flops(HEADS, HEAD_DIM),
        bytes=2 * q.nbytes + k.nbytes + v.nbytes,
        baselines=baselines,
        info={
            "workload": workload.describe(),
            "segments": workload.frames,
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": str(DTYPE),
            "torch_varlen_gqa": None if varlen_attn is None else ("native" if native_gqa else "repeated_kv"),
        },
    )
