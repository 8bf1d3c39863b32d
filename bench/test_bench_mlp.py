"""Epilogue-fused GEMMs and MLPs at released widths vs cuBLAS and the unfused PyTorch chain.

bf16 on the GPU, ``N`` tokens in ``{4096, 16384, 65536}``. Throughput counts the useful work::

    swiglu_mlp     FLOPs = 2 N D (2 I) + 2 N I D                   D = 1024, I = 3072 (encoder)
    projector_mlp  FLOPs = 2 N D H + 2 N H H                       D = 1024, H = 2048 (2B), 4096 (8B)
    linear         FLOPs = 2 N K N_out
    bytes = inputs + weights + outputs, each read or written once (intermediates excluded)

``pct_peak_tflops`` is relative to the measured ``torch.matmul`` ceiling (``bench.harness``). The
baseline ``torch`` is the plain-PyTorch reference (cuBLAS GEMMs, biases in cuBLAS's epilogue,
separate elementwise kernels for the activation and the residual add), timed on the same inputs.
Design targets on H100: each MLP at least 1.15x the chain and 70% of the matmul ceiling.
"""

from __future__ import annotations

import pytest
import torch

import penguin_kernels as pk
from bench.dry_run import DEVICE, pick
from bench.harness import gpu_bench, requires_cuda
from penguin_kernels import reference

# float16 in the dry run: the interpreter computes bfloat16 tl.dot wrongly and the kernels refuse it there.
DTYPE = pick(torch.bfloat16, torch.float16)
TOKENS = pick({"4k": 4096, "16k": 16384, "64k": 65536}, {"4k": 48, "16k": 48, "64k": 48})
HIDDEN, INTER = pick((1024, 3072), (64, 96))
PROJECTORS = pick({"penguin-2b": 2048, "penguin-8b": 4096}, {"penguin-2b": 64, "penguin-8b": 128})


def _randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=gen) * scale


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.nbytes for t in tensors)


@requires_cuda
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_swiglu_mlp(benchmark, ceilings, tokens):
    n = TOKENS[tokens]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w_gate_up = _randn(2 * INTER, HIDDEN, gen=gen, scale=HIDDEN**-0.5)
    w_down = _randn(HIDDEN, INTER, gen=gen, scale=INTER**-0.5)
    inputs = [(_randn(n, HIDDEN, gen=gen), w_gate_up, w_down, _randn(n, HIDDEN, gen=gen)) for _ in range(2)]
    x, _, _, residual = inputs[0]
    gpu_bench(
        benchmark,
        pk.swiglu_mlp,
        inputs,
        ceilings=ceilings,
        flops=2 * n * HIDDEN * 2 * INTER + 2 * n * INTER * HIDDEN,
        bytes=_bytes(x, w_gate_up, w_down, residual) + x.nbytes,
        baselines={"torch": reference.swiglu_mlp},
        info={"tokens": n, "hidden": HIDDEN, "intermediate": INTER, "dtype": str(DTYPE)},
    )


@requires_cuda
@pytest.mark.parametrize("model", list(PROJECTORS), ids=str)
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_projector_mlp(benchmark, ceilings, model, tokens):
    n, h = TOKENS[tokens], PROJECTORS[model]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    weights = (
        _randn(h, HIDDEN, gen=gen, scale=HIDDEN**-0.5),
        _randn(h, gen=gen, scale=0.1),
        _randn(h, h, gen=gen, scale=h**-0.5),
        _randn(h, gen=gen, scale=0.1),
    )
    inputs = [(_randn(n, HIDDEN, gen=gen), *weights) for _ in range(2)]
    gpu_bench(
        benchmark,
        pk.projector_mlp,
        inputs,
        ceilings=ceilings,
        flops=2 * n * HIDDEN * h + 2 * n * h * h,
        bytes=_bytes(inputs[0][0], *weights) + n * h * inputs[0][0].element_size(),
        baselines={"torch": reference.projector_mlp},
        info={"tokens": n, "in": HIDDEN, "hidden": h, "out": h, "dtype": str(DTYPE)},
    )


def _linear_residual(x, w, residual):
    return pk.linear(x, w, residual=residual)


def _torch_linear_residual(x, w, residual):
    return residual + reference.linear(x, w)


# The encoder's other projections: fused q/k/v (1024 -> 4096) and the attention output with the
# residual add in its epilogue (2048 -> 1024); the GEMM building block against cuBLAS alone.
LINEARS = {"qkv": (HIDDEN, 4 * HIDDEN, False), "o_proj+residual": (2 * HIDDEN, HIDDEN, True)}


@requires_cuda
@pytest.mark.parametrize("shape", list(LINEARS), ids=str)
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_linear(benchmark, ceilings, shape, tokens):
    n = TOKENS[tokens]
    k, n_out, with_residual = LINEARS[shape]
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    w = _randn(n_out, k, gen=gen, scale=k**-0.5)
    if with_residual:
        inputs = [(_randn(n, k, gen=gen), w, _randn(n, n_out, gen=gen)) for _ in range(2)]
        fn, baseline = _linear_residual, _torch_linear_residual
    else:
        inputs = [(_randn(n, k, gen=gen), w) for _ in range(2)]
        fn, baseline = pk.linear, reference.linear
    gpu_bench(
        benchmark,
        fn,
        inputs,
        ceilings=ceilings,
        flops=2 * n * k * n_out,
        bytes=_bytes(*inputs[0]) + n * n_out * w.element_size(),
        baselines={"torch": baseline},
        info={"tokens": n, "k": k, "n": n_out, "residual": with_residual, "dtype": str(DTYPE)},
    )
