"""Bidirectional variable-length attention with grouped KV heads (GQA), one launch for a packed batch.

The math, for every segment ``[bos, eos)`` of ``cu_seqlens`` and every query head ``h``::

    O[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, g(h)]) v[j, g(h)]      bos <= i, j < eos
    g(h)    = h // (H // KV)

No causal mask; a token never sees another segment. The kernel streams the keys of its segment in
blocks of ``BLOCK_N`` and keeps an online softmax (running row max ``m``, row sum ``l``, unnormalised
output ``acc``) in float32, normalising once at the end.

Design, for Hopper first (sm_90), Ampere (sm_80) second:

* **Scheduling.** A tile holds ``t = BLOCK_M / PACK`` tokens. A one-program kernel turns
  ``cu_seqlens`` into a table with one row ``(bos, eos, first query token)`` per query block,
  ``sum_i ceil(L_i / t)`` rows. The attention grid is (table rows, head groups): a program finds
  its segment in one load round trip (no binary search of dependent loads), and thousands of short
  segments spawn no idle programs. The row count is bounded on the host without a sync,
  ``min(ceil(N / t) + S, S * ceil(max_seqlen / t))``; spare rows hold an empty range and exit.
  Blocks of one head group are adjacent in launch order, so the programs in flight share their
  segment's K/V through L2.
* **GQA.** The ``PACK`` query heads that share a KV head (a power of two dividing ``H // KV``, at
  most 8) are packed into the M dimension of the tile: row ``r`` is token ``r // PACK``, head
  ``r % PACK``. One K/V tile serves every head of the group, repeated K/V is never materialised,
  and a short segment fills ``PACK`` times more of its tile.
* **Inner loop.** Full key blocks run unmasked and software-pipelined (``num_stages`` K/V copies in
  flight); the one partial block at the end of a segment runs once, masked, after the loop. The
  scale is folded with ``log2(e)`` so each score costs one FMA and one ``exp2``; the row max is
  taken before scaling, which is why ``softmax_scale`` must be positive. ``p`` is cast to the
  input dtype once, as the register operand of the second MMA, which accumulates into ``acc``.
* **Tiles.** sm_90: BLOCK_M 128, BLOCK_N 128, 8 warps (two warpgroups issuing wgmma), 2 stages at
  head_dim 128 (254 registers, 161 KB of shared memory) and 3 at 64: no spills, under the 227 KB
  limit (sm_100, with as much shared memory, takes them too). Batches whose segments are at most 64
  tokens long use 64 x 64 tiles. sm_80 and the other GPUs: BLOCK_N 64 (at most 64 KB, so the 99 KB
  of sm_86/89/120 hold it too). Float32 (the parity dtype) runs IEEE dots on CUDA cores, ``q k^T``
  in head_dim chunks so that nothing spills; it is for parity runs, not speed.
* **Not used.** Tensor descriptors (TMA), warp specialisation and FA3-style ping-pong scheduling:
  the head packing's row mapping and the strided fused-QKV views do not map onto one descriptor
  box without reshaping tiles, and Triton 3.6 offers no warp-specialised attention loop on Hopper.
  Lazy (thresholded) rescaling of ``acc`` needs a tile-wide branch per block, a CTA-wide reduction
  in Triton. The shipped path, cp.async pipelining feeding wgmma, compiles alike on 3.6 and 3.9.
* **Offsets.** Token offsets are widened to int64 before they meet a stride, so N * row stride may
  exceed 2^31 (a million tokens of a fused QKV buffer); tile-local offsets stay int32.

:func:`varlen_attention` validates everything, including the values of ``cu_seqlens`` (one host
sync); the registered op ``torch.ops.penguin.varlen_attention`` checks only metadata (no sync, CUDA
graph capturable) and trusts ``cu_seqlens`` and ``max_seqlen``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from penguin_kernels._checks import (
    ShapeCache,
    check_float,
    check_like,
    dot_precision,
    runnable,
    signature,
    traceable,
)
from penguin_kernels.attention_configs import AttentionConfig, heads_per_tile, select_config
from penguin_kernels.block_table import FIELDS, fill_block_table, table_rows
from penguin_kernels.compile_case import CompileCase
from penguin_kernels.device import DTYPES, describe_arch, device_info

__all__ = ["AttentionConfig", "varlen_attention", "varlen_attention_op", "select_config", "compile_cases"]

SUPPORTED_HEAD_DIMS = (64, 128)
_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
# Every allocation of the op goes through this name, so tests can hand out poisoned buffers.
_empty = torch.empty


@triton.jit
def _load_rows(p, m_rows, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(p, mask=m_rows[:, None], other=0.0)
    return tl.load(p)


@triton.jit
def _scores(
    b_q,
    p_q,
    m_q,
    p_k,
    m_k,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``q k^T`` of one key block, ``[BM, BN]`` float32; ``m_k`` masks keys when ``MASKED``.

    ``p_q``/``p_k`` point at the first ``HEAD_CHUNK`` columns and ``b_q`` holds them. Below
    ``HEAD_DIM``, the product is summed over column chunks: a CUDA-core (float32) dot keeps whole
    rows of its operands in each thread, which spills at head_dim 128.
    """
    b_s = tl.dot(b_q, tl.trans(_load_rows(p_k, m_k, MASKED)), input_precision=DOT_PRECISION)
    for d0 in tl.static_range(HEAD_CHUNK, HEAD_DIM, HEAD_CHUNK):
        b_qc = tl.load(p_q + d0, mask=m_q[:, None], other=0.0)
        b_s += tl.dot(b_qc, tl.trans(_load_rows(p_k + d0, m_k, MASKED)), input_precision=DOT_PRECISION)
    return b_s


@triton.jit
def _online_softmax(
    acc,
    m_i,
    l_i,
    b_s,
    b_v,
    m_k,
    qk_scale,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold one key block's scores ``b_s`` and values ``b_v`` into ``(acc, m_i, l_i)``."""
    if MASKED:
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
    b_p = tl.math.exp2(tl.fma(b_s, qk_scale, -m_new[:, None]))
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    # [BM, HD]
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _varlen_attn_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    plan,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    n_heads,
    qk_scale,
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

    q_base = q + q_start.to(tl.int64) * stride_qn + i_h * stride_qh
    p_q = q_base + (o_t * stride_qn + o_hp * stride_qh)[:, None] + o_c[None, :]
    # [BM, HC]; rows past the segment load zeros, are computed harmlessly and never stored
    b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)

    # scalar int64 bases advanced per block, int32 tile offsets: fewer live registers than pointer tiles
    k_base = k + bos.to(tl.int64) * stride_kn + i_kv * stride_kh
    v_base = v + bos.to(tl.int64) * stride_vn + i_kv * stride_vh
    o_k = o_n[:, None] * stride_kn + o_c[None, :]
    o_v = o_n[:, None] * stride_vn + o_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    seqlen = eos - bos
    n_full = seqlen - seqlen % BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        # [BM, BN]
        b_s = _scores(b_q, p_q, m_r, k_base + o_k, o_n, False, HEAD_DIM, HEAD_CHUNK, DOT_PRECISION)
        # [BN, HD]
        b_v = tl.load(v_base + o_v)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, b_s, b_v, o_n, qk_scale, False, DOT_PRECISION)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    if n_full < seqlen:
        m_n = o_n < seqlen - n_full
        b_s = _scores(b_q, p_q, m_r, k_base + o_k, m_n, True, HEAD_DIM, HEAD_CHUNK, DOT_PRECISION)
        b_v = tl.load(v_base + o_v, mask=m_n[:, None], other=0.0)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, b_s, b_v, m_n, qk_scale, True, DOT_PRECISION)

    # every live row saw its own maximum, so l_i >= 1
    acc = acc * (1.0 / l_i)[:, None]
    o_base = o + q_start.to(tl.int64) * stride_on + i_h * stride_oh
    p_o = o_base + (o_t * stride_on + o_hp * stride_oh)[:, None] + o_d[None, :]
    tl.store(p_o, acc.to(o.dtype.element_ty), mask=m_r[:, None])
    # natural-log log-sum-exp of the scaled scores, [N, H] float32: what the backward recomputes P from
    p_lse = lse + q_start.to(tl.int64) * n_heads + i_h + o_t * n_heads + o_hp
    tl.store(p_lse, (m_i + tl.math.log2(l_i)) * _LN2, mask=m_r)


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Metadata checks only: no host sync."""
    check_float(q, "q")
    check_like(k, "k", q, "q")
    check_like(v, "v", q, "q")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [N, heads, head_dim], got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {t.stride()}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    n, h, hd = q.shape
    if k.shape[0] != n or k.shape[2] != hd:
        raise ValueError(f"k and v {tuple(k.shape)} must be [N, KV, head_dim] with q's N={n} and head_dim={hd}")
    kv = k.shape[1]
    if kv == 0 or h % kv:
        raise ValueError(f"q's heads ({h}) must be a positive multiple of k/v's heads ({kv})")
    if hd not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {hd}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype int32, got {str(cu_seqlens.dtype).removeprefix('torch.')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; they must match")


def _check_scale(softmax_scale: float | None) -> None:
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale}")


@triton_op("penguin::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, None)


class _Launch(NamedTuple):
    """The launches of one call, worked out from the inputs' metadata once their checks passed."""

    out_shape: tuple[int, int, int]
    n_seg: int
    n_plan: int
    tokens: int
    grid: tuple[int, int]
    strides: tuple[int, ...]
    qk_scale: float
    constexprs: dict[str, int | str]
    config: AttentionConfig


def _build_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None,
    config: AttentionConfig | None,
) -> _Launch:
    _check_tensors(q, k, v, cu_seqlens)
    _check_scale(softmax_scale)
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    n, h, hd = q.shape
    group = h // k.shape[1]
    n_seg = cu_seqlens.numel() - 1
    cfg = config or select_config(device_info(q.device), q.dtype, hd, max_seqlen)
    pack = heads_per_tile(group, cfg)
    tokens = cfg.block_m // pack
    n_plan = table_rows(n, n_seg, max_seqlen, tokens)
    scale = hd**-0.5 if softmax_scale is None else softmax_scale
    return _Launch(
        out_shape=(n, h, hd),
        n_seg=n_seg,
        n_plan=n_plan,
        tokens=tokens,
        grid=(n_plan, h // pack),
        strides=(*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], h * hd, hd),
        qk_scale=scale * _LOG2E,
        constexprs={
            "HEAD_DIM": hd,
            "HEAD_CHUNK": cfg.head_chunk or hd,
            "GROUP": group,
            "PACK": pack,
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "DOT_PRECISION": dot_precision(q.dtype),
        },
        config=cfg,
    )


_LAUNCHES = ShapeCache(_build_launch)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None,
    config: AttentionConfig | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launches of the op, with ``config`` in place of the shipped choice when given: ``(out, lse)``."""
    args = (q, k, v, cu_seqlens, max_seqlen, softmax_scale, config)
    try:
        key = (
            signature(q),
            runnable(q),
            signature(k),
            signature(v),
            signature(cu_seqlens),
            max_seqlen,
            softmax_scale,
            config,
        )
    except AttributeError:  # not a tensor: the checks say which
        launch = _build_launch(*args)
    else:
        launch = _LAUNCHES.get(key, *args)
    out = _empty(launch.out_shape, dtype=q.dtype, device=q.device)
    lse = _empty(launch.out_shape[:2], dtype=torch.float32, device=q.device)
    if launch.n_plan == 0:
        return out, lse
    table = _empty((launch.n_plan, FIELDS), dtype=torch.int32, device=q.device)
    plan = fill_block_table(cu_seqlens, table, launch.tokens)
    traceable(_varlen_attn_fwd_kernel)[launch.grid](
        q,
        k,
        v,
        out,
        lse,
        plan,
        *launch.strides,
        launch.out_shape[1],
        launch.qk_scale,
        **launch.constexprs,
        num_warps=launch.config.num_warps,
        num_stages=launch.config.num_stages,
    )
    return out, lse


def varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    *,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """``torch.ops.penguin.varlen_attention``: :func:`varlen_attention` for trusted inputs.

    Checks shapes, dtypes, devices and strides, but never reads ``cu_seqlens`` on the host: no sync,
    capturable in a CUDA graph and traceable by ``torch.compile``. The caller guarantees that
    ``cu_seqlens`` starts at 0, never decreases and ends at N, and that ``max_seqlen`` is at least the
    longest segment (query blocks beyond a too-small bound are left unwritten).

    ``config`` replaces the shipped launch configuration (:func:`select_config`), for tuning; the
    launch then runs outside the registered op (and autograd).

    The op returns ``(out, lse)``, ``lse`` the float32 ``[N, H]`` natural-log log-sum-exp of each
    row's scaled scores, which its backward (:mod:`penguin_kernels.attention_backward`) reads.
    """
    if config is not None:
        return _launch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, config)[0]
    return torch.ops.penguin.varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale)[0]


def _check_seqlens(cu_seqlens: torch.Tensor, n: int, max_seqlen: int | None, cu_seqlens_k: torch.Tensor | None) -> int:
    """Check the values of ``cu_seqlens`` (and its flash-attn twin) with one host read.

    Returns ``max_seqlen``, computed when ``None``.
    """
    twin = cu_seqlens_k is not None and cu_seqlens_k is not cu_seqlens
    if twin and cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_seqlens.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} must be equal "
            "(self-attention only)"
        )
    host = torch.stack([cu_seqlens, cu_seqlens_k]).cpu() if twin else cu_seqlens.cpu()[None]
    bounds = host[0]
    if twin and not torch.equal(bounds, host[1]):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be equal (self-attention only)")
    if bounds[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0].item()}")
    if bounds[-1].item() != n:
        raise ValueError(f"cu_seqlens must end at N = {n} (q's tokens), got {bounds[-1].item()}")
    lengths = bounds[1:] - bounds[:-1]
    if lengths.numel() and lengths.min().item() < 0:
        i = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got {bounds[i].item()} then {bounds[i + 1].item()} at index {i}"
        )
    longest = int(lengths.max().item()) if lengths.numel() else 0
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen ({max_seqlen}) is less than the longest segment ({longest})")
    return max_seqlen


def _flash_pair(name: str, ours: object, q_value: object, k_value: object) -> object:
    """``ours``, or flash-attn's ``<name>_q`` when given (with ``<name>_k``; tensors compared later)."""
    if q_value is None and k_value is None:
        return ours
    if ours is not None:
        raise TypeError(f"pass {name} or {name}_q/{name}_k, not both")
    if q_value is None or k_value is None:
        raise TypeError(f"{name}_q and {name}_k must be passed together")
    if not isinstance(q_value, torch.Tensor) and q_value != k_value:
        raise ValueError(f"{name}_q ({q_value}) and {name}_k ({k_value}) must be equal (self-attention only)")
    return q_value


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Bidirectional attention inside each segment of a packed batch, GQA, one attention launch.

    Args:
        q: ``[N, H, hd]`` float16, bfloat16 or float32, hd in ``SUPPORTED_HEAD_DIMS`` (64, 128).
        k, v: ``[N, KV, hd]``, q's dtype and device, ``H % KV == 0``: query head ``i`` reads KV head
            ``i // (H // KV)``. Any strides with a contiguous last dim (views of a fused QKV buffer).
        cu_seqlens: int32 ``[S + 1]`` on q's device: 0, the cumulative segment lengths, N. Empty
            segments are allowed.
        max_seqlen: the longest segment, or any larger bound; ``None`` computes it.
        softmax_scale: positive; ``hd ** -0.5`` when ``None``.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal: the keywords of
            flash-attn's ``flash_attn_varlen_func``, so that this drops in where it is called. The
            ``_q`` and ``_k`` values must be equal; ``dropout_p`` must be 0 and ``causal`` False.
        config: a launch configuration in place of the shipped one (:func:`select_config`), for tuning.

    Returns:
        ``[N, H, hd]``, contiguous, q's dtype.

    Everything is validated before the launch, the values of ``cu_seqlens`` included (one host sync).
    Differentiable in q, k and v. For trusted, device-built ``cu_seqlens`` without the sync, call
    :func:`varlen_attention_op`.
    """
    if causal:
        raise NotImplementedError("causal=True is not supported: this attention is bidirectional")
    if dropout_p != 0:
        raise NotImplementedError(f"dropout_p must be 0 (no dropout), got {dropout_p}")
    cu_seqlens = _flash_pair("cu_seqlens", cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    max_seqlen = _flash_pair("max_seqlen", max_seqlen, max_seqlen_q, max_seqlen_k)
    if cu_seqlens is None:
        raise TypeError("cu_seqlens (or cu_seqlens_q and cu_seqlens_k) is required")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        raise TypeError(
            f"max_seqlen must be an int or None, got {type(max_seqlen).__name__} "
            "(pass flash-attn's cu_seqlens_k / max_seqlen_q / max_seqlen_k by keyword)"
        )
    _check_tensors(q, k, v, cu_seqlens)
    if cu_seqlens_k is not None:
        _check_tensors(q, k, v, cu_seqlens_k)
    _check_scale(softmax_scale)
    max_seqlen = _check_seqlens(cu_seqlens, q.shape[0], max_seqlen, cu_seqlens_k)
    return varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, softmax_scale, config=config)


def compile_cases(arch: int) -> list[CompileCase]:
    """Every shipped config for ``sm_<arch>``: bf16 at head_dim 64 and 128, long and short segments;
    fp16 and a GQA ratio of 8 (pack 8) on the long configs; float32."""
    device = describe_arch(arch)
    strides = ("stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh", "stride_on", "stride_oh")
    cases = []
    # (dtype, head_dim, group, max_seqlen): 4096 selects the long configs, 16 the short ones.
    shapes = [("bf16", hd, 2, ms) for hd in SUPPORTED_HEAD_DIMS for ms in (4096, 16)]
    shapes += [("fp16", hd, 2, 4096) for hd in SUPPORTED_HEAD_DIMS] + [("bf16", 128, 8, 4096)]
    shapes += [("fp32", hd, 2, 4096) for hd in SUPPORTED_HEAD_DIMS]
    for name, hd, group, max_seqlen in shapes:
        dtype = DTYPES[name]
        cfg = select_config(device, dtype, hd, max_seqlen)
        signature = {t: f"*{name}" for t in ("q", "k", "v", "o")} | {"lse": "*fp32", "plan": "*i32"}
        signature |= {"n_heads": "i32", "qk_scale": "fp32"}
        signature |= {s: "i32" for s in strides}
        cases.append(
            CompileCase(
                name=f"varlen_attn_{name}_hd{hd}_g{group}_bm{cfg.block_m}_bn{cfg.block_n}",
                fn=_varlen_attn_fwd_kernel,
                signature=signature,
                constexprs={
                    "HEAD_DIM": hd,
                    "HEAD_CHUNK": cfg.head_chunk or hd,
                    "GROUP": group,
                    "PACK": heads_per_tile(group, cfg),
                    "BLOCK_M": cfg.block_m,
                    "BLOCK_N": cfg.block_n,
                    "DOT_PRECISION": dot_precision(dtype),
                },
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                tensor_cores=dtype != torch.float32,
                # token strides are multiples of heads * hd, head strides of hd: multiples of 16
                aligned=strides,
            )
        )
    return cases
