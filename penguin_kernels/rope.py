"""Per-head RMSNorm of q and k fused with the 2D rotary, and the per-token positions it reads.

The math, per token ``n`` at ``(row, col)`` and per head, ``hd`` the head dim, ``d < hd/2``::

    y        = w * cast(x * rsqrt(mean(x^2) + eps))            statistics in float32
    f[d]     = theta ** (-2 d / hd)
    out[d]        = y[d]        * cos(row f[d]) - y[d + hd/2] * sin(row f[d])
    out[d + hd/2] = y[d + hd/2] * cos(col f[d]) + y[d]        * sin(col f[d])

The first half rotates with the row angle and the second half with the column angle, so the pair
``(d, d + hd/2)`` is not a true rotation when ``row != col``; the upstream encoder computes exactly
this. Rounding follows :func:`penguin_kernels.reference.qk_norm_rope_2d` step by step: the normalised
value is cast to the input dtype before the weight multiply, cos/sin are evaluated in float32 and cast
to the input dtype, and every product and the final sum are rounded to the input dtype, as the
reference's separate elementwise ops round them. Products of two 16-bit floats are exact in float32,
so each rounded product is the correctly rounded 16-bit product the reference computes; what differs
is below float32 precision (sin/cos, summation order, ``rsqrt``) and flips a 16-bit rounding in
about 1e-4 of the elements.

Design (H100 first; numbers from ``compile_cases`` compiled for sm_90 and sm_80):

* **One pass, one launch.** A program owns a block of ``BLOCK_N`` tokens and loops over the heads
  of q and then of k, reading each head once and writing it once: ``(H + KV) * hd`` elements in and
  out per token, the minimum traffic for the op. q and k are strided views of the fused QKV
  projection output, read in place; the outputs are new contiguous tensors.
* **Angles in registers, shared by all heads.** cos/sin are never stored: a ``[BLOCK_N, hd/2]`` tile
  each of ``cos(row f)``, ``sin(row f)``, ``cos(col f)``, ``sin(col f)`` is computed once per program
  and reused by every head (24 at released dims). Computed per head, an accurate float32 sin + cos
  (tens of instructions) would use up the ~35 instructions per element that H100's copy bandwidth
  leaves (3.35 TB/s over 4 bytes per element against ~3e13 thread instructions/s).
* **Own sin/cos.** libdevice's ``__nv_sinf``/``__nv_cosf`` (what ``tl.sin``/``tl.cos`` lower to)
  carry a Payne-Hanek path for ``|x| >= 105615`` whose local array and register pressure spilled
  (sm_90: 80 registers and 2 spills; sm_80: 32 bytes of stack) and grew the kernel from ~700 to
  ~4,100 SASS instructions. :func:`_sincos` shares one three-constant Cody-Waite reduction between
  sin and cos and evaluates Taylor polynomials: within 1.6 ulp of the exact values up to angles of
  10^6 (libdevice promises 2 ulp), no local memory, 48 registers for 16-bit inputs. The reduction
  needs ``tl.fma`` to round once, as it does on GPUs and in Triton's interpreter from 3.7; the
  interpreter of Triton 3.6 rounds it twice, which moves float32 results by ~1e-5 relative.
* **Angles match the reference bit for bit.** ``f`` is not recomputed in the kernel: the wrapper
  passes the float32 vector of :func:`penguin_kernels.reference.rope_inv_freq` (``hd/2`` floats,
  cached per device), so ``pos * f`` is the float32 product the reference forms. An in-kernel
  ``exp2(-2 d / hd * log2(theta))`` is up to 10 ulp off ``1 / theta ** (2 d / hd)`` (theta 1e4 and
  1e6, hd 64 and 128), which moves cos by up to 2e-4 at position 4000: more than the float32
  tolerance.
* **Tiles and overlap.** ``BLOCK_N * hd / 2 = 1024`` elements per half-head tile with 4 warps: each
  thread holds one 16-byte vector of each half of a 16-bit head, so loads and stores are 128-bit.
  The head loop is software-pipelined (``tl.range(num_stages=3)``: the next two heads are in flight
  through ``cp.async`` while one is computed), so even a program alone on its SM, as in the last
  wave of a launch, keeps its loads overlapped. 48 registers and ~9 KB of shared memory per program
  let ~10 programs share an SM. When the token blocks alone cannot fill the GPU (a single 1k-token
  image), the heads are split over a second grid axis; each split recomputes its angles.
* **Offsets.** Token offsets are int64 before they meet a row stride; N * row stride may pass 2^31.

The ``(row, col)`` of every token come from :func:`penguin_kernels.positions.rope_positions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from penguin_kernels import reference
from penguin_kernels._checks import ShapeCache, check_float, check_like, runnable, signature
from penguin_kernels.compile_case import CompileCase
from penguin_kernels.device import device_info

__all__ = ["RopeConfig", "qk_norm_rope_2d", "select_config", "compile_cases"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_TILE_ELEMENTS = 1024
_NUM_WARPS = 4
_STAGES = tl.constexpr(3)
# Programs per SM wanted before the heads are split over a second grid axis.
_PROGRAMS_PER_SM = 4


# pi/2 as the sum of three float32s: each k * part is exact inside an fma, and together they carry
# ~75 bits of pi/2, so x - k pi/2 keeps ~1 ulp accuracy far beyond the angles met here (checked to 1e6).
_PIO2_HI = tl.constexpr(1.5707963705062866)
_PIO2_MID = tl.constexpr(-4.371138828673793e-08)
_PIO2_LO = tl.constexpr(-1.7151245100058819e-15)
_TWO_OVER_PI = tl.constexpr(0.6366197466850281)


@triton.jit
def _sincos(x):
    """``(sin x, cos x)`` of float32 ``x``, within 1.6 ulp of the exact values (measured for 0 <= x <= 1e6).

    ``x = k pi/2 + r`` with ``|r| <= pi/4`` (three fmas), then Taylor polynomials in ``r``, whose
    truncation error is under 0.05 ulp on that interval; the quadrant ``k mod 4`` picks and signs
    them. One reduction serves both functions.
    """
    k = tl.floor(x * _TWO_OVER_PI + 0.5)
    r = tl.fma(-k, _PIO2_HI, x)
    r = tl.fma(-k, _PIO2_MID, r)
    r = tl.fma(-k, _PIO2_LO, r)
    s = r * r
    sin_r = r + r * s * (-1.0 / 6.0 + s * (1.0 / 120.0 + s * (-1.0 / 5040.0 + s * (1.0 / 362880.0))))
    cos_p = 1.0 / 24.0 + s * (-1.0 / 720.0 + s * (1.0 / 40320.0 + s * (-1.0 / 3628800.0)))
    cos_r = 1.0 - 0.5 * s + s * s * cos_p
    q = k.to(tl.int32)
    swap = (q & 1) != 0
    sin_x = tl.where(swap, cos_r, sin_r)
    cos_x = tl.where(swap, sin_r, cos_r)
    sin_x = tl.where((q & 2) != 0, -sin_x, sin_x)
    cos_x = tl.where(((q + 1) & 2) != 0, -cos_x, cos_x)
    return sin_x, cos_x


@triton.jit
def _qk_norm_rope_2d_kernel(
    q,
    k,
    q_out,
    k_out,
    q_w,
    k_w,
    pos,
    inv_freq,
    n_tokens,
    n_q_heads,
    n_kv_heads,
    heads_per_program,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_pn,
    stride_pc,
    eps,
    HD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_n, i_g = tl.program_id(0), tl.program_id(1)
    dtype: tl.constexpr = q_out.dtype.element_ty
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n_tokens
    o_d = tl.arange(0, HD // 2)

    # [BLOCK_N] positions as float32, exactly as the reference converts them
    b_row = tl.load(pos + o_n * stride_pn, mask=m_n, other=0).to(tl.float32)
    b_col = tl.load(pos + o_n * stride_pn + stride_pc, mask=m_n, other=0).to(tl.float32)
    b_f = tl.load(inv_freq + o_d)
    # [BLOCK_N, HD/2]
    b_ang_r = b_row[:, None] * b_f[None, :]
    b_ang_c = b_col[:, None] * b_f[None, :]
    # cos/sin in float32, rounded to the activation dtype as the reference casts them
    b_sin_r, b_cos_r = _sincos(b_ang_r)
    b_sin_c, b_cos_c = _sincos(b_ang_c)
    b_sin_r = b_sin_r.to(dtype).to(tl.float32)
    b_cos_r = b_cos_r.to(dtype).to(tl.float32)
    b_sin_c = b_sin_c.to(dtype).to(tl.float32)
    b_cos_c = b_cos_c.to(dtype).to(tl.float32)

    i_start = i_g * heads_per_program
    i_end = tl.minimum(i_start + heads_per_program, n_q_heads + n_kv_heads)
    for i_h in tl.range(i_start, i_end, num_stages=_STAGES):
        # q heads first, then k heads. Uniform scalar selects, not a branch, give one copy of the
        # head code; selecting scalars (not offset tensors) keeps the alignment facts that let the
        # compiler emit 16-byte loads and stores.
        is_q = i_h < n_q_heads
        i_kv = i_h - n_q_heads
        # int64: a head-major view's head stride times the head index may pass 2^31
        p_x = tl.where(is_q, q + tl.cast(i_h, tl.int64) * stride_qh, k + tl.cast(i_kv, tl.int64) * stride_kh)
        p_out = tl.where(is_q, q_out + i_h * HD, k_out + i_kv * HD)
        p_w = tl.where(is_q, q_w, k_w)
        o_x = o_n * tl.where(is_q, stride_qn, stride_kn)
        o_out = o_n * (tl.where(is_q, n_q_heads, n_kv_heads) * HD)

        p_x = p_x + o_x[:, None] + o_d[None, :]
        # [BLOCK_N, HD/2] each: the halves that pair up in the rotary
        b_x1 = tl.load(p_x, mask=m_n[:, None], other=0.0).to(tl.float32)
        b_x2 = tl.load(p_x + HD // 2, mask=m_n[:, None], other=0.0).to(tl.float32)
        b_ss = tl.sum(b_x1 * b_x1 + b_x2 * b_x2, axis=1)
        b_rstd = tl.math.rsqrt(b_ss * (1.0 / HD) + eps)
        b_w1 = tl.load(p_w + o_d).to(tl.float32)
        b_w2 = tl.load(p_w + HD // 2 + o_d).to(tl.float32)
        # Each .to(dtype) is a rounding that the reference's elementwise ops in ``dtype`` perform.
        b_y1 = (b_x1 * b_rstd[:, None]).to(dtype).to(tl.float32)
        b_y2 = (b_x2 * b_rstd[:, None]).to(dtype).to(tl.float32)
        b_y1 = (b_w1[None, :] * b_y1).to(dtype).to(tl.float32)
        b_y2 = (b_w2[None, :] * b_y2).to(dtype).to(tl.float32)
        b_o1 = (b_y1 * b_cos_r).to(dtype).to(tl.float32) - (b_y2 * b_sin_r).to(dtype).to(tl.float32)
        b_o2 = (b_y2 * b_cos_c).to(dtype).to(tl.float32) + (b_y1 * b_sin_c).to(dtype).to(tl.float32)
        p_out = p_out + o_out[:, None] + o_d[None, :]
        tl.store(p_out, b_o1.to(dtype), mask=m_n[:, None])
        tl.store(p_out + HD // 2, b_o2.to(dtype), mask=m_n[:, None])


@dataclass(frozen=True)
class RopeConfig:
    """Tokens per program and warps of :func:`_qk_norm_rope_2d_kernel`."""

    block_n: int
    num_warps: int = _NUM_WARPS


def select_config(head_dim: int) -> RopeConfig:
    """The shipped configuration: half-head tiles of ``_TILE_ELEMENTS`` elements on 4 warps."""
    return RopeConfig(block_n=_TILE_ELEMENTS * 2 // head_dim)


def _grid(sms: int, n_tokens: int, n_heads: int, block_n: int) -> tuple[int, int, int]:
    """``(token blocks, head splits, heads per program)``; heads split only if tokens cannot fill the GPU.

    The interpreter counts as one SM: it runs programs one at a time, and a tiny batch still splits.
    """
    n_blocks = -(-n_tokens // block_n)
    splits = min(n_heads, -(-_PROGRAMS_PER_SM * sms // max(n_blocks, 1)))
    per_program = -(-n_heads // splits)
    return n_blocks, -(-n_heads // per_program), per_program


class _Plan(NamedTuple):
    """Everything a launch needs that depends only on the inputs' metadata."""

    shape_q: tuple[int, int, int]
    shape_k: tuple[int, int, int]
    grid: tuple[int, int]
    per_program: int
    strides: tuple[int, int, int, int, int, int]
    config: RopeConfig


def _build_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    config: RopeConfig | None,
) -> _Plan:
    """Check the tensors (errors name the one at fault) and plan the launch."""
    check_float(q, "q")
    check_like(k, "k", q, "q")
    check_like(q_norm_weight, "q_norm_weight", q, "q")
    check_like(k_norm_weight, "k_norm_weight", q, "q")
    _check_heads(q, "q")
    _check_heads(k, "k")
    n, h, hd = q.shape
    if k.shape[0] != n or k.shape[2] != hd:
        raise ValueError(f"k must be [N, KV, hd] = [{n}, KV, {hd}] to match q; got {tuple(k.shape)}")
    if hd not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(f"head_dim {hd} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    for w, name in ((q_norm_weight, "q_norm_weight"), (k_norm_weight, "k_norm_weight")):
        if w.shape != (hd,):
            raise ValueError(f"{name} must be [head_dim] = [{hd}]; got {tuple(w.shape)}")
        if w.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype != torch.int32:
        raise TypeError(f"positions must be int32; got {positions.dtype} (convert with .to(torch.int32))")
    if positions.device != q.device:
        raise ValueError(f"positions is on {positions.device} but q is on {q.device}; they must match")
    if positions.shape != (n, 2):
        raise ValueError(f"positions must be [N, 2] = [{n}, 2] (row, col); got {tuple(positions.shape)}")
    kv = k.shape[1]
    cfg = config or select_config(hd)
    n_blocks, n_splits, per_program = _grid(device_info(q.device).sm_count, n, h + kv, cfg.block_n)
    return _Plan(
        shape_q=(n, h, hd),
        shape_k=(n, kv, hd),
        grid=(n_blocks, n_splits),
        per_program=per_program,
        strides=(q.stride(0), q.stride(1), k.stride(0), k.stride(1), positions.stride(0), positions.stride(1)),
        config=cfg,
    )


_PLANS = ShapeCache(_build_plan)


def _plan(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    config: RopeConfig | None,
) -> _Plan:
    args = (q, k, q_norm_weight, k_norm_weight, positions, config)
    try:
        key = (
            signature(q),
            runnable(q),
            signature(k),
            signature(q_norm_weight),
            signature(k_norm_weight),
            signature(positions),
            config,
        )
    except AttributeError:  # not a tensor: the checks say which
        return _build_plan(*args)
    return _PLANS.get(key, *args)


@triton_op("penguin::qk_norm_rope_2d", mutates_args=())
def _qk_norm_rope_2d_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan(q, k, q_norm_weight, k_norm_weight, positions, None)
    return _launch(q, k, q_norm_weight, k_norm_weight, positions, inv_freq, eps, plan)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    eps: float,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty(plan.shape_q, dtype=q.dtype, device=q.device)
    k_out = torch.empty(plan.shape_k, dtype=q.dtype, device=q.device)
    n, h, hd = plan.shape_q
    if n == 0:
        return q_out, k_out
    wrap_triton(_qk_norm_rope_2d_kernel)[plan.grid](
        q,
        k,
        q_out,
        k_out,
        q_norm_weight,
        k_norm_weight,
        positions,
        inv_freq,
        n,
        h,
        plan.shape_k[1],
        plan.per_program,
        *plan.strides,
        eps,
        HD=hd,
        BLOCK_N=plan.config.block_n,
        num_warps=plan.config.num_warps,
    )
    return q_out, k_out


_INV_FREQ: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The reference's float32 ``inv_freq``, computed once per (head_dim, theta, device) in eager mode."""
    if torch.compiler.is_compiling():
        return reference.rope_inv_freq(head_dim, theta, device)
    key = (head_dim, theta, device)
    if key not in _INV_FREQ:
        # A plain tensor (not an inference tensor), whatever mode the first call runs in.
        with torch.inference_mode(False):
            _INV_FREQ[key] = reference.rope_inv_freq(head_dim, theta, device)
    return _INV_FREQ[key]


def _check_heads(t: torch.Tensor, name: str) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be [N, heads, head_dim]; got shape {tuple(t.shape)}")
    if t.shape[2] > 1 and t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim (stride {t.stride(2)}); row views are fine")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no heads")


def qk_norm_rope_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    *,
    theta: float,
    eps: float,
    config: RopeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k followed by the half-split 2D rotary, in one kernel.

    Matches :func:`penguin_kernels.reference.qk_norm_rope_2d`, rounding step by step as it does.
    Differentiable in q, k and both weights.

    Args:
        q: ``[N, H, hd]`` float16/bfloat16/float32; any token and head strides with a contiguous
            ``hd``, e.g. ``qkv[:, :H*hd].view(N, H, hd)`` of a fused QKV projection output (read in place).
        k: ``[N, KV, hd]``, same dtype, device and ``hd`` as ``q``, same stride rules.
        q_norm_weight: ``[hd]``, the dtype of ``q``, contiguous.
        k_norm_weight: ``[hd]``, the dtype of ``q``, contiguous.
        positions: int32 ``[N, 2]`` ``(row, col)`` per token, as :func:`rope_positions` builds them.
        theta: rotary base (``rope_theta``), positive.
        eps: RMSNorm epsilon, non-negative.
        config: a configuration in place of the shipped one (:func:`select_config`), for tuning; the
            launch then runs outside the registered op.

    ``hd`` must be a power of two from 16 to 256.

    Returns:
        ``(q_out [N, H, hd], k_out [N, KV, hd])``: new contiguous tensors in the dtype of ``q``.
    """
    if not theta > 0:
        raise ValueError(f"theta must be positive; got {theta}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative; got {eps}")
    tensors = (q, k, q_norm_weight, k_norm_weight, positions)
    if config is not None:
        plan = _plan(*tensors, config)
        inv_freq = _inv_freq(plan.shape_q[2], float(theta), q.device)
        return _launch(*tensors, inv_freq, float(eps), plan)
    try:
        inv_freq = _inv_freq(q.shape[-1], float(theta), q.device)
        return _qk_norm_rope_2d_op(*tensors, inv_freq, float(eps))
    except (AttributeError, IndexError, RuntimeError):
        _build_plan(*tensors, None)  # names an argument the op's schema (or inv_freq's head_dim) refused
        raise


def compile_cases(arch: int) -> list[CompileCase]:
    """The shipped configs: every dtype at head dims 64 (the goldens'), 128 (released) and 256 (the
    largest per-thread footprint), and bf16 at 16 and 32 (the tallest token tiles). The config does
    not depend on ``arch``."""
    ints = ("n_tokens", "n_q_heads", "n_kv_heads", "heads_per_program")
    strides = ("stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_pn")
    configs = [(dtype, hd) for dtype in ("bf16", "fp16", "fp32") for hd in (64, 128, 256)]
    configs += [("bf16", 16), ("bf16", 32)]
    cases = []
    for dtype, hd in configs:
        signature = {name: f"*{dtype}" for name in ("q", "k", "q_out", "k_out", "q_w", "k_w")}
        signature |= {"pos": "*i32", "inv_freq": "*fp32", "eps": "fp32"}
        signature |= {name: "i32" for name in ints + strides}
        cases.append(
            CompileCase(
                name=f"qk_norm_rope_2d_{dtype}_hd{hd}",
                fn=_qk_norm_rope_2d_kernel,
                signature=signature,
                # positions are [N, 2] contiguous: the column stride is 1, which Triton pins.
                constexprs={"HD": hd, "BLOCK_N": select_config(hd).block_n, "stride_pc": 1},
                num_warps=_NUM_WARPS,
                # a fused QKV buffer's row stride and hd-wide head stride are multiples of 16
                aligned=strides[:4],
            )
        )
    return cases
