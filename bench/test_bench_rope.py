"""The fused q/k RMSNorm + 2D rotary vs the plain-PyTorch chain, and ``rope_positions``.

``qk_norm_rope_2d`` at released dims (H 16, KV 8, hd 128, bf16) on the SPEC section 7 workloads, q
and k read in place from a fused QKV projection output ``[N, (H + 2 KV) hd]``. Bytes::

    minimum  = 2 N (H + KV) hd s             q and k read once, q_out and k_out written once (s = 2)
    kernel   = minimum + 8 N + 2 hd s + 2 hd  plus int32 positions, the two norm weights, inv_freq

``gbps``/``pct_peak_gbps`` use the kernel's bytes against the measured copy bandwidth; the design
target on H100 is 80% of it and 4x the reference chain (``torch``: the float32 RMSNorm statistics,
casts, the cos/sin tables and the rotary as separate kernels, for q and then k).

``rope_positions`` is timed on the 180-frame ``video`` workload and on ``image_mix``, against the
reference's loop over items, on the GPU (one host read of N) and on the CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

import penguin_kernels as pk
from bench import dry_run
from bench.dry_run import DEVICE, pick
from bench.harness import cpu_bench, gpu_bench, requires_cuda
from penguin_kernels import reference

# float16 in the dry run: the interpreter computes bfloat16 tl.dot wrongly and the kernels refuse it there.
DTYPE = pick(torch.bfloat16, torch.float16)
HEADS, KV_HEADS, HEAD_DIM = pick((16, 8, 128), (2, 1, 64))
THETA, EPS = 1e6, 1e-6
QK_WORKLOADS = ("latency", "image_mix", "batch64k", "video")


def _grids(name: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = dry_run.workload(name)
    grid = torch.tensor(w.grid_sizes, dtype=torch.int64, device=device)
    merge = torch.tensor(w.merge_sizes, dtype=torch.int64, device=device)
    return grid, merge


def _qk_inputs(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    """q and k as views of a fresh fused QKV buffer, norm weights, and the workload's positions."""
    positions, _ = pk.rope_positions(*_grids(name, DEVICE))
    n = positions.shape[0]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    q = qkv[:, : HEADS * HEAD_DIM].view(n, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(n, KV_HEADS, HEAD_DIM)
    wq, wk = (1 + 0.1 * torch.randn(HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen) for _ in range(2))
    return q, k, wq, wk, positions


@requires_cuda
@pytest.mark.parametrize("name", QK_WORKLOADS, ids=str)
def test_qk_norm_rope_2d(benchmark, ceilings, name):
    inputs = [_qk_inputs(name, seed) for seed in range(2)]
    n = inputs[0][0].shape[0]
    size = DTYPE.itemsize
    minimum = 2 * n * (HEADS + KV_HEADS) * HEAD_DIM * size
    moved = minimum + 8 * n + 2 * HEAD_DIM * size + 2 * HEAD_DIM
    gpu_bench(
        benchmark,
        functools.partial(pk.qk_norm_rope_2d, theta=THETA, eps=EPS),
        inputs,
        ceilings=ceilings,
        bytes=moved,
        baselines={"torch": functools.partial(reference.qk_norm_rope_2d, theta=THETA, eps=EPS)},
        info={
            "workload": dry_run.workload(name).describe(),
            "tokens": n,
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": str(DTYPE),
            "bytes_min": minimum,
            "bytes_over_min": moved / minimum,
        },
    )


@requires_cuda
@pytest.mark.parametrize("name", ("video", "image_mix"), ids=str)
def test_rope_positions_gpu(benchmark, ceilings, name):
    grid, merge = _grids(name, DEVICE)
    gpu_bench(
        benchmark,
        pk.rope_positions,
        [(grid, merge)],
        ceilings=ceilings,
        baselines={"torch": reference.rope_positions},
        flush_l2=False,
        info={"workload": dry_run.workload(name).describe()},
    )


@pytest.mark.parametrize("name", ("video", "image_mix"), ids=str)
def test_rope_positions_cpu(benchmark, name):
    grid, merge = _grids(name, "cpu")
    cpu_bench(
        benchmark,
        pk.rope_positions,
        [(grid, merge)],
        baselines={"torch": reference.rope_positions},
        info={"workload": dry_run.workload(name).describe()},
    )
