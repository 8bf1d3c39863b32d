"""``penguin_kernels.rms_norm`` and ``rms_norm_residual`` against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import penguin_kernels as pk
from penguin_kernels import reference
from tests.utils import assert_rel_close, device, kernel_dtypes, requires_cuda

# The kernel follows the reference's rounding step by step; only the order of the float32 sum of
# squares differs (~1e-7 relative in 1/rms). In 16-bit that can flip the rounding of the normalised
# value n by one ulp, which moves w * n by up to one more ulp of the output after its own rounding:
# at most 2 ulp per element, checked element by element. In float32 the sum-order difference itself
# shows (a few ulp, ~sqrt(D) 2^-24 relative), checked as a relative error. A flip needs n within
# ~1e-7 of a rounding boundary, so in 16-bit almost every element is bit-identical to the reference
# (a kernel that skipped the reference's intermediate rounding of n would differ in ~25% of them).
MAX_ULP = 2
MAX_DIFFERING = 0.01
FP32_TOL = 1e-6

# (rows, D): one element; the released hidden size with rows not a multiple of the 4-row block;
# odd widths below and above a power of two (3000: one row per program, 4096-wide block).
SHAPES = {"1x1": (1, 1), "1x1024": (1, 1024), "7x1024": (7, 1024), "33x100": (33, 100), "5x3000": (5, 3000)}
EPS = 1e-6


pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _inputs(rows: int, d: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * 3
    residual = torch.randn(rows, d, generator=g)
    weight = 1 + 0.2 * torch.randn(d, generator=g)
    return tuple(t.to(device=device(), dtype=dtype) for t in (x, residual, weight))


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    if actual.dtype == torch.float32:
        assert_rel_close(actual, expected, FP32_TOL, what)
        return
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    inf = torch.tensor(float("inf"), dtype=expected.dtype, device=expected.device)
    ulp = (torch.nextafter(expected.abs(), inf) - expected.abs()).float()
    worst = ((actual.float() - expected.float()).abs() / ulp).max().item()
    assert worst <= MAX_ULP, f"{what}: off by {worst:.1f} ulp"
    differing = (actual != expected).float().mean().item()
    assert differing <= MAX_DIFFERING, f"{what}: {differing:.1%} of the elements differ from the reference"


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_rms_norm(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x, _, weight = _inputs(*shape, dtype)
    y = pk.rms_norm(x, weight, EPS)
    expected = reference.rms_norm(x, weight, EPS)
    _assert_matches(y, expected, "rms_norm")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_rms_norm_residual(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x, residual, weight = _inputs(*shape, dtype, seed=1)
    y, s = pk.rms_norm_residual(x, residual, weight, EPS)
    expected_y, expected_s = reference.rms_norm_residual(x, residual, weight, EPS)
    assert torch.equal(s, expected_s), "the sum is one rounded add, as in the reference"
    _assert_matches(y, expected_y, "rms_norm_residual")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_strided_rows_batch_dims_and_eps(dtype: torch.dtype) -> None:
    """Row slices are read in place, leading dims are kept, and eps enters where the reference adds it."""
    x, residual, weight = _inputs(12, 96, dtype, seed=2)
    wide = torch.randn(12, 130, device=device()).to(dtype)
    wide[:, 17:113] = x
    y = pk.rms_norm(wide[:, 17:113], weight, 0.5)
    _assert_matches(y, reference.rms_norm(x, weight, 0.5), "strided rows, eps=0.5")
    y3, s3 = pk.rms_norm_residual(x.view(3, 4, 96), residual.view(3, 4, 96), weight, EPS)
    expected_y, expected_s = reference.rms_norm_residual(x, residual, weight, EPS)
    assert y3.shape == s3.shape == (3, 4, 96)
    assert torch.equal(s3.view(12, 96), expected_s)
    _assert_matches(y3.view(12, 96), expected_y, "3-D input")


def test_empty_rows() -> None:
    x, residual, weight = _inputs(0, 64, torch.float32)
    y, s = pk.rms_norm_residual(x, residual, weight, EPS)
    assert y.shape == s.shape == (0, 64)


@requires_cuda
@pytest.mark.parametrize("rows", [1, 4097, 65536], ids=lambda r: f"rows{r}")
def test_rms_norm_residual_gpu_released(rows: int) -> None:
    x, residual, weight = _inputs(rows, 1024, torch.bfloat16, seed=3)
    y, s = pk.rms_norm_residual(x, residual, weight, EPS)
    expected_y, expected_s = reference.rms_norm_residual(x, residual, weight, EPS)
    assert torch.equal(s, expected_s)
    _assert_matches(y, expected_y, f"rows={rows}")


@requires_cuda
def test_rms_norm_gpu_64bit_offsets() -> None:
    """Rows past 2^31 elements of every tensor."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    rows, d = 2**21 + 3, 1024
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    y, s = pk.rms_norm_residual(x, residual, weight, EPS)
    tail = slice(rows - 64, rows)
    expected_y, expected_s = reference.rms_norm_residual(x[tail], residual[tail], weight, EPS)
    assert torch.equal(s[tail], expected_s)
    _assert_matches(y[tail], expected_y, "tail rows")


@requires_cuda
def test_custom_ops_trace() -> None:
    x, residual, weight = (t.cuda() for t in _inputs(8, 256, torch.bfloat16))
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.penguin.rms_norm.default, (x, weight, EPS), test_utils=utils)
    torch.library.opcheck(torch.ops.penguin.rms_norm_residual.default, (x, residual, weight, EPS), test_utils=utils)


def _bad_calls() -> dict[str, tuple[type[Exception], str, object]]:
    x, residual, weight = _inputs(4, 8, torch.float32)
    return {
        "x-int": (TypeError, "x must have dtype", lambda: pk.rms_norm(x.int(), weight, EPS)),
        "x-device": (ValueError, "x is on meta", lambda: pk.rms_norm(x.to("meta"), weight, EPS)),
        "weight-dtype": (TypeError, "weight has dtype", lambda: pk.rms_norm(x, weight.half(), EPS)),
        "weight-shape": (ValueError, "weight has shape", lambda: pk.rms_norm(x, weight[:7], EPS)),
        "weight-strided": (
            ValueError,
            "weight must be contiguous",
            lambda: pk.rms_norm(x[:, :4], weight[::2], EPS),
        ),
        "x-transposed": (ValueError, "x must be contiguous", lambda: pk.rms_norm(x.t(), weight[:4], EPS)),
        "too-wide": (
            NotImplementedError,
            "not supported",
            lambda: pk.rms_norm(torch.zeros(1, 40000, device=device()), torch.ones(40000, device=device()), EPS),
        ),
        "eps-negative": (ValueError, "eps", lambda: pk.rms_norm(x, weight, -1.0)),
        "eps-nan": (ValueError, "eps", lambda: pk.rms_norm(x, weight, float("nan"))),
        "residual-shape": (
            ValueError,
            "residual has shape",
            lambda: pk.rms_norm_residual(x, residual[:3], weight, EPS),
        ),
        "residual-dtype": (
            TypeError,
            "residual has dtype",
            lambda: pk.rms_norm_residual(x, residual.half(), weight, EPS),
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_clear_errors(case: str) -> None:
    error, message, call = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()
