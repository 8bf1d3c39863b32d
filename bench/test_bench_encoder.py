"""Whole-encoder throughput on the SPEC section 7 workloads: Triton backend vs the plain-PyTorch one.

FLOPs are the matmul work of :meth:`penguin_vl.workloads.Workload.encoder_flops` (patch embedding,
projections, MLP and attention of every layer); ``tokens_per_s`` counts encoder input tokens.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import cpu_bench, gpu_bench, requires_cuda
from penguin_vl import PenguinEncoder, PenguinEncoderConfig
from penguin_vl.workloads import WORKLOADS, make_inputs, uniform

RELEASED = PenguinEncoderConfig()


def _flops(config: PenguinEncoderConfig, workload) -> int:
    return workload.encoder_flops(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        inter=config.intermediate_size,
        patch_dim=config.patch_dim,
    )


@pytest.fixture(scope="module")
def encoders() -> dict[str, PenguinEncoder]:
    """The released encoder with random weights, bf16 on the GPU, once per backend (same seed)."""
    return {
        backend: PenguinEncoder.from_config(RELEASED, dtype=torch.bfloat16, device="cuda", backend=backend)
        for backend in ("triton", "torch")
    }


@requires_cuda
@pytest.mark.parametrize("name", list(WORKLOADS), ids=str)
def test_encoder(benchmark, ceilings, encoders, name):
    workload = WORKLOADS[name]
    x = make_inputs(workload, device="cuda", dtype=torch.bfloat16)
    args = (x.pixel_values, x.grid_sizes, x.merge_sizes)
    result = gpu_bench(
        benchmark,
        encoders["triton"],
        [args],
        ceilings=ceilings,
        flops=_flops(RELEASED, workload),
        baselines={"torch": encoders["torch"]},
        warmup=2,
        info={"workload": workload.describe()},
    )
    if result is not None:
        benchmark.extra_info["tokens_per_s"] = workload.tokens / result.seconds


def test_reference_encoder_cpu(benchmark):
    """The plain-PyTorch encoder at released widths, 2 layers, one 16 x 16 image, float32 on the CPU."""
    config = PenguinEncoderConfig(num_hidden_layers=2)
    model = PenguinEncoder.from_config(config, backend="torch")
    workload = uniform(256, 256, name="image_16x16")
    x = make_inputs(workload)
    result = cpu_bench(
        benchmark,
        model,
        [(x.pixel_values, x.grid_sizes, x.merge_sizes)],
        flops=_flops(config, workload),
        rounds=3,
        info={"workload": workload.describe(), "layers": config.num_hidden_layers},
    )
    if result is not None:
        benchmark.extra_info["tokens_per_s"] = workload.tokens / result.seconds
