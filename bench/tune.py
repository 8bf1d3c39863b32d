"""Sweep the launch configurations of a kernel on this GPU and rank them against the shipped one.

    PYTHONPATH=. python -m bench.tune attention --workload image_mix --head-dim 128
    PYTHONPATH=. python -m bench.tune attention --workload video --head-dim 64 --sweep full
    PYTHONPATH=. python -m bench.tune linear --m 16384 --n 4096 --k 1024 --out /tmp/linear.json
    PYTHONPATH=. python -m bench.tune gate_up_swiglu --m 65536

Each candidate is passed to the kernel's public function as its ``config=``; the shipped choice is
what ``penguin_kernels.attention.select_config`` or ``penguin_kernels.gemm.select_tile`` returns. Its
output is checked against the shipped configuration's output on the same inputs (relative Frobenius
error below ``--tol``: other tile shapes change the summation order, nothing else), then it is timed
with CUDA events, L2 flushed before each call. A candidate that does not compile (shared memory,
registers) or gives a wrong answer is listed with the reason, never ranked. The table is sorted by
median time; the ``speedup`` column is the shipped configuration's median over the candidate's,
measured in the same run.

Nothing is changed in the package: a better configuration is adopted by editing ``_CONFIGS`` in
``attention.py`` or ``_TILES`` in ``gemm.py``, then re-running ``python -m bench.inspect``
(spills, shared memory) and the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import penguin_kernels as pk
from bench.harness import cpu_times
from bench.profile import workload
from bench.timing import cuda_times
from penguin_kernels.attention import AttentionConfig, select_config
from penguin_kernels.device import DTYPES, device_info, interpreter_active
from penguin_kernels.gemm import Tile, select_tile

TARGETS = ("attention", "linear", "gate_up_swiglu")


@dataclass
class Problem:
    """One kernel call on fixed inputs: ``run(config)`` launches it with ``config`` in place of the shipped choice."""

    target: str
    shape: str
    flops: float
    shipped: Any
    candidates: list[Any]
    run: Callable[[Any], torch.Tensor]


@dataclass
class Trial:
    config: dict[str, Any]
    shipped: bool
    status: str  # ok | wrong | failed
    seconds: float | None = None
    tflops: float | None = None
    speedup: float | None = None
    error: str = ""


def attention_candidates(sweep: str) -> list[Any]:
    """Tile shapes, warps and pipeline depths around the shipped ones (``quick``) or a wider grid (``full``)."""
    if sweep == "quick":
        grid = itertools.product((64, 128), (64, 128), (4, 8), (2, 3))
    else:
        grid = itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4))
    return [
        AttentionConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=s, max_pack=8 if bm == 128 else 4)
        for bm, bn, w, s in grid
    ]


def gemm_candidates(sweep: str, swiglu: bool) -> list[Any]:
    bns = (64, 128) if swiglu else (64, 128, 256)
    stages = (3, 4) if sweep == "quick" else (2, 3, 4, 5)
    bks = (64,) if sweep == "quick" else (32, 64)
    return [
        Tile(bm, bn, bk, w, s, split_epilogue=bn == 256)
        for bm, bn, bk, w, s in itertools.product((64, 128), bns, bks, (4, 8), stages)
    ]


def _randn(*shape: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def attention_problem(args: argparse.Namespace, device: str) -> Problem:
    dtype = DTYPES[args.dtype]
    wl = workload(args)
    n, h, kv, hd = wl.tokens, args.heads, args.kv_heads, args.head_dim
    q = _randn(n, h, hd, dtype=dtype, device=device)
    k = _randn(n, kv, hd, dtype=dtype, device=device)
    v = _randn(n, kv, hd, dtype=dtype, device=device)
    cu = wl.cu_seqlens(device)
    max_seqlen = wl.max_seqlen
    shipped = select_config(device_info(q.device), dtype, hd, max_seqlen)

    def run(config: Any) -> torch.Tensor:
        return pk.varlen_attention(q, k, v, cu, max_seqlen, config=config)

    shape = f"q [{n}, {h}, {hd}], kv [{n}, {kv}, {hd}] {args.dtype}, {wl.frames} segments; {wl.describe()}"
    return Problem("attention", shape, wl.attention_flops(h, hd), shipped, attention_candidates(args.sweep), run)


def gemm_problem(args: argparse.Namespace, device: str) -> Problem:
    dtype = DTYPES[args.dtype]
    swiglu = args.target == "gate_up_swiglu"
    m = args.m
    k = args.k or args.hidden
    n = args.n or (args.inter if swiglu else args.hidden)
    x = _randn(m, k, dtype=dtype, device=device)
    w = _randn(2 * n if swiglu else n, k, dtype=dtype, device=device, scale=k**-0.5)
    b = None if swiglu else _randn(n, dtype=dtype, device=device, scale=0.02)
    shipped = select_tile(device_info(x.device), dtype, m, n, k, swiglu)

    def run(config: Any) -> torch.Tensor:
        return pk.gate_up_swiglu(x, w, config=config) if swiglu else pk.linear(x, w, b, config=config)

    flops = 2.0 * m * k * (2 * n if swiglu else n)
    shape = f"x [{m}, {k}] @ w [{2 * n if swiglu else n}, {k}]^T {args.dtype}" + (", SwiGLU" if swiglu else ", bias")
    return Problem(args.target, shape, flops, shipped, gemm_candidates(args.sweep, swiglu), run)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def _describe(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {"config": config}


def sweep(problem: Problem, *, tol: float, rounds: int | None, on_cuda: bool) -> list[Trial]:
    """Check and time the shipped configuration and every candidate; ranked trials, failures last."""
    if on_cuda:
        timer = lambda fn: cuda_times(lambda: fn(), [()], rounds=rounds)
    else:
        timer = lambda fn: cpu_times(lambda: fn(), [()], rounds=rounds, warmup=1)
    expected = problem.run(problem.shipped)
    configs = [problem.shipped, *(c for c in problem.candidates if c != problem.shipped)]
    trials = []
    for config in configs:
        trial = Trial(_describe(config), shipped=config == problem.shipped, status="ok")
        try:
            err = _rel_err(problem.run(config), expected)
            if not err <= tol:
                trial.status, trial.error = "wrong", f"relative error {err:.2e} > {tol:.0e}"
            else:
                trial.seconds = statistics.median(timer(lambda c=config: problem.run(c)))
                trial.tflops = problem.flops / trial.seconds / 1e12
        except Exception as e:  # noqa: BLE001 (a configuration that does not compile is a result, not a crash)
            trial.status, trial.error = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        trials.append(trial)
    base = trials[0].seconds
    for trial in trials:
        if trial.seconds and base:
            trial.speedup = base / trial.seconds
    return sorted(trials, key=lambda t: (t.seconds is None, t.seconds or 0.0))


def table(problem: Problem, trials: Sequence[Trial]) -> str:
    keys = list(trials[0].config)
    head = [*keys, "ms", "TFLOP/s", "speedup", "status"]
    rows = [head]
    for t in trials:
        cells = [str(t.config[k]) for k in keys]
        cells += [
            f"{t.seconds * 1e3:.4f}" if t.seconds else "-",
            f"{t.tflops:.1f}" if t.tflops else "-",
            f"{t.speedup:.3f}" if t.speedup else "-",
            ("shipped " if t.shipped else "") + (t.status if t.status == "ok" else f"{t.status}: {t.error}"),
        ]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = [f"{problem.target}: {problem.shape}"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.splitlines()[0])
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--sweep", choices=("quick", "full"), default="quick")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--workload", default="image_mix", help="attention: SPEC section 7 workload")
    p.add_argument("--tokens", type=int, help="attention: total tokens of a uniform workload (overrides --workload)")
    p.add_argument("--seqlen", type=int, help="attention: segment length of a uniform workload")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--m", type=int, default=16384, help="GEMM rows (tokens)")
    p.add_argument("--n", type=int, help="GEMM output features (gate_up_swiglu: per half; default hidden / inter)")
    p.add_argument("--k", type=int, help="GEMM input features (default: --hidden)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=3072)
    p.add_argument("--tol", type=float, help="largest relative error against the shipped config (default per dtype)")
    p.add_argument("--rounds", type=int, help="timed calls per config (default: about 0.5 s of calls)")
    p.add_argument("--out", type=Path, help="also write the trials as JSON")
    return p


# bf16 / fp16: one rounding of the output (2^-8, 2^-11) plus a changed float32 summation order.
_TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-5}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not interpreter_active():
        print(
            "bench.tune times kernels on a CUDA GPU (none is visible to torch); with TRITON_INTERPRET=1 it runs "
            "in Triton's CPU interpreter, which checks configurations but says nothing about their speed.",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if on_cuda else "cpu"
    with torch.inference_mode():
        problem = (attention_problem if args.target == "attention" else gemm_problem)(args, device)
        trials = sweep(problem, tol=args.tol or _TOL[args.dtype], rounds=args.rounds, on_cuda=on_cuda)
    print(table(problem, trials))
    if args.out is not None:
        record = {"target": problem.target, "shape": problem.shape, "flops": problem.flops}
        record["trials"] = [dataclasses.asdict(t) for t in trials]
        args.out.write_text(json.dumps(record, indent=1))
    return 0 if trials and trials[0].status == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
