"""Run one kernel (or the whole encoder) at a chosen shape, ready for Nsight, and report its roofline.

    python -m bench.profile attention --workload image_mix
    python -m bench.profile linear --tokens 65536 --n 4096 --k 1024
    python -m bench.profile encoder --workload video --impl torch
    ncu --nvtx --nvtx-include "penguin.attention/" --set full -o attn \\
        python -m bench.profile attention --iters 1
    nsys profile --capture-range=cudaProfilerApi -o enc python -m bench.profile encoder

Inputs are built and the target is warmed up (JIT compilation, autotuning) before the measured
region, which is bracketed by ``cudaProfilerStart/Stop`` and where every call sits in an NVTX range
``penguin.<target>``. Ceilings (bf16 matmul TFLOP/s and copy GB/s) are measured first, outside that
region. The report gives the median CUDA-event time, achieved TFLOP/s and GB/s with their share of
the ceilings, and the roofline bound ``max(flops / peak, bytes / bandwidth)``.

FLOP and byte counts are the algorithmic minimum of one call: matmul FLOPs only, every input read
once and every output written once (intermediates that a fused kernel never stores are not counted).
Shapes come from the SPEC section 7 workloads (``--workload``) or from ``--tokens``/``--seqlen``
(equal segments); model dims default to the released encoder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bench.timing import L2Flusher, environment, measure_ceilings
from penguin_kernels.device import DTYPES
from penguin_vl import workloads

__all__ = ["TARGETS", "build", "main", "parser", "workload"]

TARGETS = (
    "rope",
    "attention",
    "linear",
    "gate_up_swiglu",
    "swiglu_mlp",
    "projector_mlp",
    "rms_norm_residual",
    "encoder",
)


@dataclass(frozen=True)
class Problem:
    """A ready-to-call target: ``run()`` launches one call on prebuilt inputs."""

    run: Callable[[], object]
    flops: float | None
    bytes: float | None
    shape: str


def workload(args: argparse.Namespace) -> workloads.Workload:
    """The SPEC section 7 workload named by ``--workload``, or the uniform one ``--tokens``/``--seqlen`` give."""

    if args.tokens is not None or args.seqlen is not None:
        tokens = args.tokens or args.seqlen
        return workloads.uniform(args.seqlen or tokens, tokens)
    return workloads.get(args.workload)


def build(args: argparse.Namespace, device: str = "cuda") -> Problem:
    """Inputs and the call for ``args.target``; ``device="cpu"`` serves tests of the shapes and formulas."""
    import penguin_kernels as pk
    from penguin_kernels import reference

    triton = args.impl == "triton"
    dtype = DTYPES[args.dtype]
    e = torch.finfo(dtype).bits // 8
    wl = workload(args)
    D, H, KV, hd, inter = args.hidden, args.heads, args.kv_heads, args.head_dim, args.inter
    n = wl.tokens
    where = wl.describe()

    def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    if args.target == "rope":
        q = randn(n, H, hd, dtype=dtype)
        k = randn(n, KV, hd, dtype=dtype)
        qw, kw = randn(hd, dtype=dtype, scale=0.1).add_(1), randn(hd, dtype=dtype, scale=0.1).add_(1)
        grids = torch.tensor(wl.grid_sizes, device=device)
        merges = torch.tensor(wl.merge_sizes, device=device)
        positions, _ = (pk.rope_positions if triton else reference.rope_positions)(grids, merges)
        fn = pk.qk_norm_rope_2d if triton else reference.qk_norm_rope_2d
        run = lambda: fn(q, k, qw, kw, positions, theta=args.theta, eps=1e-6)
        moved = 2 * n * (H + KV) * hd * e + positions.numel() * 4 + 2 * hd * e
        return Problem(run, None, moved, f"q [{n}, {H}, {hd}], k [{n}, {KV}, {hd}] {args.dtype}; {where}")

    if args.target == "attention":
        q = randn(n, H, hd, dtype=dtype)
        k = randn(n, KV, hd, dtype=dtype)
        v = randn(n, KV, hd, dtype=dtype)
        cu = wl.cu_seqlens(device)
        if triton:
            max_seqlen = wl.max_seqlen
            run = lambda: pk.varlen_attention(q, k, v, cu, max_seqlen)
        else:
            run = lambda: reference.varlen_attention(q, k, v, cu)
        moved = (2 * n * H * hd + 2 * n * KV * hd) * e + cu.numel() * 4
        shape = f"q [{n}, {H}, {hd}], kv [{n}, {KV}, {hd}] {args.dtype}, {wl.frames} segments; {where}"
        return Problem(run, wl.attention_flops(H, hd), moved, shape)

    if args.target in ("linear", "gate_up_swiglu", "swiglu_mlp", "rms_norm_residual"):
        m = n if args.m is None else args.m
        k_dim = args.k or D
        x = randn(m, k_dim, dtype=dtype)
        if args.target == "linear":
            n_out = args.n or (H + 2 * KV) * hd
            w = randn(n_out, k_dim, dtype=dtype, scale=k_dim**-0.5)
            run = (lambda: pk.linear(x, w)) if triton else (lambda: reference.linear(x, w))
            moved = (m * k_dim + n_out * k_dim + m * n_out) * e
            return Problem(run, 2 * m * n_out * k_dim, moved, f"x [{m}, {k_dim}] @ w [{n_out}, {k_dim}]^T {args.dtype}")
        if args.target == "gate_up_swiglu":
            i = args.n or inter
            w = randn(2 * i, k_dim, dtype=dtype, scale=k_dim**-0.5)
            run = (lambda: pk.gate_up_swiglu(x, w)) if triton else (lambda: reference.swiglu(reference.linear(x, w)))
            moved = (m * k_dim + 2 * i * k_dim + m * i) * e
            return Problem(run, 2 * m * 2 * i * k_dim, moved, f"x [{m}, {k_dim}], w_gate_up [{2 * i}, {k_dim}]")
        if args.target == "swiglu_mlp":
            i = args.n or inter
            w_gu = randn(2 * i, k_dim, dtype=dtype, scale=k_dim**-0.5)
            w_d = randn(k_dim, i, dtype=dtype, scale=i**-0.5)
            res = randn(m, k_dim, dtype=dtype)
            fn = pk.swiglu_mlp if triton else reference.swiglu_mlp
            run = lambda: fn(x, w_gu, w_d, res)
            moved = (3 * m * k_dim + 3 * i * k_dim) * e
            flops = 2 * m * 2 * i * k_dim + 2 * m * i * k_dim
            return Problem(run, flops, moved, f"x [{m}, {k_dim}], inter {i}, + residual {args.dtype}")
        res = randn(m, k_dim, dtype=dtype)
        w = randn(k_dim, dtype=dtype, scale=0.1).add_(1)
        fn = pk.rms_norm_residual if triton else reference.rms_norm_residual
        run = lambda: fn(x, res, w, 1e-6)
        return Problem(run, None, (4 * m * k_dim + k_dim) * e, f"x, residual [{m}, {k_dim}] {args.dtype}")

    if args.target == "projector_mlp":
        m = wl.output_tokens if args.m is None else args.m
        out = args.llm_hidden
        x = randn(m, D, dtype=dtype)
        w1, b1 = randn(out, D, dtype=dtype, scale=D**-0.5), randn(out, dtype=dtype, scale=0.02)
        w2, b2 = randn(out, out, dtype=dtype, scale=out**-0.5), randn(out, dtype=dtype, scale=0.02)
        fn = pk.projector_mlp if triton else reference.projector_mlp
        run = lambda: fn(x, w1, b1, w2, b2)
        moved = (m * D + out * D + out * out + 2 * out + m * out) * e
        flops = 2 * m * D * out + 2 * m * out * out
        return Problem(run, flops, moved, f"x [{m}, {D}] -> {out} -> {out} {args.dtype}")

    from penguin_vl import PenguinEncoder, PenguinEncoderConfig
    from penguin_vl.workloads import make_inputs

    config = PenguinEncoderConfig(
        hidden_size=D,
        intermediate_size=inter,
        num_hidden_layers=args.layers,
        num_attention_heads=H,
        num_key_value_heads=KV,
        head_dim=hd,
        rope_theta=args.theta,
    )
    # inference: the encoder records the autograd graph for weights that require grad
    model = PenguinEncoder.from_config(config, dtype=dtype, device=device, backend=args.impl).requires_grad_(False)
    inputs = make_inputs(wl, patch_dim=config.patch_dim, device=device, dtype=dtype)
    run = lambda: model(inputs.pixel_values, inputs.grid_sizes, inputs.merge_sizes)
    flops = wl.encoder_flops(args.layers, D, H, KV, hd, inter, config.patch_dim)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moved = weights + inputs.pixel_values.numel() * e + wl.output_tokens * D * e
    return Problem(run, flops, moved, f"{args.layers} layers, {args.dtype}; {where}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description="Run one kernel or the encoder under NVTX ranges (for ncu / nsys) and report its roofline.",
    )
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--impl", choices=("triton", "torch"), default="triton", help="torch: the plain-PyTorch reference")
    p.add_argument("--workload", default="image_mix", help="SPEC section 7 workload (default: image_mix)")
    p.add_argument("--tokens", type=int, help="total tokens of a uniform workload (overrides --workload)")
    p.add_argument("--seqlen", type=int, help="segment length of a uniform workload (default: --tokens)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--m", type=int, help="rows for linear / MLP / norm targets (default: workload tokens)")
    p.add_argument("--n", type=int, help="linear: output features (default: fused QKV); MLPs: intermediate size")
    p.add_argument("--k", type=int, help="linear / MLP / norm: input features (default: --hidden)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--inter", type=int, default=3072)
    p.add_argument("--llm-hidden", type=int, default=2048, help="projector width (2048: Penguin-VL-2B)")
    p.add_argument("--layers", type=int, default=28, help="encoder layers")
    p.add_argument("--theta", type=float, default=1e6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="profiled calls (1 is enough under ncu)")
    p.add_argument("--flush-l2", action="store_true", help="flush L2 before each call (outside the NVTX range)")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the roofline ceilings")
    return p


def _rate(value: float | None, peak: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:8.1f} {unit}" + (f" ({100 * value / peak:5.1f}% of {peak:.0f})" if peak else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench.profile needs a CUDA GPU (none is visible to torch). On a CPU machine, "
            "`python -m bench.inspect --arch 90` compiles the kernels and reports registers, "
            "shared memory, spills and tensor-core instructions.",
            file=sys.stderr,
        )
        return 2
    env = environment()
    ceilings = None if args.no_ceilings else measure_ceilings()
    with torch.inference_mode():
        problem = build(args)
        torch.cuda.nvtx.range_push("penguin.warmup")
        for _ in range(max(args.warmup, 1)):
            problem.run()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()

        flush = L2Flusher(torch.device("cuda")) if args.flush_l2 else None
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.iters)
        ]
        torch.cuda.profiler.start()
        for start, end in events:
            if flush is not None:
                flush()
            torch.cuda.nvtx.range_push(f"penguin.{args.target}")
            start.record()
            problem.run()
            end.record()
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()

    seconds = statistics.median(s.elapsed_time(e) for s, e in events) / 1e3
    tflops = problem.flops / seconds / 1e12 if problem.flops else None
    gbps = problem.bytes / seconds / 1e9 if problem.bytes else None
    peak_t = ceilings.matmul_tflops if ceilings else None
    peak_b = ceilings.copy_gbps if ceilings else None
    print(f"{args.target} [{args.impl}] on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    print(f"  shape      {problem.shape}")
    print(f"  time       {seconds * 1e3:.4f} ms (median of {args.iters}, CUDA events)")
    print(f"  compute    {_rate(tflops, peak_t, 'TFLOP/s')}")
    print(f"  memory     {_rate(gbps, peak_b, 'GB/s')}")
    if ceilings:
        t_compute = (problem.flops or 0) / (ceilings.matmul_tflops * 1e12)
        t_memory = (problem.bytes or 0) / (ceilings.copy_gbps * 1e9)
        bound = max(t_compute, t_memory)
        limiter = "compute" if t_compute >= t_memory else "memory"
        print(f"  roofline   {bound * 1e3:.4f} ms ({limiter}-bound): {100 * bound / seconds:.1f}% of the roofline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
