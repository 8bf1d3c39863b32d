"""GEMM with a fused epilogue: ``y = epilogue(x @ W^T)`` for ``nn.Linear`` weights ``W [N, K]``.

One kernel serves every projection of the encoder; constexpr flags pick the epilogue, applied to the
float32 accumulator before the single rounding to the output dtype::

    y = act(x W^T + bias) + residual        act = identity | gelu (erf) | swiglu

SwiGLU reads ``W = cat([Wg, Wu])`` ``[2I, K]`` and produces ``[M, I]``: a program owns the output
columns ``n..n+BN`` and accumulates both ``x Wg[n:n+BN]^T`` and ``x Wu[n:n+BN]^T`` from the same x
tile, so the ``[M, 2I]`` gate/up activation never exists in memory.

Performance design (H100 numbers are design targets; the register and shared-memory figures are
from compiling every shipped config for sm_90 and sm_80, see :func:`compile_cases`):

* Tiles. Hopper (sm_90): 128x256x64, 8 warps, 3 stages: both warpgroups issue wgmma (HGMMA in the
  SASS) on a 128-register fp32 accumulator per thread, and the 3-stage operand ring takes 144 KiB of
  shared memory; 188 registers with the residual epilogue, 232 with bias + GELU, no spills. SwiGLU
  splits the same 128x256 budget into two 128x128 accumulators (gate and up) fed by one x tile,
  3 stages of three 16 KiB tiles (144 KiB, 174 registers). When a launch would give fewer tiles
  than SMs (few tokens, e.g. one 448x448 image) the launcher steps down to 128x128 and then 64x128
  tiles: a half-empty GPU costs more than the smaller tiles' lower arithmetic intensity. sm_100 has
  Hopper's shared memory and takes the same tiles. Ampere (sm_80) and the other GPUs use 128x256x32
  / 128x128x32 rings of at most 48 KiB, which also fit the ~100 KiB of sm_86/89/120. float32
  inputs take an exact (IEEE) FMA path with 64x64 tiles: it exists for parity with the float32
  reference, not for speed.
* Epilogue in two column halves for 256-wide tiles: a whole 128x256 tile's residual tile, output
  addresses and erf temporaries on top of the accumulator need ~300 registers and spilled; one half
  at a time fits in 255.
* Program order is grouped by ``GROUP_M`` row tiles so that programs running together share their W
  column tiles and x row tiles in L2.
* Loads are unmasked along M and N: out-of-range rows and columns are wrapped (``% M``) onto valid
  memory and dropped by the store mask, so only a ragged last K tile pays for masks (``EVEN_K``).
  With ``K % 16 == 0`` Triton proves the masks uniform per 16-byte vector and keeps the cp.async
  pipeline; the 588-wide patch embedding (``K % 16 != 0``) gets scalar, unpipelined loads, harmless
  for 0.04% of the encoder's FLOPs, and skips the 256-wide tile, whose scalar addresses would spill.
* Row offsets are 64-bit: ``M * K`` passes 2^31 at 1M tokens of width 2048.

Rounding: the plain-PyTorch chain rounds ``x W^T + b`` to the activation dtype, then rounds again
after the activation (twice for SwiGLU: ``silu(g)`` and the product) and after the residual add. The
fused epilogue rounds once, so it is at least as accurate; against a float32 truth both sit within
a few units in the last place of the output dtype (relative Frobenius error below 2e-3 in fp16 and
1e-2 in bf16; float32 matches to ~1e-5).

bfloat16 ``tl.dot`` is wrong in Triton's CPU interpreter, so bfloat16 is refused there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from penguin_kernels._checks import (
    ShapeCache,
    check_bias,
    check_input,
    check_residual,
    check_weight,
    dot_precision,
    runnable,
    signature,
)
from penguin_kernels.compile_case import CompileCase
from penguin_kernels.device import Device, describe_arch, device_info

__all__ = ["GemmPlan", "Tile", "linear", "gate_up_swiglu", "launch_gemm", "plan_gemm", "select_tile", "compile_cases"]


@triton.jit
def _epilogue(
    acc,
    o_m,
    o_n,
    b_ptr,
    r_ptr,
    y_ptr,
    M,
    N,
    stride_rm,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    m_n = o_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    o_ym = o_m.to(tl.int64)
    m_y = (o_m < M)[:, None] & m_n[None, :]
    if HAS_RESIDUAL:
        b_r = tl.load(r_ptr + o_ym[:, None] * stride_rm + o_n[None, :], mask=m_y, other=0.0)
        acc += b_r.to(tl.float32)
    tl.store(y_ptr + o_ym[:, None] * stride_ym + o_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def _gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    r_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    SWIGLU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tl.static_assert(not (GELU and SWIGLU), "one activation per epilogue")
    tl.static_assert(not (HAS_BIAS and SWIGLU), "the SwiGLU epilogue takes no bias")
    i_pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    # GROUP_M row tiles sweep the column tiles together so their W tiles are reused from L2.
    n_group = GROUP_M * n_n
    i_first_m = (i_pid // n_group) * GROUP_M
    group_m = min(n_m - i_first_m, GROUP_M)
    i_m = i_first_m + (i_pid % n_group) % group_m
    i_n = (i_pid % n_group) // group_m

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    # Rows and columns past the edge wrap onto valid ones, so the loads need no M/N mask; the
    # store mask drops their results.
    o_xm = (o_m % M).to(tl.int64)
    o_wn = (o_n % N).to(tl.int64)
    p_x = x_ptr + o_xm[:, None] * stride_xm + o_k[None, :]  # [BM, BK]
    p_w = w_ptr + o_wn[None, :] * stride_wn + o_k[:, None]  # [BK, BN], W^T tile
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if SWIGLU:
        # The up rows that pair with gate rows o_wn sit I = N rows further down.
        p_u = w_ptr + (o_wn + N)[None, :] * stride_wn + o_k[:, None]
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            b_x = tl.load(p_x)
            b_w = tl.load(p_w)
            if SWIGLU:
                b_u = tl.load(p_u)
        else:
            m_k = o_k < K - i_k * BK
            b_x = tl.load(p_x, mask=m_k[None, :], other=0.0)
            b_w = tl.load(p_w, mask=m_k[:, None], other=0.0)
            if SWIGLU:
                b_u = tl.load(p_u, mask=m_k[:, None], other=0.0)
        acc = tl.dot(b_x, b_w, acc, input_precision=DOT_PRECISION)
        if SWIGLU:
            acc_u = tl.dot(b_x, b_u, acc_u, input_precision=DOT_PRECISION)
            p_u += BK
        p_x += BK
        p_w += BK

    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_u
    if SPLIT_EPILOGUE:
        # Two column halves, one after the other: a whole 128x256 tile's residual, addresses and erf
        # temporaries on top of its 128-register accumulator overflow the register file.
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        o_n = i_n * BN + tl.arange(0, BN // 2)
        _epilogue(acc_lo, o_m, o_n, b_ptr, r_ptr, y_ptr, M, N, stride_rm, stride_ym, HAS_BIAS, GELU, HAS_RESIDUAL)
        o_n += BN // 2
        _epilogue(acc_hi, o_m, o_n, b_ptr, r_ptr, y_ptr, M, N, stride_rm, stride_ym, HAS_BIAS, GELU, HAS_RESIDUAL)
    else:
        _epilogue(acc, o_m, o_n, b_ptr, r_ptr, y_ptr, M, N, stride_rm, stride_ym, HAS_BIAS, GELU, HAS_RESIDUAL)


@dataclass(frozen=True)
class Tile:
    """One launch configuration of :func:`_gemm_kernel`."""

    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_epilogue: bool = False


# (tile set, swiglu) -> tiles, largest first; the launcher takes the first that still gives every SM
# a tile. Tile set 90 (``Device.tile_arch``): sm_90 and sm_100; 80: every other GPU.
_TILES = {
    (90, False): (Tile(128, 256, 64, 8, 3, split_epilogue=True), Tile(128, 128, 64, 8, 4), Tile(64, 128, 64, 4, 4)),
    (90, True): (Tile(128, 128, 64, 8, 3), Tile(64, 128, 64, 4, 4)),
    (80, False): (Tile(128, 256, 32, 8, 3, split_epilogue=True), Tile(128, 128, 32, 8, 4), Tile(64, 64, 32, 4, 4)),
    (80, True): (Tile(128, 64, 32, 4, 4), Tile(64, 64, 32, 4, 4)),
}
_FP32 = (Tile(64, 64, 32, 4, 3),)
# The interpreter runs each program in Python: few, large tiles are fastest there. A small group
# keeps the grouped order's ragged last group under test, and the split epilogue of the large GPU
# tiles runs on every non-SwiGLU launch so that CPU tests cover it.
_INTERPRETER = Tile(32, 64, 64, 1, 1, group_m=4, split_epilogue=True)
_INTERPRETER_SWIGLU = Tile(32, 64, 64, 1, 1, group_m=4)


def _tiles(dtype: torch.dtype, tile_arch: int, swiglu: bool) -> tuple[Tile, ...]:
    return _FP32 if dtype == torch.float32 else _TILES[tile_arch, swiglu]


def select_tile(device: Device, dtype: torch.dtype, m: int, n: int, k: int, swiglu: bool) -> Tile:
    """The shipped tile for an ``[m, k] x [k, n]`` product (``n``: the output width) on ``device``."""
    if device.tile_arch is None:
        return _INTERPRETER_SWIGLU if swiglu else _INTERPRETER
    tiles = _tiles(dtype, device.tile_arch, swiglu)
    if k % 16 and len(tiles) > 1:
        # Loads masked at a K that is not a multiple of 16 are scalar and unpipelined; the largest
        # tile then runs out of registers for their addresses.
        tiles = tiles[1:]
    for tile in tiles:
        if -(-m // tile.bm) * -(-n // tile.bn) >= device.sm_count:
            return tile
    return tiles[-1]


class GemmPlan(NamedTuple):
    """One launch of :func:`_gemm_kernel`, worked out from the operands' metadata."""

    m: int
    n: int
    k: int
    stride_xm: int
    stride_rm: int
    out_shape: tuple[int, ...]
    grid: tuple[int]
    tile: Tile
    even_k: bool
    precision: str


def plan_gemm(
    device: Device,
    dtype: torch.dtype,
    m: int,
    k: int,
    n: int,
    *,
    stride_xm: int,
    stride_rm: int,
    out_shape: tuple[int, ...],
    swiglu: bool,
    tile: Tile | None,
) -> GemmPlan:
    """The launch for validated ``[m, k]`` rows (row stride ``stride_xm``) into ``n`` output columns."""
    if tile is None:
        tile = select_tile(device, dtype, m, n, k, swiglu)
    return GemmPlan(
        m=m,
        n=n,
        k=k,
        stride_xm=stride_xm,
        stride_rm=stride_rm,
        out_shape=out_shape,
        grid=(-(-m // tile.bm) * -(-n // tile.bn),),
        tile=tile,
        even_k=k % tile.bk == 0,
        precision=dot_precision(dtype),
    )


def launch_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    plan: GemmPlan,
    *,
    gelu: bool = False,
    swiglu: bool = False,
    kernel: Any = None,
) -> torch.Tensor:
    """Launch ``plan`` on validated operands; returns a new ``plan.out_shape`` tensor.

    ``x`` and ``residual`` are passed whole: the kernel reads their rows through the planned strides.
    ``kernel``: ``wrap_triton(_gemm_kernel)`` when the caller already holds it (one op, two GEMMs).
    """
    y = torch.empty(plan.out_shape, dtype=x.dtype, device=x.device)
    if plan.m == 0:
        return y
    tile = plan.tile
    (kernel or wrap_triton(_gemm_kernel))[plan.grid](
        x,
        weight,
        x if bias is None else bias,
        x if residual is None else residual,
        y,
        plan.m,
        plan.n,
        plan.k,
        plan.stride_xm,
        weight.stride(0),
        plan.stride_rm,
        plan.n,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        SWIGLU=swiglu,
        HAS_RESIDUAL=residual is not None,
        EVEN_K=plan.even_k,
        DOT_PRECISION=plan.precision,
        SPLIT_EPILOGUE=tile.split_epilogue,
        BM=tile.bm,
        BN=tile.bn,
        BK=tile.bk,
        GROUP_M=tile.group_m,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return y


def _build_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    swiglu: bool,
    tile: Tile | None,
) -> GemmPlan:
    """Check the operands of :func:`linear` (or :func:`gate_up_swiglu`) and plan the launch."""
    rows = check_input(x)
    name = "w_gate_up" if swiglu else "weight"
    check_weight(weight, name, x, x.shape[-1], f"x (shape {tuple(x.shape)})")
    n = weight.shape[0]
    if swiglu:
        if n % 2:
            raise ValueError(f"w_gate_up must stack gate and up rows [2I, K]; got {n} rows")
        n //= 2
    if bias is not None:
        check_bias(bias, "bias", x, n)
    out_shape = (*x.shape[:-1], n)
    res_rows = None if residual is None else check_residual(residual, x, out_shape)
    return plan_gemm(
        device_info(x.device),
        x.dtype,
        *rows.shape,
        n,
        stride_xm=rows.stride(0),
        stride_rm=0 if res_rows is None else res_rows.stride(0),
        out_shape=out_shape,
        swiglu=swiglu,
        tile=tile,
    )


_PLANS = ShapeCache(_build_linear)


def _plan(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    swiglu: bool,
    tile: Tile | None,
) -> GemmPlan:
    try:
        key = (
            signature(x),
            runnable(x),
            signature(weight),
            bias is None or signature(bias),
            residual is None or signature(residual),
            swiglu,
            tile,
        )
    except AttributeError:  # not a tensor: the checks say which
        return _build_linear(x, weight, bias, residual, swiglu, tile)
    return _PLANS.get(key, x, weight, bias, residual, swiglu, tile)


@triton_op("penguin::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gelu: bool,
) -> torch.Tensor:
    return launch_gemm(x, weight, bias, residual, _plan(x, weight, bias, residual, False, None), gelu=gelu)


@triton_op("penguin::gate_up_swiglu", mutates_args=())
def _gate_up_swiglu_op(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    return launch_gemm(x, w_gate_up, None, None, _plan(x, w_gate_up, None, None, True, None), swiglu=True)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    config: Tile | None = None,
) -> torch.Tensor:
    """``y = act(x @ weight^T + bias) + residual`` in one kernel, ``act`` = erf GELU when ``gelu``.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32, contiguous in the last dim; a row slice of a 2-D
            tensor (any row stride) is read in place.
        weight: ``[N, K]`` as stored by ``nn.Linear``, same dtype and device as ``x``.
        bias: optional ``[N]``.
        gelu: apply the exact (erf) GELU after the bias.
        residual: optional ``[..., N]`` added last, e.g. the residual stream of a transformer block.
        config: a tile in place of the shipped one (:func:`select_tile`), for tuning; the launch then
            runs outside the registered op.

    Returns:
        ``[..., N]`` in the dtype of ``x``; accumulation and the epilogue run in float32.
    """
    if config is not None:
        return launch_gemm(x, weight, bias, residual, _plan(x, weight, bias, residual, False, config), gelu=bool(gelu))
    try:
        return _linear_op(x, weight, bias, residual, bool(gelu))
    except RuntimeError:
        _build_linear(x, weight, bias, residual, False, None)  # names an argument the op's schema refused
        raise


def gate_up_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, *, config: Tile | None = None) -> torch.Tensor:
    """``silu(x Wg^T) * (x Wu^T)`` for ``w_gate_up = cat([Wg, Wu])`` in one kernel.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32, contiguous in the last dim (row slices allowed).
        w_gate_up: ``[2I, K]``: the gate rows, then the up rows.
        config: a tile in place of the shipped one (:func:`select_tile`), for tuning.

    Returns:
        ``[..., I]`` in the dtype of ``x``; neither ``x Wg^T`` nor ``x Wu^T`` is rounded or stored.
    """
    if config is not None:
        return launch_gemm(x, w_gate_up, None, None, _plan(x, w_gate_up, None, None, True, config), swiglu=True)
    try:
        return _gate_up_swiglu_op(x, w_gate_up)
    except RuntimeError:
        _build_linear(x, w_gate_up, None, None, True, None)  # names an argument the op's schema refused
        raise


_SIGNATURE_INTS = ("M", "N", "K", "stride_xm", "stride_wn", "stride_rm", "stride_ym")


def gemm_case(
    name: str, tile: Tile, dtype: str, *, even_k: bool = True, k_aligned: bool = True, **flags: bool
) -> CompileCase:
    """A :class:`CompileCase` of :func:`_gemm_kernel` at ``tile`` with the epilogue ``flags``.

    ``even_k=False``: K is not a multiple of the K tile; ``k_aligned=False``: not even of 16 (the
    588-wide patch embedding), which leaves the masked loads unvectorised and unpipelined.
    """
    ptr = f"*{dtype}"
    epilogue = {"HAS_BIAS": False, "GELU": False, "SWIGLU": False, "HAS_RESIDUAL": False} | flags
    return CompileCase(
        name=name,
        fn=_gemm_kernel,
        signature={"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "r_ptr": ptr, "y_ptr": ptr}
        | dict.fromkeys(_SIGNATURE_INTS, "i32"),
        constexprs=epilogue
        | {
            "EVEN_K": even_k and k_aligned,
            "DOT_PRECISION": dot_precision(torch.float32 if dtype == "fp32" else torch.bfloat16),
            "SPLIT_EPILOGUE": tile.split_epilogue,
            "BM": tile.bm,
            "BN": tile.bn,
            "BK": tile.bk,
            "GROUP_M": tile.group_m,
        },
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        tensor_cores=dtype != "fp32",
        aligned=tuple(n for n in _SIGNATURE_INTS if n != "M" and (k_aligned or n not in ("K", "stride_xm"))),
    )


def compile_cases(arch: int) -> list[CompileCase]:
    """Every tile shipped for ``sm_<arch>`` with its heaviest epilogues, in bf16 (fp16 compiles alike)."""
    tile_arch = describe_arch(arch).tile_arch
    cases = []
    for tile in _tiles(torch.bfloat16, tile_arch, swiglu=False):
        size = f"{tile.bm}x{tile.bn}x{tile.bk}"
        cases.append(gemm_case(f"bias+residual {size}", tile, "bf16", HAS_BIAS=True, HAS_RESIDUAL=True))
        cases.append(gemm_case(f"bias+gelu ragged-K {size}", tile, "bf16", even_k=False, HAS_BIAS=True, GELU=True))
    for tile in _tiles(torch.bfloat16, tile_arch, swiglu=True):
        cases.append(gemm_case(f"swiglu {tile.bm}x{tile.bn}x{tile.bk}", tile, "bf16", SWIGLU=True))
    tile = _tiles(torch.bfloat16, tile_arch, swiglu=False)[1]
    cases.append(gemm_case("bias K=588 (unaligned)", tile, "bf16", k_aligned=False, HAS_BIAS=True))
    cases.append(gemm_case("fp32 all", _FP32[0], "fp32", even_k=False, HAS_BIAS=True, GELU=True, HAS_RESIDUAL=True))
    return cases
