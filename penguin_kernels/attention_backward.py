"""Backward of :mod:`penguin_kernels.attention`: dq, dk, dv of bidirectional varlen GQA attention.

The math, per segment and query head ``h`` reading KV head ``g(h)``, ``s`` the softmax scale and
``lse`` the forward's natural-log log-sum-exp of each row of scaled scores::

    P[i, j]  = exp(s q[i] . k[j] - lse[i])                   recomputed, never stored
    delta[i] = sum_d dO[i, d] O[i, d]                         = sum_j P[i, j] dP[i, j]
    dP[i, j] = dO[i] . v[j]
    dS[i, j] = P[i, j] (dP[i, j] - delta[i])
    dq[i]    = s sum_j dS[i, j] k[j]
    dk[j]    = s sum_{h in group} sum_i dS[i, j] q[i]
    dv[j]    = sum_{h in group} sum_i P[i, j] dO[i]

Three launches, as in FlashAttention-2: a preprocess writes ``delta`` (float32 ``[N, H]``); one
kernel per (key block, KV head) holds its keys and values and their float32 gradient accumulators
while it loops over every query block of its segment and every query head of its GQA group; one
kernel per (query block, head group) holds its queries and dq accumulator while it loops over the
key blocks of its segment. Nothing is ``[N, N]``: a ``[BLOCK_N, BLOCK_M]`` (or ``[BLOCK_M,
BLOCK_N]``) score tile lives in registers.

Design:

* **Deterministic, no atomics.** dk and dv sum over the query heads of a group inside one program,
  in a fixed order, so the result does not depend on scheduling (flash-attn's
  ``deterministic=True``) and no ``[N, H, hd]`` float32 scratch or reduction pass is needed. An
  atomic dq (one kernel walking query blocks and adding into dq) would save re-reading K/V and
  recomputing ``q k^T`` once, but float32 atomics are non-deterministic and need a float32 dq
  buffer plus a cast pass; with the group loop the two-kernel split costs one extra ``q k^T`` and
  ``dO v^T`` per tile (2 of the backward's 5 matmuls of work), which is what flash-attn 2 pays in
  its deterministic mode too. No atomic variant is shipped.
* **Tiles and scheduling** follow the forward: block tables from
  :mod:`penguin_kernels.block_table` (one row per key block for the dk/dv kernel, per
  query block for the dq kernel), so short segments spawn no idle programs; query heads of a
  group are packed ``PACK`` to a tile's rows as in the forward (row ``r``: token ``r // PACK``, head
  ``r % PACK``). The dk/dv kernel computes transposed tiles ``k q^T`` ``[BLOCK_N, BLOCK_M]`` so that
  its two accumulations (``P^T dO`` and ``dS^T q``) are plain ``dot`` calls with the keys as rows.
* **Masking.** Query rows past the segment load ``lse = +inf`` and ``dO = 0``: their ``P`` and
  ``dS`` are exactly 0. In the dq kernel only the last, partial key block of a segment is masked
  (``P = 0`` on the keys past it); the full blocks before it run unmasked. Key rows past the
  segment in the dk/dv kernel load zeros and are never stored.
* **Offsets.** Token offsets are int64 before they meet a stride (N * row stride may pass 2^31).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from penguin_kernels._checks import dot_precision, traceable
from penguin_kernels.attention import (
    _LOG2E,
    _load_rows,
    _scores,
    _varlen_attention_op,
)
from penguin_kernels.attention_configs import heads_per_tile, select_backward_configs
from penguin_kernels.block_table import FIELDS, fill_block_table, table_rows
from penguin_kernels.device import describe_arch, device_info

if TYPE_CHECKING:
    from penguin_kernels.compile_case import CompileCase

__all__ = ["varlen_attention_backward", "compile_cases"]

_DELTA_TOKENS = 16
_DELTA_WARPS = 4


@triton.jit
def _delta_kernel(
    o,
    do,
    delta,
    n_tokens,
    n_heads,
    stride_on,
    stride_oh,
    stride_don,
    stride_doh,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``delta[n, h] = sum_d dO[n, h, d] O[n, h, d]`` in float32 for ``BLOCK_T`` tokens of one head."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    m_t = o_t < n_tokens
    o_d = tl.arange(0, HEAD_DIM)
    # [BLOCK_T, HD]
    b_o = tl.load(o + (o_t * stride_on + i_h * stride_oh)[:, None] + o_d[None, :], mask=m_t[:, None], other=0.0)
    b_do = tl.load(do + (o_t * stride_don + i_h * stride_doh)[:, None] + o_d[None, :], mask=m_t[:, None], other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)
    tl.store(delta + o_t * n_heads + i_h, b_delta, mask=m_t)


@triton.jit
def _dkdv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    plan,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_don,
    stride_doh,
    stride_dkn,
    stride_dkh,
    stride_dvn,
    stride_dvh,
    n_heads,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    PACK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_b, i_kv = tl.program_id(0), tl.program_id(1)
    bos = tl.load(plan + i_b * 4)
    eos = tl.load(plan + i_b * 4 + 1)
    k_start = tl.load(plan + i_b * 4 + 2)
    if k_start >= eos:
        return
    dtype = q.dtype.element_ty
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_n = k_start + o_n < eos
    # [BN, HD]; rows past the segment are zeros, computed harmlessly and never stored
    b_k = tl.load(
        k + k_start.to(tl.int64) * stride_kn + i_kv * stride_kh + (o_n * stride_kn)[:, None] + o_d[None, :],
        mask=m_n[:, None],
        other=0.0,
    )
    b_v = tl.load(
        v + k_start.to(tl.int64) * stride_vn + i_kv * stride_vh + (o_n * stride_vn)[:, None] + o_d[None, :],
        mask=m_n[:, None],
        other=0.0,
    )
    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # row r of a query tile is token r // PACK, head r % PACK of the current head chunk
    o_r = tl.arange(0, BLOCK_M)
    o_t = o_r // PACK
    o_hp = o_r % PACK
    TOKENS: tl.constexpr = BLOCK_M // PACK
    seqlen = eos - bos
    for i_hc in range(0, GROUP // PACK):
        i_h = i_kv * GROUP + i_hc * PACK
        p_q = q + bos.to(tl.int64) * stride_qn + i_h * stride_qh + (o_t * stride_qn + o_hp * stride_qh)[:, None]
        p_do = do + bos.to(tl.int64) * stride_don + i_h * stride_doh + (o_t * stride_don + o_hp * stride_doh)[:, None]
        p_l = bos.to(tl.int64) * n_heads + i_h + o_t * n_heads + o_hp
        for t0 in range(0, seqlen, TOKENS):
            m_r = t0 + o_t < seqlen
            # [BM, HD]
            b_q = tl.load(p_q + o_d[None, :], mask=m_r[:, None], other=0.0)
            b_do = tl.load(p_do + o_d[None, :], mask=m_r[:, None], other=0.0)
            # [BM]; +inf makes P of rows past the segment exactly 0
            b_lse = tl.load(lse + p_l, mask=m_r, other=float("inf")) * 1.4426950408889634
            b_delta = tl.load(delta + p_l, mask=m_r, other=0.0)
            # [BN, BM]
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)
            b_pt = tl.math.exp2(tl.fma(b_st, qk_scale, -b_lse[None, :]))
            b_dv = tl.dot(b_pt.to(dtype), b_do, b_dv, input_precision=DOT_PRECISION)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk = tl.dot(b_dst.to(dtype), b_q, b_dk, input_precision=DOT_PRECISION)
            p_q += TOKENS * stride_qn
            p_do += TOKENS * stride_don
            p_l += TOKENS * n_heads

    p_dk = dk + k_start.to(tl.int64) * stride_dkn + i_kv * stride_dkh + (o_n * stride_dkn)[:, None] + o_d[None, :]
    p_dv = dv + k_start.to(tl.int64) * stride_dvn + i_kv * stride_dvh + (o_n * stride_dvn)[:, None] + o_d[None, :]
    tl.store(p_dk, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_n[:, None])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _dq_block(
    b_dq,
    b_q,
    b_do,
    b_lse,
    b_delta,
    p_q,
    p_do,
    m_r,
    k_base,
    v_base,
    o_k,
    o_kc,
    o_vc,
    m_n,
    qk_scale,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Add one key block's ``dS k`` to ``b_dq`` ``[BM, HD]``; ``m_n`` masks keys when ``MASKED``.

    ``b_q``/``b_do`` hold the first ``HEAD_CHUNK`` columns of q and dO (``p_q``/``p_do`` point at
    them); ``o_kc``/``o_vc`` address that many columns of a key block and ``o_k`` all of them.
    """
    # [BN, HD]
    b_k = _load_rows(k_base + o_k, m_n, MASKED)
    # [BM, BN]
    if HEAD_CHUNK == HEAD_DIM:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        b_dp = tl.dot(b_do, tl.trans(_load_rows(v_base + o_vc, m_n, MASKED)), input_precision=DOT_PRECISION)
    else:
        # float32 CUDA-core dots hold whole operand rows per thread: over head_dim chunks, as the forward
        b_s = _scores(b_q, p_q, m_r, k_base + o_kc, m_n, MASKED, HEAD_DIM, HEAD_CHUNK, DOT_PRECISION)
        b_dp = _scores(b_do, p_do, m_r, v_base + o_vc, m_n, MASKED, HEAD_DIM, HEAD_CHUNK, DOT_PRECISION)
    b_p = tl.math.exp2(tl.fma(b_s, qk_scale, -b_lse[:, None]))
    if MASKED:
        b_p = tl.where(m_n[None, :], b_p, 0.0)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PRECISION)


@triton.jit
def _dq_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dq,
    plan,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_don,
    stride_doh,
    stride_dqn,
    stride_dqh,
    n_heads,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_CHUNK: tl.constexpr,
    GROUP: tl.constexpr,
    PACK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_b, i_g = tl.program_id(0), tl.program_id(1)
    bos = tl.load(plan + i_b * 4)
    eos = tl.load(plan + i_b * 4 + 1)
    q_start = tl.load(plan + i_b * 4 + 2)
    if q_start >= eos:
        return
    i_h = i_g * PACK
    i_kv = i_h // GROUP

    o_r = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    o_c = tl.arange(0, HEAD_CHUNK)
    # row r of the tile is token q_start + r // PACK, head i_h + r % PACK
    o_t = o_r // PACK
    o_hp = o_r % PACK
    m_r = q_start + o_t < eos
    o_row = q_start.to(tl.int64)
    # [BM, HC]; rows past the segment load zeros and are never stored
    p_q = q + o_row * stride_qn + i_h * stride_qh + (o_t * stride_qn + o_hp * stride_qh)[:, None] + o_c[None, :]
    p_do = do + o_row * stride_don + i_h * stride_doh + (o_t * stride_don + o_hp * stride_doh)[:, None] + o_c[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)
    b_do = tl.load(p_do, mask=m_r[:, None], other=0.0)
    p_l = o_row * n_heads + i_h + o_t * n_heads + o_hp
    # [BM]
    b_lse = tl.load(lse + p_l, mask=m_r, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta + p_l, mask=m_r, other=0.0)

    k_base = k + bos.to(tl.int64) * stride_kn + i_kv * stride_kh
    v_base = v + bos.to(tl.int64) * stride_vn + i_kv * stride_vh
    o_k = o_n[:, None] * stride_kn + o_d[None, :]
    o_kc = o_n[:, None] * stride_kn + o_c[None, :]
    o_vc = o_n[:, None] * stride_vn + o_c[None, :]
    b_dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    seqlen = eos - bos
    n_full = seqlen - seqlen % BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        b_dq = _dq_block(
            b_dq, b_q, b_do, b_lse, b_delta, p_q, p_do, m_r, k_base, v_base, o_k, o_kc, o_vc, o_n, qk_scale,
            False, HEAD_DIM, HEAD_CHUNK, DOT_PRECISION,
        )  # fmt: skip
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    if n_full < seqlen:
        m_n = o_n < seqlen - n_full
        b_dq = _dq_block(
            b_dq, b_q, b_do, b_lse, b_delta, p_q, p_do, m_r, k_base, v_base, o_k, o_kc, o_vc, m_n, qk_scale,
            True, HEAD_DIM, HEAD_CHUNK, DOT_PRECISION,
        )  # fmt: skip

    p_dq = dq + o_row * stride_dqn + i_h * stride_dqh + (o_t * stride_dqn + o_hp * stride_dqh)[:, None] + o_d[None, :]
    tl.store(p_dq, (b_dq * sm_scale).to(dq.dtype.element_ty), mask=m_r[:, None])


def _plan(cu_seqlens: torch.Tensor, n: int, max_seqlen: int, tokens: int) -> torch.Tensor:
    """The forward's block table, ``tokens`` per block; bounded without reading ``cu_seqlens``."""
    rows = table_rows(n, cu_seqlens.numel() - 1, max_seqlen, tokens)
    table = torch.empty((rows, FIELDS), dtype=torch.int32, device=cu_seqlens.device)
    return fill_block_table(cu_seqlens, table, tokens) if rows else table


@triton_op("penguin::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, h, hd = q.shape
    kv = k.shape[1]
    dq = torch.empty((n, h, hd), dtype=q.dtype, device=q.device)
    dk = torch.empty((n, kv, hd), dtype=q.dtype, device=q.device)
    dv = torch.empty((n, kv, hd), dtype=q.dtype, device=q.device)
    n_seg = cu_seqlens.numel() - 1
    if n == 0 or n_seg == 0 or max_seqlen == 0:
        return dq, dk, dv
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = torch.empty((n, h), dtype=torch.float32, device=q.device)
    traceable(_delta_kernel)[(triton.cdiv(n, _DELTA_TOKENS), h)](
        out,
        dout,
        delta,
        n,
        h,
        out.stride(0),
        out.stride(1),
        dout.stride(0),
        dout.stride(1),
        HEAD_DIM=hd,
        BLOCK_T=_DELTA_TOKENS,
        num_warps=_DELTA_WARPS,
    )
    group = h // kv
    scale = hd**-0.5 if softmax_scale is None else softmax_scale
    precision = dot_precision(q.dtype)
    cfg_kv, cfg_q = select_backward_configs(device_info(q.device), q.dtype, hd)

    pack = heads_per_tile(group, cfg_kv)
    plan = _plan(cu_seqlens, n, max_seqlen, cfg_kv.block_n)
    traceable(_dkdv_kernel)[(plan.shape[0], kv)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        plan,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        h,
        scale * _LOG2E,
        scale,
        HEAD_DIM=hd,
        GROUP=group,
        PACK=pack,
        BLOCK_M=cfg_kv.block_m,
        BLOCK_N=cfg_kv.block_n,
        DOT_PRECISION=precision,
        num_warps=cfg_kv.num_warps,
        num_stages=cfg_kv.num_stages,
    )

    pack = heads_per_tile(group, cfg_q)
    plan = _plan(cu_seqlens, n, max_seqlen, cfg_q.block_m // pack)
    traceable(_dq_kernel)[(plan.shape[0], h // pack)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        plan,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
        dq.stride(0),
        dq.stride(1),
        h,
        scale * _LOG2E,
        scale,
        HEAD_DIM=hd,
        HEAD_CHUNK=cfg_q.head_chunk or hd,
        GROUP=group,
        PACK=pack,
        BLOCK_M=cfg_q.block_m,
        BLOCK_N=cfg_q.block_n,
        DOT_PRECISION=precision,
        num_warps=cfg_q.num_warps,
        num_stages=cfg_q.num_stages,
    )
    return dq, dk, dv


def varlen_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``torch.ops.penguin.varlen_attention`` for the gradient ``dout`` of ``out``.

    ``out`` and ``lse`` are the op's outputs for ``q, k, v, cu_seqlens, max_seqlen, softmax_scale``,
    trusted as the op trusts its inputs. ``dk`` and ``dv`` are summed over each GQA group. All three
    are new contiguous tensors in q's dtype; accumulation runs in float32.
    """
    return torch.ops.penguin.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.penguin.varlen_attention_backward(
        dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


def compile_cases(arch: int) -> list[CompileCase]:
    """Every shipped 16-bit config for ``sm_<arch>`` (bf16, head_dim 64 and 128, GQA 2 and 8), float32 at
    head_dim 64 and 128, and the preprocess."""
    from penguin_kernels.compile_case import CompileCase

    device = describe_arch(arch)
    tensors = ("q", "k", "v", "do")
    cases = [
        CompileCase(
            name="delta_bf16_hd128",
            fn=_delta_kernel,
            signature={"o": "*bf16", "do": "*bf16", "delta": "*fp32"}
            | dict.fromkeys(("n_tokens", "n_heads", "stride_on", "stride_oh", "stride_don", "stride_doh"), "i32"),
            constexprs={"HEAD_DIM": 128, "BLOCK_T": _DELTA_TOKENS},
            num_warps=_DELTA_WARPS,
            num_stages=1,
            aligned=("stride_on", "stride_oh", "stride_don", "stride_doh"),
        )
    ]
    shapes = [("bf16", hd, group) for hd in (64, 128) for group in (2, 8)] + [("fp32", hd, 2) for hd in (64, 128)]
    for name, hd, group in shapes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        cfg_kv, cfg_q = select_backward_configs(device, dtype, hd)
        for kernel, cfg, grads in ((_dkdv_kernel, cfg_kv, ("dk", "dv")), (_dq_kernel, cfg_q, ("dq",))):
            strides = tuple(f"stride_{t}{axis}" for t in tensors + grads for axis in "nh")
            signature = {t: f"*{name}" for t in tensors + grads}
            signature |= {"lse": "*fp32", "delta": "*fp32", "plan": "*i32", "n_heads": "i32"}
            signature |= {"qk_scale": "fp32", "sm_scale": "fp32"} | dict.fromkeys(strides, "i32")
            cases.append(
                CompileCase(
                    name=f"{kernel.__name__.strip('_')}_{name}_hd{hd}_g{group}_bm{cfg.block_m}_bn{cfg.block_n}",
                    fn=kernel,
                    signature=signature,
                    constexprs={
                        "HEAD_DIM": hd,
                        **({"HEAD_CHUNK": cfg.head_chunk or hd} if kernel is _dq_kernel else {}),
                        "GROUP": group,
                        "PACK": heads_per_tile(group, cfg),
                        "BLOCK_M": cfg.block_m,
                        "BLOCK_N": cfg.block_n,
                        "DOT_PRECISION": dot_precision(dtype),
                    },
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    tensor_cores=dtype != torch.float32,
                    aligned=strides,
                )
            )
    return cases
