"""RMSNorm and the fused add + RMSNorm at the released hidden size vs the plain-PyTorch chain.

bf16 on the GPU, hidden 1024, ``N`` rows in ``{4096, 16384, 65536}``. Bandwidth counts each tensor
once (the minimum the op can move)::

    rms_norm_residual   bytes = 4 N D s + D s      (read x and residual, write sum and normed; s = 2)
    rms_norm            bytes = 2 N D s + D s

``pct_peak_gbps`` is relative to the measured device-to-device copy bandwidth (``bench.harness``);
the design target on H100 is 80% for the fused variant. The baseline ``torch`` is the reference:
the add, then the float32 statistics and casts as separate elementwise and reduction kernels.
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
HIDDEN = pick(1024, 64)
EPS = 1e-6
TOKENS = pick({"4k": 4096, "16k": 16384, "64k": 65536}, {"4k": 48, "16k": 48, "64k": 48})


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, HIDDEN, device=DEVICE, dtype=DTYPE, generator=gen)
    residual = torch.randn(n, HIDDEN, device=DEVICE, dtype=DTYPE, generator=gen)
    weight = 1 + 0.1 * torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE, generator=gen)
    return x, residual, weight


@requires_cuda
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_rms_norm_residual(benchmark, ceilings, tokens):
    n = TOKENS[tokens]
    inputs = [(*_inputs(n, seed), EPS) for seed in range(3)]
    x, _, weight, _ = inputs[0]
    gpu_bench(
        benchmark,
        pk.rms_norm_residual,
        inputs,
        ceilings=ceilings,
        bytes=4 * x.nbytes + weight.nbytes,
        baselines={"torch": reference.rms_norm_residual},
        info={"tokens": n, "hidden": HIDDEN, "dtype": str(DTYPE)},
    )


@requires_cuda
@pytest.mark.parametrize("tokens", list(TOKENS), ids=str)
def test_rms_norm(benchmark, ceilings, tokens):
    n = TOKENS[tokens]
    inputs = [(x, weight, EPS) for x, _, weight in (_inputs(n, seed) for seed in range(3))]
    x, weight, _ = inputs[0]
    gpu_bench(
        benchmark,
        pk.rms_norm,
        inputs,
        ceilings=ceilings,
        bytes=2 * x.nbytes + weight.nbytes,
        baselines={"torch": reference.rms_norm},
        info={"tokens": n, "hidden": HIDDEN, "dtype": str(DTYPE)},
    )
