"""Encoder training step (forward + backward) on SPEC section 7 workloads: Triton backend vs PyTorch.

The released encoder (28 layers, bf16, random weights), every parameter trainable, ``pixel_values``
not. One step: gradients reset, the forward, and the backward of a fixed output gradient (what any
loss hands the encoder). Providers, in the same process on the same inputs:

* ``triton``: ``backend="triton"``, the kernels and their registered backwards;
* ``torch_eager``: ``backend="torch"``, the plain-PyTorch reference under eager autograd;
* ``torch_compile``: the same reference model under ``torch.compile`` (default mode).

Throughput counts model FLOPs, the standard MFU convention (no recomputation counted)::

    FLOPs = 3 x forward matmul FLOPs        forward, then dX and dW (or dQ/dK/dV) each costing one forward

with the forward's from :meth:`penguin_vl.workloads.Workload.encoder_flops`. ``tokens_per_s`` counts
encoder input tokens; ``mfu_pct`` is against the measured bf16 matmul ceiling; ``peak_mem_mib_*`` is
what one step allocates beyond the weights and inputs (activations saved for the backward, the
gradients, the backward's scratch). Targets (H100/H200): at least 1.5x ``torch_eager`` and 1.2x
``torch_compile`` in tokens/s, with a peak no higher than the reference's.

``batch64k`` is left out: 64k tokens through 28 eager-reference layers keep more activations than
an 80 GB GPU holds.
"""

from __future__ import annotations

import pytest
import torch

from bench import dry_run
from bench.dry_run import DEVICE, pick
from bench.harness import gpu_bench, peak_bytes, requires_cuda
from penguin_vl import PenguinEncoder, PenguinEncoderConfig
from penguin_vl.workloads import WORKLOADS, make_inputs

# float16 in the dry run: the interpreter computes bfloat16 tl.dot wrongly and the kernels refuse it there.
DTYPE = pick(torch.bfloat16, torch.float16)
RELEASED = pick(
    PenguinEncoderConfig(),
    PenguinEncoderConfig(
        hidden_size=128, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    ),
)
CASES = [name for name in WORKLOADS if name != "batch64k"]


def _model_flops(workload) -> float:
    c = RELEASED
    forward = workload.encoder_flops(
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        inter=c.intermediate_size,
        patch_dim=c.patch_dim,
    )
    return 3 * forward


@pytest.fixture(scope="module")
def encoders() -> dict[str, PenguinEncoder]:
    """The released encoder with random weights, bf16, in train mode, once per backend (same seed)."""
    return {
        backend: PenguinEncoder.from_config(RELEASED, dtype=DTYPE, device=DEVICE, backend=backend).train()
        for backend in ("triton", "torch")
    }


def _step(model: PenguinEncoder, forward=None):
    """One training step of ``model`` (through ``forward``, e.g. a compiled model, when given)."""
    forward = model if forward is None else forward  # a compiled module has no truth value (len() raises)

    def run(pixel_values, grid_sizes, merge_sizes, grad):
        model.zero_grad(set_to_none=True)
        features = forward(pixel_values, grid_sizes, merge_sizes)
        features.backward(grad)

    return run


@pytest.fixture(scope="module")
def compiled_reference(encoders):
    """The plain-PyTorch encoder under ``torch.compile``, built once for every workload (see test_bench_encoder)."""
    return torch.compile(encoders["torch"], dynamic=True, backend=pick("inductor", "eager"))


@requires_cuda
@pytest.mark.parametrize("name", CASES, ids=str)
def test_encoder_training_step(benchmark, ceilings, encoders, compiled_reference, name):
    workload = dry_run.workload(name)
    inputs = []
    for seed in range(2):
        x = make_inputs(workload, device=DEVICE, dtype=DTYPE, seed=seed)
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        grad = torch.randn(workload.output_tokens, RELEASED.hidden_size, device=DEVICE, dtype=DTYPE, generator=gen)
        inputs.append((x.pixel_values, x.grid_sizes.cpu(), x.merge_sizes.cpu(), grad))
    steps = {
        "triton": _step(encoders["triton"]),
        "torch_eager": _step(encoders["torch"]),
        "torch_compile": _step(encoders["torch"], compiled_reference),
    }
    result = gpu_bench(
        benchmark,
        steps["triton"],
        inputs,
        ceilings=ceilings,
        flops=_model_flops(workload),
        baselines={label: fn for label, fn in steps.items() if label != "triton"},
        warmup=2,
        info={"workload": workload.describe(), "layers": RELEASED.num_hidden_layers},
    )
    if result is not None:
        benchmark.extra_info["tokens_per_s"] = workload.tokens / result.seconds
        benchmark.extra_info["mfu_pct"] = result.info.get("pct_peak_tflops")
        for label, fn in steps.items():
            benchmark.extra_info[f"peak_mem_mib_{label}"] = peak_bytes(fn, inputs[0]) / 2**20
