"""Host time: the per-signature caches of the ops, and ``bench.host_time``'s stubbed launches."""

from __future__ import annotations

import pytest
import torch

import penguin_kernels as pk
from bench import host_time
from penguin_kernels import norm
from penguin_kernels._checks import ShapeCache
from tests.utils import HAS_CUDA, INTERPRETER

requires_interpreter = pytest.mark.skipif(
    HAS_CUDA or not INTERPRETER, reason="host time is measured on the CPU with the interpreter's kernels stubbed"
)


def test_cache_builds_once_per_key_and_never_keeps_errors():
    calls = []

    def build(value):
        calls.append(value)
        if value < 0:
            raise ValueError("negative")
        return value * 2

    cache = ShapeCache(build)
    assert cache.get(("a",), 3) == 6 and cache.get(("a",), 99) == 6
    assert calls == [3]
    for _ in range(2):
        with pytest.raises(ValueError, match="negative"):
            cache.get(("b",), -1)
    assert calls == [3, -1, -1]


def test_cache_runs_the_builder_for_unhashable_keys():
    """Symbolic shapes (while torch.compile traces) make the key unhashable: nothing is cached."""
    cache = ShapeCache(lambda v: v + 1)
    assert cache.get(([1],), 1) == 2 and cache.get(([1],), 5) == 6


@requires_interpreter
def test_bad_input_still_raises_after_a_good_call_of_the_same_signature():
    x, w = torch.randn(4, 8), torch.randn(8)
    pk.rms_norm(x, w, 1e-6)
    with pytest.raises(ValueError, match="weight has shape"):
        pk.rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pk.rms_norm(x.tolist(), w, 1e-6)
    assert norm._plan(x, None, w, None) is norm._plan(x.clone(), None, w.clone(), None)


@requires_interpreter
def test_stubbed_launches_count_every_launch_and_restore_triton():
    calls = host_time.op_calls()
    with torch.inference_mode(), host_time.stubbed_launches() as launches:
        calls["varlen_attention_op"]()
        assert launches[0] == 2  # the block table, then the attention
        calls["swiglu_mlp"]()
        assert launches[0] == 4
        out = calls["rms_norm"]()
        assert out.shape == (host_time.TOKENS, host_time.HIDDEN)
    x, w = torch.randn(3, 8), torch.ones(8)
    assert torch.isfinite(pk.rms_norm(x, w, 1e-6)).all()  # launches run again


@requires_interpreter
def test_measure_and_table():
    row = host_time.measure("bare custom op", lambda: host_time._bare(torch.zeros(2)), calls=5, repeats=3)
    assert row.cpu_us > 0 and row.cpu_us_min <= row.cpu_us and row.wall_us > 0
    table = host_time.markdown([row], {"device": "cpu", "torch": "t", "triton": "tr", "python": "p"}, "today")
    assert "| bare custom op |" in table and "1.00" in table
