"""Backward of :mod:`penguin_kernels.norm`: ``rms_norm`` and ``rms_norm_residual``.

Per row ``x`` (for the fused variant ``x`` is the saved sum ``s``), ``r = 1 / sqrt(mean(x^2) + eps)``,
``x^ = x r`` and ``n = cast(x^)`` the forward's normalised value, for the output gradient ``dy``::

    dw = sum_rows dy * n
    dn = dy * w
    dx = r (dn - x^ mean(dn * x^))  (+ ds, the gradient reaching the fused variant's ``s`` output)

The casts of the forward are treated as identities (their gradient almost everywhere), so ``dx``
is the float32 gradient of the float32 chain. ``r`` is recomputed from ``x`` (one extra row sum),
not saved: the forward then writes nothing it would not write at inference.

Design: a program owns a contiguous run of rows, in ``BM``-row blocks laid out as the forward's
(whole rows in registers, 64-bit row offsets), and accumulates its share of ``dw`` in float32
registers; it writes one ``[D]`` partial sum, and the partials are summed in a fixed order by one
reduction afterwards. So ``dw`` is deterministic and no atomics are needed. On a GPU there are at
most four programs per SM: enough rows in flight to stream at bandwidth, few partials to reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from penguin_kernels.device import device_info
from penguin_kernels.norm import _rms_norm_op, _rms_norm_residual_op, select_config

if TYPE_CHECKING:
    from penguin_kernels.compile_case import CompileCase

__all__ = ["rms_norm_backward", "compile_cases"]

_PROGRAMS_PER_SM = 4


@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    ds_ptr,
    dx_ptr,
    dw_ptr,
    M,
    D,
    rows_per_program,
    stride_xm,
    stride_dym,
    stride_dsm,
    stride_dxm,
    eps,
    HAS_DS: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    # [BD] this program's share of dw
    b_dw = tl.zeros([BD], dtype=tl.float32)
    row_start = i_p * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for i0 in range(row_start, row_end, BM):
        o_m = i0 + tl.arange(0, BM)
        m_x = (o_m < row_end)[:, None] & m_d[None, :]
        o_m = o_m.to(tl.int64)
        # [BM, BD]
        b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + o_d[None, :], mask=m_x, other=0.0)
        b_dy = tl.load(dy_ptr + o_m[:, None] * stride_dym + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)
        b_xf = b_x.to(tl.float32)
        # [BM], as the forward computes it
        b_rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(b_xf * b_xf, axis=1) / D + eps))
        b_xh = b_xf * b_rstd[:, None]
        b_n = b_xh.to(b_x.dtype).to(tl.float32)
        b_dw += tl.sum(b_dy * b_n, axis=0)
        b_dn = b_dy * b_w[None, :]
        b_c = tl.sum(b_dn * b_xh, axis=1) / D
        b_dx = b_rstd[:, None] * (b_dn - b_xh * b_c[:, None])
        if HAS_DS:
            b_dx += tl.load(ds_ptr + o_m[:, None] * stride_dsm + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)
        tl.store(dx_ptr + o_m[:, None] * stride_dxm + o_d[None, :], b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)
    tl.store(dw_ptr + i_p * D + o_d, b_dw, mask=m_d)


def _tiles(d: int) -> tuple[int, int, int]:
    """``(BM, BD, num_warps)``: the forward's rows per program and warps for rows of width ``d``."""
    cfg = select_config(d)
    return cfg.block_m, triton.next_power_of_2(d), cfg.num_warps


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """``t`` as ``[rows, d]`` with a unit last stride, copied only when it cannot be viewed so."""
    rows = t.reshape(-1, d)
    return rows if d == 1 or rows.stride(1) == 1 else rows.contiguous()


@triton_op("penguin::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    x_rows = _rows(x, d)
    dy_rows = _rows(dy, d)
    ds_rows = None if ds is None else _rows(ds, d)
    m = x_rows.shape[0]
    dx = torch.empty((m, d), dtype=x.dtype, device=x.device)
    if m == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    bm, bd, num_warps = _tiles(d)
    n_blocks = triton.cdiv(m, bm)
    # the interpreter is described as one SM: a few partials there still exercise the reduction
    n_prog = min(n_blocks, _PROGRAMS_PER_SM * device_info(x.device).sm_count)
    rows_per_program = triton.cdiv(n_blocks, n_prog) * bm
    n_prog = triton.cdiv(m, rows_per_program)
    partial = torch.empty((n_prog, d), dtype=torch.float32, device=x.device)
    wrap_triton(_rms_norm_bwd_kernel)[(n_prog,)](
        x_rows,
        weight,
        dy_rows,
        dy_rows if ds_rows is None else ds_rows,
        dx,
        partial,
        m,
        d,
        rows_per_program,
        x_rows.stride(0),
        dy_rows.stride(0),
        0 if ds_rows is None else ds_rows.stride(0),
        dx.stride(0),
        eps,
        HAS_DS=ds_rows is not None,
        BM=bm,
        BD=bd,
        num_warps=num_warps,
    )
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, ds: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` of ``rms_norm(x, weight, eps)`` for the output gradient ``dy``.

    With ``ds`` (the gradient of ``rms_norm_residual``'s sum output, ``x`` then being that sum),
    ``dx`` also carries ``ds``: it is the gradient of both ``x`` and ``residual``. ``dx`` has the
    shape and dtype of ``x``; ``dweight`` is summed over rows in float32, deterministically.
    """
    return torch.ops.penguin.rms_norm_backward(dy, x, weight, ds, float(eps))


def _setup_norm(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward_norm(ctx, dy: torch.Tensor):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.penguin.rms_norm_backward(dy, x, weight, None, ctx.eps)
    return dx, dw, None


def _setup_norm_residual(ctx, inputs, output) -> None:
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _backward_norm_residual(ctx, dy: torch.Tensor, ds: torch.Tensor):
    s, weight = ctx.saved_tensors
    dx, dw = torch.ops.penguin.rms_norm_backward(dy, s, weight, ds, ctx.eps)
    return dx, dx, dw, None


_rms_norm_op.register_autograd(_backward_norm, setup_context=_setup_norm)
_rms_norm_residual_op.register_autograd(_backward_norm_residual, setup_context=_setup_norm_residual)


def compile_cases(arch: int) -> list[CompileCase]:
    """The backward at the released hidden size (1024) and at 4096, plain and fused, bf16 and float32."""
    from penguin_kernels.compile_case import CompileCase

    ints = ("M", "D", "rows_per_program", "stride_xm", "stride_dym", "stride_dsm", "stride_dxm")
    cases = []
    for dtype in ("bf16", "fp32"):
        for d in (1024, 4096):
            bm, bd, num_warps = _tiles(d)
            for residual in (False, True):
                ptr = f"*{dtype}"
                cases.append(
                    CompileCase(
                        name=f"rms_norm_bwd_{dtype}_D{d}{'_residual' if residual else ''}",
                        fn=_rms_norm_bwd_kernel,
                        signature={"x_ptr": ptr, "w_ptr": ptr, "dy_ptr": ptr, "ds_ptr": ptr, "dx_ptr": ptr}
                        | {"dw_ptr": "*fp32", "eps": "fp32"}
                        | dict.fromkeys(ints, "i32"),
                        constexprs={"HAS_DS": residual, "BM": bm, "BD": bd},
                        num_warps=num_warps,
                        num_stages=1,
                        aligned=("D", *ints[3:]),
                    )
                )
    return cases
