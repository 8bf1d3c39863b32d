"""GPU timing and measured roofline ceilings, for the benchmarks, ``bench.profile`` and ``bench.tune``.

Times are device times from CUDA events around each call, with the L2 cache optionally flushed
before every call outside the timed region. Ceilings are measured, not read from a datasheet: dense
bf16 ``torch.matmul`` TFLOP/s and device-to-device copy GB/s on the GPU at hand.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "Ceilings",
    "L2Flusher",
    "cuda_times",
    "environment",
    "load_or_measure_ceilings",
    "measure_ceilings",
    "rounds_for",
]

# Time budget per timed callable: enough rounds for a stable median without slowing a suite.
_BUDGET_S = 0.5
_MIN_ROUNDS = 5
_MAX_ROUNDS = 200


@dataclass(frozen=True)
class Ceilings:
    """Attainable peaks measured on one device: the roofline that percentages refer to."""

    device: str
    matmul_tflops: float
    copy_gbps: float
    matmul_shape: int
    copy_bytes: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Ceilings:
        return cls(**json.loads(text))


def environment() -> dict[str, Any]:
    """Versions and the device, recorded with every result so numbers stay attributable."""
    return dict(_environment())


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["device"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        env["cuda"] = torch.version.cuda
        env["driver"] = _driver_version()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        env["threads"] = torch.get_num_threads()
    return env


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


class L2Flusher:
    """Overwrites a buffer several times the L2 size so no operand stays cached between calls."""

    def __init__(self, device: torch.device) -> None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
        self.buffer = torch.empty(max(4 * l2, 256 << 20), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def rounds_for(seconds_per_call: float, rounds: int | None) -> int:
    """``rounds`` if given, else as many calls as fit in about 0.5 s, clamped to 5 .. 200."""
    if rounds is not None:
        return rounds
    return int(min(_MAX_ROUNDS, max(_MIN_ROUNDS, _BUDGET_S / max(seconds_per_call, 1e-7))))


def cuda_times(
    fn: Callable[..., Any],
    inputs: Sequence[tuple],
    *,
    rounds: int | None = None,
    warmup: int = 3,
    flush_l2: bool = True,
) -> list[float]:
    """Device seconds of each ``fn(*inputs[i % len(inputs)])`` call, measured with CUDA events.

    The flush and the choice of inputs happen before the start event; warm-up calls are not timed.
    ``rounds=None`` picks a count from the warm-up time (``5 .. 200`` calls, about 0.5 s).
    """
    if not inputs:
        raise ValueError("cuda_times: inputs must hold at least one argument tuple")
    flush = L2Flusher(torch.device("cuda")) if flush_l2 else None
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def one(args: tuple) -> float:
        if flush is not None:
            flush()
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    warm = [one(inputs[i % len(inputs)]) for i in range(max(warmup, 1))]
    n = rounds_for(min(warm), rounds)
    return [one(inputs[i % len(inputs)]) for i in range(n)]


def measure_ceilings(*, matmul_n: int = 8192, copy_bytes: int = 1 << 30, rounds: int = 20) -> Ceilings:
    """Measure dense bf16 matmul TFLOP/s and device-to-device copy GB/s on the current GPU.

    Matmul: ``2 n^3`` FLOPs of ``torch.matmul`` on ``[n, n]`` bf16 operands (cuBLAS's best, which is
    what a Triton GEMM should be compared to). Copy: ``dst.copy_(src)`` of ``copy_bytes``, counting
    the read and the write (``2 * copy_bytes``). Medians of ``rounds`` timed calls.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("measure_ceilings needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.bfloat16, generator=gen)
    c = torch.empty_like(a)
    mm = statistics.median(
        cuda_times(lambda x, y, z: torch.matmul(x, y, out=z), [(a, b, c)], rounds=rounds, warmup=5, flush_l2=False)
    )
    del a, b, c
    src = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda").random_(generator=gen)
    dst = torch.empty_like(src)
    cp = statistics.median(cuda_times(lambda s, d: d.copy_(s), [(src, dst)], rounds=rounds, warmup=5, flush_l2=False))
    del src, dst
    torch.cuda.empty_cache()
    return Ceilings(
        device=torch.cuda.get_device_name(),
        matmul_tflops=2 * matmul_n**3 / mm / 1e12,
        copy_gbps=2 * copy_bytes / cp / 1e9,
        matmul_shape=matmul_n,
        copy_bytes=copy_bytes,
    )


def load_or_measure_ceilings() -> Ceilings:
    """Ceilings from ``$PENGUIN_CEILINGS`` when it names a file measured on this device, else measured now."""
    path = os.environ.get("PENGUIN_CEILINGS")
    if path and os.path.exists(path):
        with open(path) as f:
            cached = Ceilings.from_json(f.read())
        if cached.device == torch.cuda.get_device_name():
            return cached
    return measure_ceilings()
