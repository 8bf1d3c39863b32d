"""The benchmark harness: derived metrics, input rotation, baselines, and GPU timing where there is a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from bench.harness import Ceilings, cpu_bench, cuda_times, gpu_bench, measure_ceilings, record
from tests.utils import HAS_CUDA, requires_cuda


class FakeBenchmark:
    """The parts of pytest-benchmark's fixture the harness uses; ``pedantic`` runs setup + target per round."""

    def __init__(self, disabled: bool = False) -> None:
        self.extra_info: dict = {}
        self.disabled = disabled
        self.rounds = 0

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        result = None
        for _ in range(warmup_rounds + rounds):
            call_args, call_kwargs = setup() if setup else (args, kwargs or {})
            result = target(*call_args, **call_kwargs)
        self.rounds += rounds
        return result


CEIL = Ceilings(device="test", matmul_tflops=500.0, copy_gbps=2000.0, matmul_shape=8192, copy_bytes=1 << 30)


def test_record_derives_throughput_roofline_and_speedups():
    b = FakeBenchmark()
    out = record(b, seconds=2e-3, flops=1e12, bytes=2e9, ceilings=CEIL, baselines={"torch": 5e-3}, info={"w": "x"})
    assert b.extra_info == out
    assert math.isclose(out["tflops"], 500.0) and math.isclose(out["pct_peak_tflops"], 100.0)
    assert math.isclose(out["gbps"], 1000.0) and math.isclose(out["pct_peak_gbps"], 50.0)
    # Bound = max(1e12 / 500e12, 2e9 / 2000e9) = 2 ms, which is the measured time.
    assert math.isclose(out["roofline_ms"], 2.0) and math.isclose(out["pct_roofline"], 100.0)
    assert math.isclose(out["speedup_vs_torch"], 2.5) and math.isclose(out["baseline_torch_ms"], 5.0)
    assert out["w"] == "x" and "torch" in out and "device" in out


def test_record_without_counts_keeps_only_time():
    out = record(FakeBenchmark(), seconds=1e-3)
    assert math.isclose(out["time_ms"], 1.0)
    assert not {"tflops", "gbps", "pct_roofline"} & out.keys()


def test_cpu_bench_rotates_inputs_and_times_baselines():
    calls: list[int] = []
    base_calls: list[int] = []
    b = FakeBenchmark()
    result = cpu_bench(
        b,
        lambda i: calls.append(i),
        [(0,), (1,), (2,)],
        flops=10.0,
        baselines={"slow": lambda i: base_calls.append(i)},
        rounds=6,
        warmup=1,
    )
    assert b.rounds == 6
    # One warm-up call, then six timed rounds cycling through the three input sets.
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    assert base_calls == [0, 0, 1, 2, 0, 1, 2]
    assert result.info["rounds"] == 6 and result.info["timer"] == "perf_counter"
    assert result.seconds > 0 and "speedup_vs_slow" in b.extra_info and "tflops" in b.extra_info
    info = b.extra_info
    assert math.isclose(info["speedup_vs_slow_best"], info["baseline_slow_ms_min"] / info["time_ms_min"])


def test_disabled_benchmark_runs_once_untimed():
    calls = []
    assert cpu_bench(FakeBenchmark(disabled=True), lambda: calls.append(1), [()]) is None
    assert calls == [1]


@pytest.mark.parametrize("inputs", [(1, 2), [], [1, 2]], ids=["tuple", "empty", "not-tuples"])
def test_inputs_must_be_a_list_of_argument_tuples(inputs):
    with pytest.raises(TypeError, match="list of argument tuples"):
        cpu_bench(FakeBenchmark(), lambda *a: None, inputs)


@pytest.mark.skipif(HAS_CUDA, reason="checks the skip raised where no GPU is visible")
def test_gpu_bench_skips_without_cuda():
    with pytest.raises(pytest.skip.Exception, match="CUDA"):
        gpu_bench(FakeBenchmark(), lambda: None, [()], ceilings=CEIL)


@pytest.mark.gpu
@requires_cuda
def test_gpu_timing_and_ceilings_on_device():
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    times = cuda_times(torch.matmul, [(a, a)], rounds=7, warmup=2)
    assert len(times) == 7 and all(t > 0 for t in times)
    ceil = measure_ceilings(matmul_n=4096, copy_bytes=256 << 20, rounds=5)
    assert ceil.matmul_tflops > 0 and ceil.copy_gbps > 0
    b = FakeBenchmark()
    result = gpu_bench(b, torch.matmul, [(a, a)], ceilings=ceil, flops=2 * 2048**3, baselines={"same": torch.matmul})
    assert result.info["timer"] == "cuda_events" and result.info["l2_flushed"]
    assert b.rounds == result.info["rounds"] >= 5
    assert {"tflops", "pct_peak_tflops", "speedup_vs_same", "device"} <= b.extra_info.keys()
