"""Backward of :func:`penguin_kernels.rope.qk_norm_rope_2d`: through the 2D rotary and both RMSNorms.

Per token and head, ``(c_r, s_r)`` and ``(c_c, s_c)`` the cos/sin of the row and column angles (the
forward's, rounded to the input dtype), ``r = 1 / sqrt(mean(x^2) + eps)``, ``x^ = x r``, ``n =
cast(x^)`` and ``do = (do1, do2)`` the gradient of the output halves::

    dy1 = do1 c_r + do2 s_c            dy2 = do2 c_c - do1 s_r       (rotary transposed)
    dw  = sum_{tokens, heads} dy * n                                 (per weight, q's and k's)
    dn  = dy * w
    dx  = r (dn - x^ mean(dn * x^))                                  (RMSNorm)

The forward's roundings are identities here, so the gradient is that of the float32 chain.

Design: a program owns ``BLOCK_N`` tokens, computes their angles once (as the forward does, with
its :func:`penguin_kernels.rope._sincos`) and walks the q heads and then the k heads, each read
once (x and the output gradient) and written once; ``r`` is recomputed, nothing extra is saved by
the forward. Weight gradients accumulate in float32 registers per program, one ``[2, hd]`` partial
per program is written and the partials are summed in a fixed order afterwards: deterministic,
no atomics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from penguin_kernels._checks import traceable
from penguin_kernels.rope import _NUM_WARPS, _qk_norm_rope_2d_op, _sincos, select_config

if TYPE_CHECKING:
    from penguin_kernels.compile_case import CompileCase

__all__ = ["qk_norm_rope_2d_backward", "compile_cases"]


@triton.jit
def _head_bwd(
    p_x,
    p_do,
    p_dx,
    o_x,
    o_do,
    o_dx,
    m_n,
    b_w1,
    b_w2,
    b_cos_r,
    b_sin_r,
    b_cos_c,
    b_sin_c,
    eps,
    HD: tl.constexpr,
):
    """Write one head's ``dx`` for a token block; return its ``(dw1, dw2)`` ``[BLOCK_N, HD/2]`` terms."""
    o_d = tl.arange(0, HD // 2)
    p_x = p_x + o_x[:, None] + o_d[None, :]
    p_do = p_do + o_do[:, None] + o_d[None, :]
    # [BLOCK_N, HD/2] each
    b_x1 = tl.load(p_x, mask=m_n[:, None], other=0.0)
    b_x2 = tl.load(p_x + HD // 2, mask=m_n[:, None], other=0.0)
    b_do1 = tl.load(p_do, mask=m_n[:, None], other=0.0).to(tl.float32)
    b_do2 = tl.load(p_do + HD // 2, mask=m_n[:, None], other=0.0).to(tl.float32)
    dtype = b_x1.dtype
    b_x1 = b_x1.to(tl.float32)
    b_x2 = b_x2.to(tl.float32)
    b_rstd = tl.math.rsqrt(tl.sum(b_x1 * b_x1 + b_x2 * b_x2, axis=1) * (1.0 / HD) + eps)
    b_xh1 = b_x1 * b_rstd[:, None]
    b_xh2 = b_x2 * b_rstd[:, None]
    b_dy1 = b_do1 * b_cos_r + b_do2 * b_sin_c
    b_dy2 = b_do2 * b_cos_c - b_do1 * b_sin_r
    b_dn1 = b_dy1 * b_w1[None, :]
    b_dn2 = b_dy2 * b_w2[None, :]
    b_c = tl.sum(b_dn1 * b_xh1 + b_dn2 * b_xh2, axis=1) * (1.0 / HD)
    b_dx1 = b_rstd[:, None] * (b_dn1 - b_xh1 * b_c[:, None])
    b_dx2 = b_rstd[:, None] * (b_dn2 - b_xh2 * b_c[:, None])
    p_dx = p_dx + o_dx[:, None] + o_d[None, :]
    tl.store(p_dx, b_dx1.to(dtype), mask=m_n[:, None])
    tl.store(p_dx + HD // 2, b_dx2.to(dtype), mask=m_n[:, None])
    return b_dy1 * b_xh1.to(dtype).to(tl.float32), b_dy2 * b_xh2.to(dtype).to(tl.float32)


@triton.jit
def _heads_bwd(
    x,
    dx_out,
    dx,
    w,
    n_heads,
    stride_xn,
    stride_xh,
    stride_dxon,
    stride_dxoh,
    o_n,
    o_d,
    m_n,
    b_cos_r,
    b_sin_r,
    b_cos_c,
    b_sin_c,
    eps,
    HD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Every head of q (or of k) in one block of tokens: writes ``dx`` and returns the block's two
    halves of the norm weight's gradient, ``[HD/2]`` float32 each, summed over heads and tokens."""
    # [BLOCK_N, HD/2] float32 weight-gradient terms, summed over heads here and over tokens at the end
    b_dw1 = tl.zeros([BLOCK_N, HD // 2], dtype=tl.float32)
    b_dw2 = tl.zeros([BLOCK_N, HD // 2], dtype=tl.float32)
    b_w1 = tl.load(w + o_d).to(tl.float32)
    b_w2 = tl.load(w + HD // 2 + o_d).to(tl.float32)
    for i_h in range(0, n_heads):
        t1, t2 = _head_bwd(
            x + tl.cast(i_h, tl.int64) * stride_xh,
            dx_out + tl.cast(i_h, tl.int64) * stride_dxoh,
            dx + i_h * HD,
            o_n * stride_xn,
            o_n * stride_dxon,
            o_n * (n_heads * HD),
            m_n,
            b_w1,
            b_w2,
            b_cos_r,
            b_sin_r,
            b_cos_c,
            b_sin_c,
            eps,
            HD,
        )
        b_dw1 += t1
        b_dw2 += t2
    return tl.sum(b_dw1, axis=0), tl.sum(b_dw2, axis=0)


@triton.jit
def _qk_norm_rope_2d_bwd_kernel(
    q,
    k,
    dq_out,
    dk_out,
    dq,
    dk,
    q_w,
    k_w,
    dw,
    pos,
    inv_freq,
    n_tokens,
    n_q_heads,
    n_kv_heads,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_dqon,
    stride_dqoh,
    stride_dkon,
    stride_dkoh,
    stride_pn,
    stride_pc,
    eps,
    HD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_n = tl.program_id(0)
    dtype: tl.constexpr = dq.dtype.element_ty
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n_tokens
    o_d = tl.arange(0, HD // 2)

    # the forward's angles, cos and sin, bit for bit
    b_row = tl.load(pos + o_n * stride_pn, mask=m_n, other=0).to(tl.float32)
    b_col = tl.load(pos + o_n * stride_pn + stride_pc, mask=m_n, other=0).to(tl.float32)
    b_f = tl.load(inv_freq + o_d)
    b_sin_r, b_cos_r = _sincos(b_row[:, None] * b_f[None, :])
    b_sin_c, b_cos_c = _sincos(b_col[:, None] * b_f[None, :])
    b_sin_r = b_sin_r.to(dtype).to(tl.float32)
    b_cos_r = b_cos_r.to(dtype).to(tl.float32)
    b_sin_c = b_sin_c.to(dtype).to(tl.float32)
    b_cos_c = b_cos_c.to(dtype).to(tl.float32)

    # weight gradients: float32, per block of tokens, summed over the blocks by the caller
    p_dw = dw + i_n.to(tl.int64) * 2 * HD + o_d
    b_dw1, b_dw2 = _heads_bwd(
        q, dq_out, dq, q_w, n_q_heads, stride_qn, stride_qh, stride_dqon, stride_dqoh,
        o_n, o_d, m_n, b_cos_r, b_sin_r, b_cos_c, b_sin_c, eps, HD, BLOCK_N,
    )  # fmt: skip
    tl.store(p_dw, b_dw1)
    tl.store(p_dw + HD // 2, b_dw2)
    b_dw1, b_dw2 = _heads_bwd(
        k, dk_out, dk, k_w, n_kv_heads, stride_kn, stride_kh, stride_dkon, stride_dkoh,
        o_n, o_d, m_n, b_cos_r, b_sin_r, b_cos_c, b_sin_c, eps, HD, BLOCK_N,
    )  # fmt: skip
    tl.store(p_dw + HD, b_dw1)
    tl.store(p_dw + HD + HD // 2, b_dw2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_op("penguin::qk_norm_rope_2d_backward", mutates_args=())
def _qk_norm_rope_2d_backward_op(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, h, hd = q.shape
    kv = k.shape[1]
    dq = torch.empty((n, h, hd), dtype=q.dtype, device=q.device)
    dk = torch.empty((n, kv, hd), dtype=k.dtype, device=k.device)
    if n == 0:
        return dq, dk, torch.zeros_like(q_norm_weight), torch.zeros_like(k_norm_weight)
    dq_out = _unit_last(dq_out)
    dk_out = _unit_last(dk_out)
    block_n = select_config(hd).block_n
    n_blocks = triton.cdiv(n, block_n)
    partial = torch.empty((n_blocks, 2, hd), dtype=torch.float32, device=q.device)
    traceable(_qk_norm_rope_2d_bwd_kernel)[(n_blocks,)](
        q,
        k,
        dq_out,
        dk_out,
        dq,
        dk,
        q_norm_weight,
        k_norm_weight,
        partial,
        positions,
        inv_freq,
        n,
        h,
        kv,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        dq_out.stride(0),
        dq_out.stride(1),
        dk_out.stride(0),
        dk_out.stride(1),
        positions.stride(0),
        positions.stride(1),
        eps,
        HD=hd,
        BLOCK_N=block_n,
        num_warps=_NUM_WARPS,
    )
    dwq = partial[:, 0].sum(0).to(q_norm_weight.dtype)
    dwk = partial[:, 1].sum(0).to(k_norm_weight.dtype)
    return dq, dk, dwq, dwk


def qk_norm_rope_2d_backward(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dq_norm_weight, dk_norm_weight)`` of ``torch.ops.penguin.qk_norm_rope_2d``.

    Inputs as the op takes them (``inv_freq`` the float32 rotary frequencies), trusted. ``dq`` and
    ``dk`` are new contiguous tensors in q's dtype; the weight gradients are summed over tokens and
    heads in float32, deterministically, then rounded to the weights' dtype.
    """
    return torch.ops.penguin.qk_norm_rope_2d_backward(
        dq_out, dk_out, q, k, q_norm_weight, k_norm_weight, positions, inv_freq, float(eps)
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, q_norm_weight, k_norm_weight, positions, inv_freq, eps = inputs
    ctx.save_for_backward(q, k, q_norm_weight, k_norm_weight, positions, inv_freq)
    ctx.eps = eps


def _backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
    q, k, q_norm_weight, k_norm_weight, positions, inv_freq = ctx.saved_tensors
    dq, dk, dwq, dwk = torch.ops.penguin.qk_norm_rope_2d_backward(
        dq_out, dk_out, q, k, q_norm_weight, k_norm_weight, positions, inv_freq, ctx.eps
    )
    return dq, dk, dwq, dwk, None, None, None


_qk_norm_rope_2d_op.register_autograd(_backward, setup_context=_setup_context)


def compile_cases(arch: int) -> list[CompileCase]:
    """The backward in bf16 and float32 at head dims 64 and 128 (the config does not depend on ``arch``)."""
    from penguin_kernels.compile_case import CompileCase

    ints = ("n_tokens", "n_q_heads", "n_kv_heads")
    strides = ("stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_dqon", "stride_dqoh", "stride_dkon")
    strides += ("stride_dkoh", "stride_pn")
    cases = []
    for dtype in ("bf16", "fp32"):
        for hd in (64, 128):
            signature = {name: f"*{dtype}" for name in ("q", "k", "dq_out", "dk_out", "dq", "dk", "q_w", "k_w")}
            signature |= {"dw": "*fp32", "pos": "*i32", "inv_freq": "*fp32", "eps": "fp32"}
            signature |= dict.fromkeys(ints + strides, "i32")
            cases.append(
                CompileCase(
                    name=f"qk_norm_rope_2d_bwd_{dtype}_hd{hd}",
                    fn=_qk_norm_rope_2d_bwd_kernel,
                    signature=signature,
                    constexprs={"HD": hd, "BLOCK_N": select_config(hd).block_n, "stride_pc": 1},
                    num_warps=_NUM_WARPS,
                    aligned=strides[:-1],
                )
            )
    return cases
