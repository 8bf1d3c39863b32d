"""Timing, roofline ceilings and result recording shared by every benchmark in ``bench/``.

Benchmarks are pytest-benchmark tests (``pytest bench --benchmark-only``). A GPU benchmark reads::

    from bench.harness import gpu_bench, requires_cuda

    @requires_cuda
    @pytest.mark.parametrize("name", ["latency", "image_mix"], ids=str)
    def test_attention(benchmark, ceilings, name):
        inputs = [make_args(name, seed=s) for s in range(3)]        # built outside the timed region
        gpu_bench(
            benchmark,
            penguin_kernels.varlen_attention,
            inputs,
            ceilings=ceilings,
            flops=workload.attention_flops(16, 128),
            bytes=q.nbytes + k.nbytes + v.nbytes + out.nbytes,
            baselines={"torch": reference.varlen_attention},
        )

API
---
``requires_cuda``
    skip marker for tests that need a CUDA GPU (with the reason in the skip message).
``ceilings`` (fixture, ``bench/conftest.py``) / :func:`measure_ceilings` (from ``bench.timing``)
    :class:`Ceilings` measured on this GPU once per session: dense bf16 matmul TFLOP/s
    (``8192^3`` ``torch.matmul``) and device-to-device copy GB/s (read + write bytes). Percentages are
    relative to these measured numbers, not to datasheet peaks. ``PENGUIN_CEILINGS=<file.json>``
    reuses ceilings a suite run measured on the same device.
:func:`gpu_bench` ``(benchmark, fn, inputs, *, ceilings, flops, bytes, baselines, ...)``
    times ``fn(*args)`` for ``args`` cycling through ``inputs`` (a list of argument tuples: give
    several fresh sets so one set's residency in L2 does not flatter), with the L2 cache flushed
    before every call (outside the timed region). Each call is bracketed by CUDA events, so the
    recorded time is device time; the warm-up rounds also absorb Triton's JIT and autotuning. The
    project function runs under ``benchmark.pedantic`` (its table shows wall time including launch
    and one synchronisation); every baseline is timed the same way, in the same process, on the same
    inputs. Returns a :class:`BenchResult`.
:func:`cpu_bench`
    the same on the CPU with ``time.perf_counter`` (no flush), for CPU-meaningful benchmarks.
:func:`record`
    the ``extra_info`` writer used by both; call it directly for a measurement timed elsewhere.
:func:`environment`
    device, driver, torch/triton/python versions.

Keys written to ``benchmark.extra_info`` (times in milliseconds, medians over rounds)::

    time_ms, time_ms_min, time_ms_iqr, rounds, timer ("cuda_events" | "perf_counter")
    flops, bytes, tflops, gbps                     when flops / bytes are given
    pct_peak_tflops, pct_peak_gbps                 against the measured ceilings
    roofline_ms, pct_roofline                      max(flops / peak, bytes / bandwidth) / time_ms
    baseline_<name>_ms, speedup_vs_<name>          per baseline: its time / ours
    ceiling_tflops, ceiling_gbps, device, capability, torch, triton, cuda, driver
    plus anything passed as ``info=``

With ``--benchmark-disable`` the function runs once (a smoke test) and nothing is timed.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from bench import dry_run
from bench.timing import (
    Ceilings,
    L2Flusher,
    cuda_times,
    environment,
    load_or_measure_ceilings,
    measure_ceilings,
    rounds_for,
)

__all__ = [
    "BenchResult",
    "Ceilings",
    "cpu_bench",
    "cpu_times",
    "cuda_times",
    "environment",
    "gpu_bench",
    "load_or_measure_ceilings",
    "measure_ceilings",
    "peak_bytes",
    "record",
    "requires_cuda",
]

HAS_CUDA = torch.cuda.is_available() or dry_run.ACTIVE

requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="GPU benchmark: needs a CUDA device (Triton kernels are timed on the GPU only)"
)


@dataclass(frozen=True)
class BenchResult:
    """Median time of the project function and everything written to ``extra_info``."""

    seconds: float
    info: dict[str, Any]


def cpu_times(fn: Callable[..., Any], inputs: Sequence[tuple], *, rounds: int | None, warmup: int) -> list[float]:
    """Wall seconds of each ``fn(*inputs[i % len(inputs)])`` call after ``warmup`` untimed ones."""
    inputs = _check_inputs(inputs)

    def one(args: tuple) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0

    warm = [one(inputs[i % len(inputs)]) for i in range(max(warmup, 1))]
    n = rounds_for(min(warm), rounds)
    return [one(inputs[i % len(inputs)]) for i in range(n)]


def _check_inputs(inputs: Sequence[tuple]) -> Sequence[tuple]:
    if isinstance(inputs, tuple) or not inputs or not all(isinstance(a, tuple) for a in inputs):
        raise TypeError("inputs must be a non-empty list of argument tuples, e.g. [(x, w), (x2, w2)]")
    return inputs


def _summary(times: Sequence[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"time_ms": statistics.median(ms), "time_ms_min": ms[0], "time_ms_iqr": q[2] - q[0]}


def record(
    benchmark: Any,
    *,
    seconds: float,
    flops: float | None = None,
    bytes: float | None = None,
    ceilings: Ceilings | None = None,
    baselines: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write derived throughput, roofline percentages and speedups into ``benchmark.extra_info``.

    ``seconds`` is the project function's median time; ``baselines`` maps a name to a baseline's
    median seconds measured in the same run. Returns the dict that was written.
    """
    out: dict[str, Any] = {"time_ms": seconds * 1e3}
    if flops is not None:
        out["flops"] = float(flops)
        out["tflops"] = flops / seconds / 1e12
    if bytes is not None:
        out["bytes"] = float(bytes)
        out["gbps"] = bytes / seconds / 1e9
    if ceilings is not None:
        out["ceiling_tflops"] = ceilings.matmul_tflops
        out["ceiling_gbps"] = ceilings.copy_gbps
        bound = 0.0
        if flops is not None:
            out["pct_peak_tflops"] = 100 * out["tflops"] / ceilings.matmul_tflops
            bound = max(bound, flops / (ceilings.matmul_tflops * 1e12))
        if bytes is not None:
            out["pct_peak_gbps"] = 100 * out["gbps"] / ceilings.copy_gbps
            bound = max(bound, bytes / (ceilings.copy_gbps * 1e9))
        if bound > 0:
            out["roofline_ms"] = bound * 1e3
            out["pct_roofline"] = 100 * bound / seconds
    for name, base in (baselines or {}).items():
        out[f"baseline_{name}_ms"] = base * 1e3
        out[f"speedup_vs_{name}"] = base / seconds
    env = environment()
    out.update({k: env[k] for k in ("device", "capability", "torch", "triton", "cuda", "driver") if k in env})
    out.update(info or {})
    benchmark.extra_info.update(out)
    return out


def _bench(
    benchmark: Any,
    fn: Callable[..., Any],
    inputs: Sequence[tuple],
    *,
    on_gpu: bool,
    ceilings: Ceilings | None,
    flops: float | None,
    bytes: float | None,
    baselines: Mapping[str, Callable[..., Any]] | None,
    rounds: int | None,
    warmup: int,
    flush_l2: bool,
    info: Mapping[str, Any] | None,
) -> BenchResult | None:
    inputs = _check_inputs(inputs)
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn, args=inputs[0], rounds=1)
        return None
    flush = L2Flusher(torch.device(dry_run.DEVICE)) if on_gpu and flush_l2 else None
    start = torch.cuda.Event(enable_timing=True) if on_gpu else None
    end = torch.cuda.Event(enable_timing=True) if on_gpu else None
    times: list[float] = []
    calls = itertools.count()

    def setup() -> tuple[tuple, dict]:
        i = next(calls)
        if flush is not None:
            flush()
            torch.cuda.synchronize()
        return inputs[i % len(inputs)], {}

    def timed(*args: Any) -> Any:
        if on_gpu:
            start.record()
            result = fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            result = fn(*args)
            times.append(time.perf_counter() - t0)
        return result

    # The warm-up calls compile and autotune; their time only sizes the number of rounds.
    for _ in range(dry_run.pick(max(warmup, 1), 1)):
        timed(*setup()[0])
    n = rounds_for(min(times), rounds)
    times.clear()
    benchmark.pedantic(timed, setup=setup, rounds=n, warmup_rounds=0)

    base_seconds, best = {}, {}
    for name, base in (baselines or {}).items():
        if on_gpu:
            base_times = cuda_times(base, inputs, rounds=rounds, warmup=warmup, flush_l2=flush_l2)
        else:
            base_times = cpu_times(base, inputs, rounds=rounds, warmup=warmup)
        base_seconds[name] = statistics.median(base_times)
        # best against best as well: on a shared machine a slow spell can take a whole side's rounds
        best[f"baseline_{name}_ms_min"] = min(base_times) * 1e3
        best[f"speedup_vs_{name}_best"] = min(base_times) / min(times)

    summary = _summary(times)
    seconds = summary["time_ms"] / 1e3
    extra = {
        **summary,
        "rounds": len(times),
        "timer": ("cuda_events_faked" if dry_run.ACTIVE else "cuda_events") if on_gpu else "perf_counter",
        "l2_flushed": flush is not None,
        "input_sets": len(inputs),
        **best,
        **(info or {}),
    }
    written = record(
        benchmark, seconds=seconds, flops=flops, bytes=bytes, ceilings=ceilings, baselines=base_seconds, info=extra
    )
    return BenchResult(seconds=seconds, info=written)


def gpu_bench(
    benchmark: Any,
    fn: Callable[..., Any],
    inputs: Sequence[tuple],
    *,
    ceilings: Ceilings,
    flops: float | None = None,
    bytes: float | None = None,
    baselines: Mapping[str, Callable[..., Any]] | None = None,
    rounds: int | None = None,
    warmup: int = 3,
    flush_l2: bool = True,
    info: Mapping[str, Any] | None = None,
) -> BenchResult | None:
    """Time ``fn`` (and each baseline) on the GPU with CUDA events and record the results.

    ``inputs``: list of argument tuples, cycled call by call. ``flops``/``bytes``: the work of one
    call, from an explicit formula (the algorithmic minimum: each input read once, each output
    written once). ``baselines``: ``{name: callable}`` taking the same arguments. Returns ``None``
    under ``--benchmark-disable``.
    """
    if not HAS_CUDA:
        pytest.skip("GPU benchmark: needs a CUDA device")
    return _bench(
        benchmark,
        fn,
        inputs,
        on_gpu=True,
        ceilings=ceilings,
        flops=flops,
        bytes=bytes,
        baselines=baselines,
        rounds=rounds,
        warmup=warmup,
        flush_l2=flush_l2,
        info=info,
    )


def cpu_bench(
    benchmark: Any,
    fn: Callable[..., Any],
    inputs: Sequence[tuple],
    *,
    flops: float | None = None,
    bytes: float | None = None,
    baselines: Mapping[str, Callable[..., Any]] | None = None,
    rounds: int | None = None,
    warmup: int = 1,
    info: Mapping[str, Any] | None = None,
) -> BenchResult | None:
    """:func:`gpu_bench` for CPU code, timed with ``time.perf_counter``; no ceilings."""
    return _bench(
        benchmark,
        fn,
        inputs,
        on_gpu=False,
        ceilings=None,
        flops=flops,
        bytes=bytes,
        baselines=baselines,
        rounds=rounds,
        warmup=warmup,
        flush_l2=False,
        info=info,
    )


def peak_bytes(fn: Callable[..., Any], args: tuple) -> int:
    """Peak device memory one call of ``fn(*args)`` allocates beyond what is already held (weights, inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
