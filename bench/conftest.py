"""Fixtures for the benchmark suites: the measured roofline ``ceilings`` of this GPU."""

from __future__ import annotations

import pytest

from bench.harness import HAS_CUDA, Ceilings, load_or_measure_ceilings


@pytest.fixture(scope="session")
def ceilings() -> Ceilings:
    """bf16 matmul TFLOP/s and copy GB/s measured once per session (see ``bench.harness``)."""
    if not HAS_CUDA:
        pytest.skip("GPU benchmark: needs a CUDA device to measure the roofline ceilings")
    return load_or_measure_ceilings()
