"""Shared helpers for the test suite: tolerances, poisoned outputs, error measures."""

from __future__ import annotations

import functools
import os

import pytest
import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@functools.cache
def interpreter_fuses_fma() -> bool:
    """Whether ``tl.fma`` rounds once in this Triton's interpreter (as on GPUs); before 3.7 it rounds twice."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(a, b, c, out):
        tl.store(out, tl.fma(tl.load(a), tl.load(b), tl.load(c)))

    # (1 + 2^-12)^2 - (1 + 2^-11) = 2^-24 exactly; a float32 multiply first rounds it away to 0
    x = torch.tensor([1 + 2**-12])
    out = torch.zeros(1)
    probe[(1,)](x, x.clone(), torch.tensor([-(1 + 2**-11)]), out)
    return out.item() == 2**-24


def device() -> str:
    """Where kernels run in this session: the GPU when present, else the CPU through the interpreter."""
    return "cuda" if HAS_CUDA and not INTERPRETER else "cpu"


def kernel_dtypes() -> list[torch.dtype]:
    """dtypes a kernel test can check here: ``tl.dot`` on bf16 is wrong in the interpreter."""
    if device() == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (or the max value for integers) so unwritten elements show."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; inf if ``actual`` has a NaN or inf."""
    a = actual.double()
    e = expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Relative Frobenius error at most ``tol``; fails on NaN/inf and on shape mismatch."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
