"""``python -m bench.profile``: every target builds and runs, with the stated FLOP/byte formulas.

The tool times on a GPU only; here each target is built on this session's device at a tiny shape and
called once, through the Triton kernels (interpreter on a CPU) and through the reference.
"""

from __future__ import annotations

import pytest
import torch

from bench import profile
from tests.utils import HAS_CUDA, INTERPRETER, device

TINY = [
    "--tokens=24",
    "--seqlen=12",
    "--hidden=64",
    "--heads=4",
    "--kv-heads=2",
    "--head-dim=64",
    "--inter=96",
    "--llm-hidden=80",
    "--layers=1",
    "--dtype=fp32",
]


def _args(target: str, *extra: str):
    return profile.parser().parse_args([target, *TINY, *extra])


@pytest.mark.parametrize("impl", ["triton", "torch"], ids=str)
@pytest.mark.parametrize("target", profile.TARGETS, ids=str)
def test_target_runs(target, impl):
    if impl == "triton" and device() == "cpu" and not INTERPRETER:
        pytest.skip("Triton kernels need a GPU or the interpreter")
    problem = profile.build(_args(target, f"--impl={impl}"), device=device())
    out = problem.run()
    first = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(first).all()
    assert problem.bytes > 0 and problem.shape


def test_formulas():
    # 24 tokens in two 12-token segments, 4 query heads, 2 KV heads, head_dim 64, fp32.
    attn = profile.build(_args("attention", "--impl=torch"), device="cpu")
    assert attn.flops == 4 * (12**2 + 12**2) * 4 * 64
    assert attn.bytes == (2 * 24 * 4 * 64 + 2 * 24 * 2 * 64) * 4 + 3 * 4
    lin = profile.build(_args("linear", "--impl=torch", "--n=32", "--k=48"), device="cpu")
    assert lin.flops == 2 * 24 * 32 * 48
    assert lin.bytes == (24 * 48 + 32 * 48 + 24 * 32) * 4
    mlp = profile.build(_args("swiglu_mlp", "--impl=torch"), device="cpu")
    assert mlp.flops == 2 * 24 * 2 * 96 * 64 + 2 * 24 * 96 * 64


@pytest.mark.skipif(HAS_CUDA, reason="checks the message printed where no GPU is visible")
def test_without_cuda_exits_with_message(capsys):
    assert profile.main(["attention"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
