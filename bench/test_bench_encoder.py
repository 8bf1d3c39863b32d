"""Whole-encoder throughput on the SPEC section 7 workloads: Triton backend vs the plain-PyTorch one.

FLOPs are the matmul work of :meth:`penguin_vl.workloads.Workload.encoder_flops` (patch embedding,
projections, MLP and attention of every layer); ``tokens_per_s`` counts encoder input tokens.
"""

from __future__ import annotations

import pytest
import torch

from bench import dry_run
from bench.dry_run import DEVICE, pick
from bench.harness import cpu_bench, gpu_bench, peak_bytes, requires_cuda
from penguin_vl import PenguinEncoder, PenguinEncoderConfig
from penguin_vl.workloads import WORKLOADS, make_inputs, uniform

# float16 in the dry run: the interpreter computes bfloat16 tl.dot wrongly and the kernels refuse it there.
DTYPE = pick(torch.bfloat16, torch.float16)
RELEASED = pick(
    PenguinEncoderConfig(),
    PenguinEncoderConfig(
        hidden_size=128, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    ),
)


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
        backend: PenguinEncoder.from_config(RELEASED, dtype=DTYPE, device=DEVICE, backend=backend)
        for backend in ("triton", "torch")
    }


@pytest.fixture(scope="module")
def compiled_reference(encoders):
    """The plain-PyTorch encoder under ``torch.compile``, built once for every workload.

    ``dynamic=True`` traces sizes symbolically from the first call, so the next workloads reuse the
    graphs instead of recompiling 28 layers each (the dry run uses the eager backend: same tracing,
    no code generation).
    """
    return _inference(torch.compile(encoders["torch"], dynamic=True, backend=pick("inductor", "eager")))


def _inference(fn):
    """``fn`` under ``torch.inference_mode()``: with grad enabled the encoder records the autograd graph."""

    def run(*args):
        with torch.inference_mode():
            return fn(*args)

    return run


@requires_cuda
@pytest.mark.parametrize("name", list(WORKLOADS), ids=str)
def test_encoder(benchmark, ceilings, encoders, compiled_reference, name):
    """Triton backend vs the eager reference and the reference under ``torch.compile``.

    MFU is ``pct_peak_tflops``: the workload's FLOPs over the time, against the measured bf16 matmul
    ceiling. Peak memory is what one forward allocates beyond the weights and inputs.
    """
    workload = dry_run.workload(name)
    inputs = []
    for seed in range(2):
        x = make_inputs(workload, device=DEVICE, dtype=DTYPE, seed=seed)
        inputs.append((x.pixel_values, x.grid_sizes.cpu(), x.merge_sizes.cpu()))
    reference = _inference(encoders["torch"])
    compiled = compiled_reference
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
            benchmark.extra_info[f"peak_mem_mib_{label}"] = peak_bytes(fn, inputs[0]) / 2**20


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
