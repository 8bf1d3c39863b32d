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


def _inference(fn):
    """``fn`` under ``torch.inference_mode()``: with grad enabled the encoder records the autograd graph."""

    def run(*args):
        with torch.inference_mode():
            return fn(*args)

    return run


def _peak_bytes(fn, args: tuple) -> int:
    """Peak device memory one call allocates beyond what is already held (weights, inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@requires_cuda
@pytest.mark.parametrize("name", list(WORKLOADS), ids=str)
def test_encoder(benchmark, ceilings, encoders, name):
    """Triton backend vs the eager reference and the reference under ``torch.compile``.

    MFU is ``pct_peak_tflops``: the workload's FLOPs over the time, against the measured bf16 matmul
    ceiling. Peak memory is what one forward allocates beyond the weights and inputs.
    """
    workload = WORKLOADS[name]
    inputs = []
    for seed in range(2):
        x = make_inputs(workload, device="cuda", dtype=torch.bfloat16, seed=seed)
        inputs.append((x.pixel_values, x.grid_sizes.cpu(), x.merge_sizes.cpu()))
    reference = _inference(encoders["torch"])
    compiled = _inference(torch.compile(encoders["torch"]))
    triton = _inference(encoders["triton"])
    result = gpu_bench(
        benchmark,
        triton,
        inputs,
        ceilings=ceilings,
        flops=_flops(RELEASED, workload),
        baselines={"torch_eager": reference, "torch_compile": compiled},
        warmup=2,
        info={"workload": workload.describe()},
    )
    if result is not None:
        benchmark.extra_info["tokens_per_s"] = workload.tokens / result.seconds
        benchmark.extra_info["images_per_s"] = len(workload.grid_sizes) / result.seconds
        benchmark.extra_info["mfu_pct"] = result.info.get("pct_peak_tflops")
        for label, fn in (("triton", triton), ("torch_eager", reference), ("torch_compile", compiled)):
            benchmark.extra_info[f"peak_mem_mib_{label}"] = _peak_bytes(fn, inputs[0]) / 2**20


def test_reference_encoder_cpu(benchmark):
    """The plain-PyTorch encoder at released widths, 2 layers, one 16 x 16 image, float32 on the CPU."""
    config = PenguinEncoderConfig(num_hidden_layers=2)
    model = PenguinEncoder.from_config(config, backend="torch")
    workload = uniform(256, 256, name="image_16x16")
    x = make_inputs(workload)
    result = cpu_bench(
        benchmark,
        _inference(model),
        [(x.pixel_values, x.grid_sizes, x.merge_sizes)],
        flops=_flops(config, workload),
        rounds=3,
        info={"workload": workload.describe(), "layers": config.num_hidden_layers},
    )
    if result is not None:
        benchmark.extra_info["tokens_per_s"] = workload.tokens / result.seconds
