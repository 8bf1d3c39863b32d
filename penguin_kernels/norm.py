"""RMSNorm, alone or fused with the residual add that precedes it in a pre-norm transformer block.

Per row ``x`` of width ``D``, in the reference's rounding order (``dtype`` = the input dtype)::

    s = cast(x + residual)                                  the new residual stream (fused variant)
    n = cast(s * 1 / sqrt(sum(s^2) / D + eps))              statistics in float32
    y = cast(n * w)

Every cast is to ``dtype``, and each product or sum is formed in float32 and rounded once, as
PyTorch's 16-bit elementwise kernels do, so the kernel reproduces the reference up to the order of
the float32 sum of squares (~1e-7 relative in ``1/rms``). ``s`` is bit-identical; in 16-bit ``y``
is too except where that difference moves ``n`` across a rounding boundary (then by at most 2 ulp);
in float32 ``y`` differs by a few ulp.

Performance design:

* Bandwidth bound, so the only goal is minimal traffic in wide transactions: one read of ``x`` (and
  ``residual``), one write of ``y`` (and ``s``). The fused variant moves ``4 D`` elements per row
  where an add followed by a norm moves ``5 D`` (add: 2 reads, 1 write; norm: 1 read, 1 write), and
  the plain-PyTorch chain (float32 copies, square, mean, scale, casts, weight) several times more.
* A program owns ``BM`` whole rows: ``BM * D`` ~ 4096 elements (4 rows at ``D = 1024``) over 4 warps,
  32 elements = four 16-byte bf16 loads in flight per thread per tensor. At the 56-64 registers the
  kernel compiles to, 8 programs fit on an SM: ~128 KiB of loads in flight per SM for the fused
  variant, enough to keep HBM3 saturated, where a program per 1024-wide row would give each thread a
  single vector per tensor.
* The row is held in registers in one piece (no loop over ``D``): the warp count grows with the
  row, up to 16, so a thread holds ~32 elements per tensor up to ``D = 16384`` and 64 at the
  32768 limit (128 registers in float32 with the residual, no spills).
* Row offsets are 64-bit: ``rows * D`` passes 2^31 at 2M tokens of width 1024.
* ``1/rms`` uses the correctly rounded ``sqrt`` and division: one per row, so accuracy is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from penguin_kernels._checks import ShapeCache, as_rows, check_float, check_like, runnable, signature
from penguin_kernels.compile_case import CompileCase

__all__ = ["NormConfig", "rms_norm", "rms_norm_residual", "select_config", "compile_cases"]

MAX_WIDTH = 32768


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    s_ptr,
    M,
    D,
    stride_xm,
    stride_rm,
    stride_ym,
    stride_sm,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_x = (o_m < M)[:, None] & m_d[None, :]
    o_m = o_m.to(tl.int64)
    # [BM, BD]
    b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + o_d[None, :], mask=m_x, other=0.0)
    if HAS_RESIDUAL:
        b_r = tl.load(r_ptr + o_m[:, None] * stride_rm + o_d[None, :], mask=m_x, other=0.0)
        b_x = (b_x.to(tl.float32) + b_r.to(tl.float32)).to(b_x.dtype)
        tl.store(s_ptr + o_m[:, None] * stride_sm + o_d[None, :], b_x, mask=m_x)
    b_xf = b_x.to(tl.float32)
    # [BM]
    b_rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(b_xf * b_xf, axis=1) / D + eps))
    b_n = (b_xf * b_rstd[:, None]).to(b_x.dtype).to(tl.float32)
    b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_y = b_n * b_w[None, :]
    tl.store(y_ptr + o_m[:, None] * stride_ym + o_d[None, :], b_y.to(y_ptr.dtype.element_ty), mask=m_x)


@dataclass(frozen=True)
class NormConfig:
    """Rows per program and warps; the row is always held whole, in a power-of-two block."""

    block_m: int
    num_warps: int


def select_config(d: int) -> NormConfig:
    """The shipped configuration for rows of width ``d``: ~4096 elements per program, 4 to 16 warps."""
    bd = triton.next_power_of_2(d)
    bm = max(1, min(16, 4096 // bd))
    return NormConfig(block_m=bm, num_warps=min(16, max(4, bm * bd // 1024)))


class _Plan(NamedTuple):
    """Everything a launch needs that depends only on the inputs' metadata."""

    shape: tuple[int, ...]
    grid: tuple[int]
    rows: int
    width: int
    stride_xm: int
    stride_rm: int
    block_m: int
    block_d: int
    num_warps: int


def _build_plan(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, config: NormConfig | None
) -> _Plan:
    """Check ``x``, ``residual`` and ``weight`` (errors name the one at fault) and plan the launch."""
    check_float(x, "x")
    rows = as_rows(x, "x")
    d = x.shape[-1]
    if d == 0 or d > MAX_WIDTH:
        raise NotImplementedError(
            f"rows of width {d} are not supported (1 to {MAX_WIDTH}); x has shape {tuple(x.shape)}"
        )
    check_like(weight, "weight", x, "x")
    if tuple(weight.shape) != (d,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({d},) to match the last dim of x")
    if d > 1 and weight.stride(0) != 1:
        raise ValueError("weight must be contiguous")
    stride_rm = 0
    if residual is not None:
        check_like(residual, "residual", x, "x")
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the shape of x {tuple(x.shape)}")
        stride_rm = as_rows(residual, "residual").stride(0)
    cfg = config or select_config(d)
    m = rows.shape[0]
    return _Plan(
        shape=tuple(x.shape),
        grid=(-(-m // cfg.block_m),),
        rows=m,
        width=d,
        stride_xm=rows.stride(0),
        stride_rm=stride_rm,
        block_m=cfg.block_m,
        block_d=triton.next_power_of_2(d),
        num_warps=cfg.num_warps,
    )


_PLANS = ShapeCache(_build_plan)


def _plan(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, config: NormConfig | None) -> _Plan:
    try:
        key = (signature(x), runnable(x), signature(weight), residual is None or signature(residual), config)
    except AttributeError:  # not a tensor: the checks say which
        return _build_plan(x, residual, weight, config)
    return _PLANS.get(key, x, residual, weight, config)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # x and residual are passed whole: the kernel addresses their rows through the planned strides.
    y = torch.empty(plan.shape, dtype=x.dtype, device=x.device)
    s = None if residual is None else torch.empty(plan.shape, dtype=x.dtype, device=x.device)
    if plan.rows > 0:
        wrap_triton(_rms_norm_kernel)[plan.grid](
            x,
            x if residual is None else residual,
            weight,
            y,
            y if s is None else s,
            plan.rows,
            plan.width,
            plan.stride_xm,
            plan.stride_rm,
            plan.width,
            0 if s is None else plan.width,
            eps,
            HAS_RESIDUAL=residual is not None,
            BM=plan.block_m,
            BD=plan.block_d,
            num_warps=plan.num_warps,
        )
    return y, s


@triton_op("penguin::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps, _plan(x, None, weight, None))[0]


@triton_op("penguin::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps, _plan(x, residual, weight, None))


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (float, int)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return float(eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, config: NormConfig | None = None) -> torch.Tensor:
    """``weight * cast(x / sqrt(mean(x^2) + eps))`` over the last dim, statistics in float32.

    Args:
        x: ``[..., D]`` float16/bfloat16/float32, contiguous in the last dim (a row slice of a 2-D
            tensor is read in place); ``1 <= D <= 32768``.
        weight: ``[D]``, same dtype and device as ``x``.
        eps: added to the mean square.
        config: a configuration in place of the shipped one (:func:`select_config`), for tuning; the
            launch then runs outside the registered op.

    Returns:
        ``[..., D]`` contiguous, dtype of ``x``.
    """
    eps = _check_eps(eps)
    if config is not None:
        return _launch(x, None, weight, eps, _plan(x, None, weight, config))[0]
    try:
        return _rms_norm_op(x, weight, eps)
    except RuntimeError:
        _build_plan(x, None, weight, None)  # names an argument the op's schema refused
        raise


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, config: NormConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (rounded to the input dtype) and ``rms_norm(s)``, in one pass.

    Args:
        x, residual: ``[..., D]`` of the same shape, dtype and device, contiguous in the last dim.
        weight: ``[D]``.
        eps: added to the mean square.
        config: a configuration in place of the shipped one (:func:`select_config`), for tuning.

    Returns:
        ``(normed, s)``, both ``[..., D]`` contiguous in the dtype of ``x``.
    """
    eps = _check_eps(eps)
    if config is not None:
        return _launch(x, residual, weight, eps, _plan(x, residual, weight, config))
    try:
        return _rms_norm_residual_op(x, residual, weight, eps)
    except RuntimeError:
        _build_plan(x, residual, weight, None)  # names an argument the op's schema refused
        raise


def compile_cases(arch: int) -> list[CompileCase]:
    """The configs at the released hidden size (1024) and at 4096, with and without the residual."""
    cases = []
    for dtype in ("bf16", "fp32"):
        for d in (1024, 4096):
            cfg = select_config(d)
            for residual in (False, True):
                ptr = f"*{dtype}"
                cases.append(
                    CompileCase(
                        name=f"{dtype} D={d}{' +residual' if residual else ''}",
                        fn=_rms_norm_kernel,
                        signature={"x_ptr": ptr, "r_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr, "s_ptr": ptr}
                        | dict.fromkeys(("M", "D", "stride_xm", "stride_rm", "stride_ym", "stride_sm"), "i32")
                        | {"eps": "fp32"},
                        constexprs={"HAS_RESIDUAL": residual, "BM": cfg.block_m, "BD": triton.next_power_of_2(d)},
                        num_warps=cfg.num_warps,
                        num_stages=1,
                        aligned=("D", "stride_xm", "stride_rm", "stride_ym", "stride_sm"),
                    )
                )
    return cases
