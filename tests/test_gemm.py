"""``penguin_kernels.linear`` and ``gate_up_swiglu`` against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import penguin_kernels as pk
from penguin_kernels import reference
from tests.utils import HAS_CUDA, assert_rel_close, device, kernel_dtypes, requires_cuda

# Relative Frobenius error against the float32 reference on the same (rounded) inputs. The kernel
# accumulates in float32 and rounds once, so the error is the output rounding: ~3e-4 rms in fp16
# (2^-11 relative), ~2e-3 in bf16 (2^-8); float32 differs only by the order of the K-sum.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (M, K, N): M = 1; ragged M, K and N with several row tiles and a partial group of the grouped
# order; the released patch embedding (K = 588, not a multiple of 16) and attention output (K = 2048).
SHAPES = {"m1": (1, 16, 8), "odd": (157, 100, 130), "patch": (5, 588, 1024), "o_proj": (3, 2048, 1024)}
EPILOGUES = {
    "plain": {},
    "bias": {"bias": True},
    "gelu": {"gelu": True},
    "bias-gelu": {"bias": True, "gelu": True},
    "residual": {"residual": True},
    "bias-residual": {"bias": True, "residual": True},
    "all": {"bias": True, "gelu": True, "residual": True},
}


pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(m, k, generator=g),
        "weight": torch.randn(n, k, generator=g) / k**0.5,
        "bias": torch.randn(n, generator=g) * 0.5,
        "residual": torch.randn(m, n, generator=g),
    }
    return {name: v.to(device=device(), dtype=dtype) for name, v in t.items()}


def _expected(t: dict[str, torch.Tensor], bias: bool, gelu: bool, residual: bool) -> torch.Tensor:
    y = reference.linear(t["x"].float(), t["weight"].float(), t["bias"].float() if bias else None)
    if gelu:
        y = F.gelu(y)
    return y + t["residual"].float() if residual else y


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("epilogue", list(EPILOGUES.values()), ids=list(EPILOGUES))
def test_linear_epilogues(dtype: torch.dtype, epilogue: dict[str, bool]) -> None:
    t = _inputs(*SHAPES["odd"], dtype)
    bias, gelu, residual = (epilogue.get(name, False) for name in ("bias", "gelu", "residual"))
    y = pk.linear(
        t["x"],
        t["weight"],
        t["bias"] if bias else None,
        gelu=gelu,
        residual=t["residual"] if residual else None,
    )
    assert y.dtype == dtype
    assert_rel_close(y, _expected(t, bias, gelu, residual), TOL[dtype], "linear")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [SHAPES[s] for s in ("m1", "patch", "o_proj")], ids=["m1", "patch", "o_proj"])
def test_linear_shapes(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    t = _inputs(*shape, dtype, seed=1)
    y = pk.linear(t["x"], t["weight"], t["bias"], residual=t["residual"])
    assert_rel_close(y, _expected(t, True, False, True), TOL[dtype], f"linear {shape}")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_linear_strided_rows_and_batch_dims(dtype: torch.dtype) -> None:
    """A column slice of a wider activation is read in place; leading dims are kept."""
    t = _inputs(2 * 23, 40, 24, dtype, seed=2)
    wide = torch.empty(46, 70, dtype=dtype, device=device())
    wide[:, 9:49] = t["x"]
    x = wide[:, 9:49]
    res_wide = torch.empty(46, 33, dtype=dtype, device=device())
    res_wide[:, 5:29] = t["residual"]
    y = pk.linear(x, t["weight"], t["bias"], residual=res_wide[:, 5:29])
    assert_rel_close(y, _expected(t, True, False, True), TOL[dtype], "strided rows")
    y3 = pk.linear(t["x"].view(2, 23, 40), t["weight"], t["bias"], gelu=True)
    assert y3.shape == (2, 23, 24)
    assert_rel_close(y3.view(46, 24), _expected(t, True, True, False), TOL[dtype], "3-D input")
    y1 = pk.linear(t["x"][0], t["weight"])
    assert y1.shape == (24,)
    assert_rel_close(y1, reference.linear(t["x"][0].float(), t["weight"].float()), TOL[dtype], "1-D input")


def test_linear_empty_rows() -> None:
    t = _inputs(0, 32, 16, torch.float32)
    assert pk.linear(t["x"], t["weight"], t["bias"]).shape == (0, 16)


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [(1, 16, 8), (157, 100, 130), (3, 1024, 3072)], ids=["m1", "odd", "encoder"])
def test_gate_up_swiglu(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    m, k, inter = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g).to(device=device(), dtype=dtype)
    w = (torch.randn(2 * inter, k, generator=g) / k**0.5).to(device=device(), dtype=dtype)
    y = pk.gate_up_swiglu(x, w)
    assert y.shape == (m, inter)
    assert_rel_close(y, reference.swiglu(reference.linear(x.float(), w.float())), TOL[dtype], "gate_up_swiglu")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 300, 4133, 20000], ids=lambda m: f"m{m}")
def test_linear_gpu_tiles(dtype: torch.dtype, m: int) -> None:
    """Each of the launcher's tile sizes (picked by M) at released widths, every epilogue at once."""
    t = _inputs(m, 1024, 4096, dtype, seed=5)
    y = pk.linear(t["x"], t["weight"], t["bias"], gelu=True, residual=t["residual"])
    assert_rel_close(y, _expected(t, True, True, True), TOL[dtype], f"linear m={m}")
    h = pk.gate_up_swiglu(t["x"], t["weight"])
    assert_rel_close(h, reference.swiglu(reference.linear(t["x"].float(), t["weight"].float())), TOL[dtype], "swiglu")


@requires_cuda
def test_linear_gpu_64bit_offsets() -> None:
    """Rows past 2^31 elements of x, of the residual and of the output."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    m, k = 2**21 + 3, 1024
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    r = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = pk.linear(x, w, residual=r)
    for rows in (slice(0, 64), slice(m - 64, m)):
        expected = reference.linear(x[rows].float(), w.float()) + r[rows].float()
        assert_rel_close(y[rows], expected, TOL[torch.bfloat16], f"rows {rows}")


@requires_cuda
def test_custom_ops_trace() -> None:
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(96, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.penguin.linear.default, (x, w, b, None, True), test_utils=utils)
    torch.library.opcheck(torch.ops.penguin.gate_up_swiglu.default, (x, w), test_utils=utils)


def _bad_calls() -> dict[str, tuple[type[Exception], str, object]]:
    x = torch.randn(4, 8, device=device())
    w = torch.randn(6, 8, device=device())
    calls = {
        "x-int": (TypeError, "x must have dtype", lambda: pk.linear(x.int(), w)),
        "x-float64": (TypeError, "x must have dtype", lambda: pk.linear(x.double(), w.double())),
        "x-not-tensor": (TypeError, "x must be a torch.Tensor", lambda: pk.linear(x.tolist(), w)),
        "weight-dtype": (TypeError, "weight has dtype", lambda: pk.linear(x, w.half())),
        "weight-device": (ValueError, "weight is on meta", lambda: pk.linear(x, w.to("meta"))),
        "x-device": (ValueError, "x is on meta", lambda: pk.linear(x.to("meta"), w.to("meta"))),
        "weight-in-features": (ValueError, "weight has 7 input features", lambda: pk.linear(x, w[:, :7])),
        "weight-1d": (ValueError, "weight must be 2-D", lambda: pk.linear(x, w[0])),
        "weight-transposed": (
            ValueError,
            "weight must be contiguous",
            lambda: pk.linear(x, w.t().contiguous().t()),
        ),
        "x-transposed": (ValueError, "x must be contiguous", lambda: pk.linear(x.t().contiguous().t(), w)),
        "x-empty-k": (ValueError, "non-empty last dimension", lambda: pk.linear(x[:, :0], w[:, :0])),
        "bias-shape": (
            ValueError,
            "bias has shape",
            lambda: pk.linear(x, w, torch.zeros(5, device=device())),
        ),
        "residual-shape": (ValueError, "residual has shape", lambda: pk.linear(x, w, residual=x)),
        "residual-dtype": (
            TypeError,
            "residual has dtype",
            lambda: pk.linear(x, w, residual=torch.zeros(4, 6, device=device(), dtype=torch.float16)),
        ),
        "swiglu-odd-rows": (ValueError, "gate and up", lambda: pk.gate_up_swiglu(x, w[:5])),
    }
    if not HAS_CUDA:
        calls["bf16-interpreter"] = (
            NotImplementedError,
            "bfloat16 on the CPU",
            lambda: pk.linear(x.bfloat16(), w.bfloat16()),
        )
    return calls


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_clear_errors(case: str) -> None:
    error, message, call = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


def test_grad_inputs_run_under_no_grad() -> None:
    t = _inputs(4, 8, 6, torch.float32)
    w = t["weight"].clone().requires_grad_()
    with torch.no_grad():
        y = pk.linear(t["x"], w)
    assert_rel_close(y, reference.linear(t["x"], t["weight"]), TOL[torch.float32], "no_grad")
