"""The GPU suite's dry run: the benchmarks' GPU code on the CPU, at tiny shapes, before a GPU is lent.

``PENGUIN_DRY_RUN=1`` (set by ``python -m bench.gpu_suite --dry-run``) makes :data:`DEVICE` the CPU
and :func:`pick` return the tiny variant of each shape, so every GPU benchmark runs its Triton
kernels in the interpreter. :func:`install` fakes what the CPU lacks: CUDA events (timed with
``time.perf_counter``), synchronisation, device properties and the memory counters. Tensors are
never faked: they live on the CPU, where the kernels really run; ``torch.cuda.is_available()``
stays false (``torch.compile`` would otherwise reach for the CUDA generator), so the benchmark
tooling asks ``torch.cuda.is_available() or ACTIVE``.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from penguin_vl.workloads import Workload

__all__ = ["ACTIVE", "DEVICE", "FAKE_PROPERTIES", "install", "pick", "workload"]

ACTIVE = os.environ.get("PENGUIN_DRY_RUN") == "1"
DEVICE = "cpu" if ACTIVE else "cuda"

# An H100 SXM as the benchmarks and the launchers query it; the name says it is not one.
FAKE_PROPERTIES = SimpleNamespace(
    name="dry run (CPU, H100 properties)",
    major=9,
    minor=0,
    multi_processor_count=132,
    L2_cache_size=50 << 20,
    total_memory=80 << 30,
)

T = TypeVar("T")


def pick(full: T, tiny: T) -> T:
    """``full`` on a GPU, ``tiny`` in the dry run (the interpreter runs each program in numpy)."""
    return tiny if ACTIVE else full


class _Event:
    """``torch.cuda.Event`` for CPU work: ``record`` reads the clock, the work before it is already done."""

    def __init__(self, enable_timing: bool = False, **_: object) -> None:
        self.t: float | None = None

    def record(self, stream: object = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("elapsed_time: both events must be recorded first")
        return (end.t - self.t) * 1e3


def install() -> None:
    """Fake the CUDA runtime queries the benchmarks make; idempotent."""
    cuda = torch.cuda
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.get_device_properties = lambda device=None: FAKE_PROPERTIES
    cuda.get_device_name = lambda device=None: FAKE_PROPERTIES.name
    cuda.get_device_capability = lambda device=None: (FAKE_PROPERTIES.major, FAKE_PROPERTIES.minor)
    cuda.Event = _Event
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0


def workload(name: str, full: Workload | None = None) -> Workload:
    """The named SPEC workload (or ``full``) on a GPU; two 32-token segments under its name in the dry run."""
    from penguin_vl.workloads import WORKLOADS, uniform

    if ACTIVE:
        return uniform(32, 64, name=name)
    return full if full is not None else WORKLOADS[name]
