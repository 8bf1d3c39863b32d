"""The block table of a packed batch: one row per block of a segment's tokens, built on the device.

Attention (forward and backward) launches one program per block of ``TOKENS_PER_BLOCK`` tokens of
each segment of ``cu_seqlens``. One one-program kernel turns ``cu_seqlens`` into a table with one
``(bos, eos, first token)`` row per block, ``sum_i ceil(L_i / t)`` rows, so a program finds its
segment in one load round trip and thousands of short segments spawn no idle programs. The row
count is bounded on the host without reading ``cu_seqlens`` (:func:`table_rows`); spare rows hold an
empty range and their programs exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from penguin_kernels._checks import traceable
from penguin_kernels.compile_case import CompileCase

__all__ = ["FIELDS", "block_table_kernel", "table_rows", "fill_block_table", "compile_cases"]

# Fields per row: bos, eos, first token of the block, scratch.
FIELDS = 4
_BLOCK = 1024
_WARPS = 4


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


# The counts only bound loops and masks: one binary for every batch, not one per count % 16.
@triton.jit(do_not_specialize=["S", "n_plan"])
def block_table_kernel(
    cu_seqlens,
    plan,
    S,
    n_plan,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Fill ``plan`` ``[n_plan, 4]`` with one ``(bos, eos, q_start, -)`` row per query block.

    Three passes in one program: clear the scratch columns; every non-empty segment writes its index
    and its first row at its first row (those rows are distinct); a running max then carries both
    down to the segment's other rows. Rows past the last block get an empty range.
    """
    o_i = tl.arange(0, BLOCK)
    zeros = tl.zeros([BLOCK], dtype=tl.int32)
    for i0 in range(0, n_plan, BLOCK):
        o_p = i0 + o_i
        m_p = o_p < n_plan
        tl.store(plan + o_p * 4 + 2, zeros, mask=m_p)
        tl.store(plan + o_p * 4 + 3, zeros, mask=m_p)
    tl.debug_barrier()

    n_blocks = tl.full([], 0, dtype=tl.int32)
    for s0 in range(0, S, BLOCK):
        o_s = s0 + o_i
        m_s = o_s < S
        b_bos = tl.load(cu_seqlens + o_s, mask=m_s, other=0)
        b_eos = tl.load(cu_seqlens + o_s + 1, mask=m_s, other=0)
        b_cnt = (b_eos - b_bos + TOKENS_PER_BLOCK - 1) // TOKENS_PER_BLOCK
        b_first = n_blocks + tl.cumsum(b_cnt, 0) - b_cnt
        m_w = m_s & (b_cnt > 0) & (b_first < n_plan)
        tl.store(plan + b_first * 4 + 2, b_first, mask=m_w)
        tl.store(plan + b_first * 4 + 3, o_s, mask=m_w)
        n_blocks += tl.sum(b_cnt, 0)
    tl.debug_barrier()

    seg_carry = tl.full([], 0, dtype=tl.int32)
    first_carry = tl.full([], 0, dtype=tl.int32)
    for i0 in range(0, n_plan, BLOCK):
        o_p = i0 + o_i
        m_p = o_p < n_plan
        b_first = tl.load(plan + o_p * 4 + 2, mask=m_p, other=0)
        b_seg = tl.load(plan + o_p * 4 + 3, mask=m_p, other=0)
        b_first = tl.maximum(tl.associative_scan(b_first, 0, _max_combine), first_carry)
        b_seg = tl.maximum(tl.associative_scan(b_seg, 0, _max_combine), seg_carry)
        first_carry = tl.max(b_first, 0)
        seg_carry = tl.max(b_seg, 0)
        m_live = m_p & (o_p < n_blocks)
        b_bos = tl.load(cu_seqlens + b_seg, mask=m_live, other=0)
        b_eos = tl.load(cu_seqlens + b_seg + 1, mask=m_live, other=0)
        b_start = b_bos + (o_p - b_first) * TOKENS_PER_BLOCK
        tl.store(plan + o_p * 4, b_bos, mask=m_p)
        tl.store(plan + o_p * 4 + 1, b_eos, mask=m_p)
        tl.store(plan + o_p * 4 + 2, tl.where(m_live, b_start, 0), mask=m_p)


def table_rows(n: int, n_seg: int, max_seqlen: int, tokens: int) -> int:
    """Upper bound on ``sum_i ceil(L_i / tokens)`` from sizes alone (no read of ``cu_seqlens``)."""
    if not (n and n_seg and max_seqlen):
        return 0
    return min(-(-n // tokens) + n_seg, n_seg * -(-max_seqlen // tokens))


def fill_block_table(cu_seqlens: torch.Tensor, table: torch.Tensor, tokens: int) -> torch.Tensor:
    """Fill ``table`` ``[rows, FIELDS]`` (int32, rows from :func:`table_rows`) for ``tokens`` per block."""
    traceable(block_table_kernel)[(1,)](
        cu_seqlens,
        table,
        cu_seqlens.numel() - 1,
        table.shape[0],
        TOKENS_PER_BLOCK=tokens,
        BLOCK=_BLOCK,
        num_warps=_WARPS,
    )
    return table


def compile_cases(arch: int) -> list[CompileCase]:
    """The table kernel is the same for every architecture and tile size but its block count."""
    return [
        CompileCase(
            name="block_table",
            fn=block_table_kernel,
            signature={"cu_seqlens": "*i32", "plan": "*i32", "S": "i32", "n_plan": "i32"},
            constexprs={"TOKENS_PER_BLOCK": 64, "BLOCK": _BLOCK},
            num_warps=_WARPS,
            num_stages=1,
        )
    ]
