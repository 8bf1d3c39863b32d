"""The encoder's SwiGLU MLP and Penguin-VL's projector, each as two epilogue-fused GEMMs.

::

    swiglu_mlp(x)    = (silu(x Wg^T) * (x Wu^T)) Wd^T + residual      gate/up GEMM, SwiGLU epilogue;
                                                                     down GEMM, residual epilogue
    projector_mlp(x) = gelu(x W1^T + b1) W2^T + b2                    GEMM, bias + erf GELU epilogue;
                                                                     GEMM, bias epilogue

Both GEMMs are :func:`penguin_kernels.gemm.launch_gemm`; only the ``[M, I]`` (or ``[M, H]``)
intermediate is written, once, in the activation dtype.

Performance design (H100 SXM, bf16: ~990 TFLOP/s dense peak, ~700 sustained by good GEMMs, 3.35 TB/s):

* SwiGLU MLP, 1024 -> 2 x 3072 -> 1024: 18.9 MFLOP per token, 27 ns at 700 TFLOP/s. The unfused
  chain also writes the ``[M, 6144]`` gate/up output and runs silu, multiply and residual-add passes:
  ~54 KiB per token of extra traffic (16 ns at 3.35 TB/s) and three launches, against 12 KiB
  (h written and read back) plus the 2 KiB residual read here. At GEMM parity with cuBLAS that
  is ~1.4x, so a 1.15x gain survives GEMMs ~20% slower than cuBLAS.
* Projector, 1024 -> 2048 -> 2048 (Penguin-VL-2B): 12.6 MFLOP per token (18 ns); the unfused chain
  differs only by a separate GELU pass over ``[M, 2048]`` (8 KiB per token, 2.4 ns), since cuBLAS
  adds the biases in its own epilogue. The fusion can gain at most ~13% (~8% for 1024 -> 4096 ->
  4096, 42 MFLOP and 16 KiB per token), so beating the chain by more than that needs GEMMs faster
  than cuBLAS.
* A single kernel for both projector GEMMs that keeps ``h`` on chip cannot win at these widths.
  A program would own a ``[BM, 2048]`` float32 output accumulator: 512 KiB at ``BM = 64`` (the
  smallest Hopper wgmma tile height), twice the 256 KiB register file and more than the 228 KiB
  of shared memory of an SM. Splitting the output columns into ``BN2``-wide programs fits, but each
  program must recompute all of ``h``: the first GEMM's 4.2 MFLOP per token runs ``2048 / BN2``
  times, 8x at ``BN2 = 256``, for 41.9 MFLOP per token, 3.3x the two-GEMM work (4x for 8B: 168
  against 42 MFLOP). Keeping ``h`` in shared memory instead needs ``BM x 2048`` bf16 = 256 KiB at
  ``BM = 64``, again over the limit (and Triton cannot pin a tile in shared memory across loop
  iterations). The round trip it would save is the 8 KiB per token above, at most 13% of the time
  and mostly hidden under the MMAs of two compute-bound GEMMs; the recompute costs 230% or more.
  So the projector ships as two GEMMs, with no switch for a variant that only loses.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from penguin_kernels._checks import (
    ShapeCache,
    check_bias,
    check_input,
    check_residual,
    check_weight,
    runnable,
    signature,
)
from penguin_kernels.compile_case import CompileCase
from penguin_kernels.device import device_info
from penguin_kernels.gemm import GemmPlan, Tile, _gemm_kernel, launch_gemm, plan_gemm

__all__ = ["MlpTiles", "swiglu_mlp", "projector_mlp", "compile_cases"]


# The tiles of the two GEMMs, in call order; ``None`` takes the shipped choice for both.
MlpTiles = tuple[Tile, Tile]


def _build_plans(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    residual: torch.Tensor | None,
    swiglu: bool,
    tiles: MlpTiles | None,
) -> tuple[GemmPlan, GemmPlan]:
    """Check the operands of either MLP (errors name the one at fault) and plan both launches."""
    rows = check_input(x)
    source = f"x (shape {tuple(x.shape)})"
    if swiglu:
        check_weight(w1, "w_gate_up", x, x.shape[-1], source)
        if w1.shape[0] % 2:
            raise ValueError(f"w_gate_up must stack gate and up rows [2I, D]; got {w1.shape[0]} rows")
        inter = w1.shape[0] // 2
        check_weight(w2, "w_down", x, inter, f"the SwiGLU product (I = {inter})")
    else:
        check_weight(w1, "w1", x, x.shape[-1], source)
        inter = w1.shape[0]
        check_bias(b1, "b1", x, inter)
        check_weight(w2, "w2", x, inter, "w1 (its out_features)")
        check_bias(b2, "b2", x, w2.shape[0])
    out_shape = (*x.shape[:-1], w2.shape[0])
    res_rows = None if residual is None else check_residual(residual, x, out_shape)
    first_tile, second_tile = tiles or (None, None)
    device, (m, k) = device_info(x.device), rows.shape
    first = plan_gemm(
        device,
        x.dtype,
        m,
        k,
        inter,
        stride_xm=rows.stride(0),
        stride_rm=0,
        out_shape=(m, inter),
        swiglu=swiglu,
        tile=first_tile,
    )
    second = plan_gemm(
        device,
        x.dtype,
        m,
        inter,
        w2.shape[0],
        stride_xm=inter,
        stride_rm=0 if res_rows is None else res_rows.stride(0),
        out_shape=out_shape,
        swiglu=False,
        tile=second_tile,
    )
    return first, second


_PLANS = ShapeCache(_build_plans)


def _plans(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    residual: torch.Tensor | None,
    swiglu: bool,
    tiles: MlpTiles | None,
) -> tuple[GemmPlan, GemmPlan]:
    args = (x, w1, b1, w2, b2, residual, swiglu, tiles)
    try:
        key = (
            signature(x),
            runnable(x),
            signature(w1),
            b1 is None or signature(b1),
            signature(w2),
            b2 is None or signature(b2),
            residual is None or signature(residual),
            swiglu,
            tiles,
        )
    except AttributeError:  # not a tensor: the checks say which
        return _build_plans(*args)
    return _PLANS.get(key, *args)


def _swiglu_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None,
    plans: tuple[GemmPlan, GemmPlan],
) -> torch.Tensor:
    kernel = wrap_triton(_gemm_kernel)
    h = launch_gemm(x, w_gate_up, None, None, plans[0], swiglu=True, kernel=kernel)
    return launch_gemm(h, w_down, None, residual, plans[1], kernel=kernel)


def _projector_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    plans: tuple[GemmPlan, GemmPlan],
) -> torch.Tensor:
    kernel = wrap_triton(_gemm_kernel)
    h = launch_gemm(x, w1, b1, None, plans[0], gelu=True, kernel=kernel)
    return launch_gemm(h, w2, b2, None, plans[1], kernel=kernel)


@triton_op("penguin::swiglu_mlp", mutates_args=())
def _swiglu_mlp_op(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor:
    return _swiglu_mlp(x, w_gate_up, w_down, residual, _plans(x, w_gate_up, None, w_down, None, residual, True, None))


@triton_op("penguin::projector_mlp", mutates_args=())
def _projector_mlp_op(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    return _projector_mlp(x, w1, b1, w2, b2, _plans(x, w1, b1, w2, b2, None, False, None))


def swiglu_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    config: MlpTiles | None = None,
) -> torch.Tensor:
    """``(silu(x Wg^T) * (x Wu^T)) Wd^T (+ residual)`` in two kernels.

    Args:
        x: ``[..., D]`` float16/bfloat16/float32, contiguous in the last dim (row slices allowed).
        w_gate_up: ``[2I, D]`` = ``cat([Wg, Wu])``.
        w_down: ``[D_out, I]``.
        residual: optional ``[..., D_out]``, added in the down projection's epilogue.
        config: ``(gate/up tile, down tile)`` in place of the shipped ones, for tuning; the launches
            then run outside the registered op.

    Returns:
        ``[..., D_out]`` in the dtype of ``x``. The ``[..., I]`` SwiGLU product is the only
        intermediate, rounded once to the dtype of ``x``.
    """
    if config is not None:
        return _swiglu_mlp(
            x, w_gate_up, w_down, residual, _plans(x, w_gate_up, None, w_down, None, residual, True, config)
        )
    try:
        return _swiglu_mlp_op(x, w_gate_up, w_down, residual)
    except RuntimeError:
        _build_plans(x, w_gate_up, None, w_down, None, residual, True, None)  # names an argument the schema refused
        raise


def projector_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    config: MlpTiles | None = None,
) -> torch.Tensor:
    """Penguin-VL's projector ``gelu(x W1^T + b1) W2^T + b2`` (exact erf GELU) in two kernels.

    Args:
        x: ``[..., D]`` float16/bfloat16/float32 encoder features, contiguous in the last dim.
        w1: ``[H, D]``, b1: ``[H]``; w2: ``[H_out, H]``, b2: ``[H_out]`` (``D = 1024``,
            ``H = H_out = 2048`` for Penguin-VL-2B, 4096 for 8B).
        config: ``(first tile, second tile)`` in place of the shipped ones, for tuning.

    Returns:
        ``[..., H_out]`` in the dtype of ``x``; ``gelu(x W1^T + b1)`` is rounded once to that dtype.
    """
    if config is not None:
        return _projector_mlp(x, w1, b1, w2, b2, _plans(x, w1, b1, w2, b2, None, False, config))
    try:
        return _projector_mlp_op(x, w1, b1, w2, b2)
    except RuntimeError:
        _build_plans(x, w1, b1, w2, b2, None, False, None)  # names an argument the op's schema refused
        raise


def compile_cases(arch: int) -> list[CompileCase]:
    """The MLPs launch only :func:`penguin_kernels.gemm._gemm_kernel`, whose cases cover every config."""
    return []
