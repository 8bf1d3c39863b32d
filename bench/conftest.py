"""Fixtures for the benchmark suites: the measured roofline ``ceilings`` of this GPU.

Every GPU benchmark takes ``ceilings``; those benchmarks are marked ``gpu`` here, so the GPU suite
selects them (``-m gpu``) from any ``bench/test_bench_*.py`` without a marker in each file.
"""

from __future__ import annotations

import pytest

from bench.harness import HAS_CUDA, Ceilings, load_or_measure_ceilings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "ceilings" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def ceilings() -> Ceilings:
    """bf16 matmul TFLOP/s and copy GB/s measured once per session (see ``bench.harness``)."""
    if not HAS_CUDA:
        pytest.skip("GPU benchmark: needs a CUDA device to measure the roofline ceilings")
    return load_or_measure_ceilings()
