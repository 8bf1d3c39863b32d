"""``penguin_kernels.swiglu_mlp`` and ``projector_mlp`` against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import penguin_kernels as pk
from penguin_kernels import reference
from tests.utils import assert_rel_close, device, kernel_dtypes, rel_err, requires_cuda

# Relative Frobenius error against the float32 reference on the same (rounded) inputs. Each GEMM
# rounds its output once and the intermediate's rounding passes through the second GEMM: measured
# ~2.5e-4 in fp16 and ~2e-3 in bf16 (a bf16 emulation of the unfused chain, which rounds 3-5 times,
# gives ~2.7e-3). float32 differs only by summation order.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (M, D, I): M = 1; ragged sizes everywhere (several row tiles); the released encoder MLP.
SWIGLU_SHAPES = {"m1": (1, 16, 24), "odd": (75, 48, 80), "encoder": (3, 1024, 3072)}
# (M, D, H): the released Penguin-VL-2B projector, 1024 -> 2048 -> 2048, and ragged sizes.
PROJECTOR_SHAPES = {"m1": (1, 16, 24), "odd": (75, 48, 80), "penguin-2b": (2, 1024, 2048)}


pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _swiglu_inputs(m: int, d: int, inter: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    w_gate_up = torch.randn(2 * inter, d, generator=g) / d**0.5
    w_down = torch.randn(d, inter, generator=g) / inter**0.5
    residual = torch.randn(m, d, generator=g)
    return tuple(t.to(device=device(), dtype=dtype) for t in (x, w_gate_up, w_down, residual))


def _projector_inputs(m: int, d: int, h: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    w1 = torch.randn(h, d, generator=g) / d**0.5
    b1 = torch.randn(h, generator=g) * 0.5
    w2 = torch.randn(h, h, generator=g) / h**0.5
    b2 = torch.randn(h, generator=g) * 0.5
    return tuple(t.to(device=device(), dtype=dtype) for t in (x, w1, b1, w2, b2))


def _f32(tensors: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else t.float() for t in tensors)


# The released widths run with the residual only, to keep the interpreter fast.
SWIGLU_CASES = {f"{s}-{r}": (s, r == "residual") for s in SWIGLU_SHAPES for r in ("plain", "residual")}
del SWIGLU_CASES["encoder-plain"]


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("case", list(SWIGLU_CASES))
def test_swiglu_mlp(dtype: torch.dtype, case: str) -> None:
    shape, with_residual = SWIGLU_CASES[case]
    x, w_gate_up, w_down, residual = _swiglu_inputs(*SWIGLU_SHAPES[shape], dtype)
    residual = residual if with_residual else None
    y = pk.swiglu_mlp(x, w_gate_up, w_down, residual)
    assert y.dtype == dtype
    expected = reference.swiglu_mlp(*_f32((x, w_gate_up, w_down, residual)))
    assert_rel_close(y, expected, TOL[dtype], "swiglu_mlp")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", list(PROJECTOR_SHAPES.values()), ids=list(PROJECTOR_SHAPES))
def test_projector_mlp(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    inputs = _projector_inputs(*shape, dtype, seed=1)
    y = pk.projector_mlp(*inputs)
    assert y.dtype == dtype
    assert_rel_close(y, reference.projector_mlp(*_f32(inputs)), TOL[dtype], "projector_mlp")


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_batch_dims_and_strided_rows(dtype: torch.dtype) -> None:
    x, w_gate_up, w_down, residual = _swiglu_inputs(12, 48, 80, dtype, seed=2)
    y = pk.swiglu_mlp(x.view(3, 4, 48), w_gate_up, w_down, residual.view(3, 4, 48))
    assert y.shape == (3, 4, 48)
    expected = reference.swiglu_mlp(*_f32((x, w_gate_up, w_down, residual)))
    assert_rel_close(y.view(12, 48), expected, TOL[dtype], "3-D swiglu_mlp")
    wide = torch.zeros(12, 64, device=device(), dtype=dtype)
    wide[:, 8:56] = x
    inputs = _projector_inputs(12, 48, 40, dtype, seed=3)
    y = pk.projector_mlp(wide[:, 8:56], *inputs[1:])
    assert_rel_close(y, reference.projector_mlp(*_f32((x, *inputs[1:]))), TOL[dtype], "strided projector")


def test_empty_rows() -> None:
    x, w_gate_up, w_down, residual = _swiglu_inputs(0, 16, 24, torch.float32)
    assert pk.swiglu_mlp(x, w_gate_up, w_down, residual).shape == (0, 16)
    assert pk.projector_mlp(*_projector_inputs(0, 16, 24, torch.float32)).shape == (0, 24)


@requires_cuda
@pytest.mark.parametrize("m", [1, 1000, 16411], ids=lambda m: f"m{m}")
def test_gpu_released_bf16_at_least_as_accurate_as_the_chain(m: int) -> None:
    """bf16 at released widths: within tolerance, and no worse than the unfused bf16 chain's error."""
    dtype = torch.bfloat16
    x, w_gate_up, w_down, residual = _swiglu_inputs(m, 1024, 3072, dtype, seed=4)
    expected = reference.swiglu_mlp(*_f32((x, w_gate_up, w_down, residual)))
    y = pk.swiglu_mlp(x, w_gate_up, w_down, residual)
    assert_rel_close(y, expected, TOL[dtype], "swiglu_mlp")
    assert rel_err(y, expected) <= 1.1 * rel_err(reference.swiglu_mlp(x, w_gate_up, w_down, residual), expected)
    for h in (2048, 4096):
        inputs = _projector_inputs(m, 1024, h, dtype, seed=5)
        expected = reference.projector_mlp(*_f32(inputs))
        y = pk.projector_mlp(*inputs)
        assert_rel_close(y, expected, TOL[dtype], f"projector 1024->{h}")
        assert rel_err(y, expected) <= 1.1 * rel_err(reference.projector_mlp(*inputs), expected)


@requires_cuda
def test_custom_ops_trace() -> None:
    x, w_gate_up, w_down, residual = (t.cuda() for t in _swiglu_inputs(64, 128, 96, torch.bfloat16))
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.penguin.swiglu_mlp.default, (x, w_gate_up, w_down, residual), test_utils=utils)
    inputs = tuple(t.cuda() for t in _projector_inputs(64, 128, 96, torch.bfloat16))
    torch.library.opcheck(torch.ops.penguin.projector_mlp.default, inputs, test_utils=utils)


def _bad_calls() -> dict[str, tuple[type[Exception], str, object]]:
    x, w_gate_up, w_down, residual = _swiglu_inputs(4, 16, 24, torch.float32)
    x, w1, b1, w2, b2 = _projector_inputs(4, 16, 24, torch.float32)
    return {
        "gate-up-in-features": (
            ValueError,
            "w_gate_up has 15 input features",
            lambda: pk.swiglu_mlp(x, w_gate_up[:, :15], w_down),
        ),
        "gate-up-odd-rows": (ValueError, "gate and up", lambda: pk.swiglu_mlp(x, w_gate_up[:47], w_down)),
        "down-in-features": (
            ValueError,
            "w_down has 20 input features but the SwiGLU product",
            lambda: pk.swiglu_mlp(x, w_gate_up, w_down[:, :20]),
        ),
        "down-dtype": (TypeError, "w_down has dtype", lambda: pk.swiglu_mlp(x, w_gate_up, w_down.half())),
        "residual-shape": (
            ValueError,
            "residual has shape",
            lambda: pk.swiglu_mlp(x, w_gate_up, w_down, x[:3]),
        ),
        "b1-shape": (ValueError, "b1 has shape", lambda: pk.projector_mlp(x, w1, b1[:5], w2, b2)),
        "b2-missing": (TypeError, "b2 must be a torch.Tensor", lambda: pk.projector_mlp(x, w1, b1, w2, None)),
        "w2-in-features": (
            ValueError,
            "w2 has 23 input features",
            lambda: pk.projector_mlp(x, w1, b1, w2[:, :23], b2),
        ),
        "x-float64": (TypeError, "x must have dtype", lambda: pk.projector_mlp(x.double(), w1, b1, w2, b2)),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_clear_errors(case: str) -> None:
    error, message, call = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()
