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
  tiles: a half-empty GPU costs more than the smaller tiles' lower arithmetic intensity. Ampere
  (sm_80 and the other non-Hopper GPUs) uses 128x256x32 / 128x128x32 rings of at most 48 KiB, which
  also fit the ~100 KiB of sm_86/sm_89. float32 inputs take an exact (IEEE) FMA path with 64x64
  tiles: it exists for parity with the float32 reference, not for speed.
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

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from penguin_kernels._checks import (
    as_rows,
    check_float,
    check_like,
    dot_precision,
    interpreter_active,
)
from penguin_kernels._compile import CompileCase

__all__ = ["linear", "gate_up_swiglu", "compile_cases"]


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


# Largest first; the launcher takes the first that still gives every SM a tile.
_HOPPER = (Tile(128, 256, 64, 8, 3, split_epilogue=True), Tile(128, 128, 64, 8, 4), Tile(64, 128, 64, 4, 4))
_HOPPER_SWIGLU = (Tile(128, 128, 64, 8, 3), Tile(64, 128, 64, 4, 4))
_AMPERE = (Tile(128, 256, 32, 8, 3, split_epilogue=True), Tile(128, 128, 32, 8, 4), Tile(64, 64, 32, 4, 4))
_AMPERE_SWIGLU = (Tile(128, 64, 32, 4, 4), Tile(64, 64, 32, 4, 4))
_FP32 = (Tile(64, 64, 32, 4, 3),)
# The interpreter runs each program in Python: few, large tiles are fastest there. A small group
# keeps the grouped order's ragged last group under test, and the split epilogue of the large GPU
# tiles runs on every non-SwiGLU launch so that CPU tests cover it.
_INTERPRETER = Tile(32, 64, 64, 1, 1, group_m=4, split_epilogue=True)
_INTERPRETER_SWIGLU = Tile(32, 64, 64, 1, 1, group_m=4)


@functools.cache
def _device_info(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major, props.multi_processor_count


def _tiles(dtype: torch.dtype, arch: int, swiglu: bool) -> tuple[Tile, ...]:
    if dtype == torch.float32:
        return _FP32
    if arch in (90, 100):
        return _HOPPER_SWIGLU if swiglu else _HOPPER
    return _AMPERE_SWIGLU if swiglu else _AMPERE


def _pick_tile(x: torch.Tensor, m: int, n: int, k: int, swiglu: bool) -> Tile:
    if interpreter_active():
        return _INTERPRETER_SWIGLU if swiglu else _INTERPRETER
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    major, n_sm = _device_info(index)
    tiles = _tiles(x.dtype, 10 * major, swiglu)
    if k % 16 and len(tiles) > 1:
        # Loads masked at a K that is not a multiple of 16 are scalar and unpipelined; the largest
        # tile then runs out of registers for their addresses.
        tiles = tiles[1:]
    for tile in tiles:
        if triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn) >= n_sm:
            return tile
    return tiles[-1]


def launch_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    *,
    gelu: bool = False,
    swiglu: bool = False,
) -> torch.Tensor:
    """Launch on validated ``x [M, K]`` rows, ``weight [N or 2N, K]``; returns a new ``[M, N]``."""
    m, k = x.shape
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    tile = _pick_tile(x, m, n, k, swiglu)
    grid = (triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn),)
    wrap_triton(_gemm_kernel)[grid](
        x,
        weight,
        x if bias is None else bias,
        x if residual is None else residual,
        y,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        0 if residual is None else residual.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        GELU=gelu,
        SWIGLU=swiglu,
        HAS_RESIDUAL=residual is not None,
        EVEN_K=k % tile.bk == 0,
        DOT_PRECISION=dot_precision(x.dtype),
        SPLIT_EPILOGUE=tile.split_epilogue,
        BM=tile.bm,
        BN=tile.bn,
        BK=tile.bk,
        GROUP_M=tile.group_m,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return y


@triton_op("penguin::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gelu: bool,
) -> torch.Tensor:
    rows = x.view(-1, x.shape[-1])
    res = None if residual is None else residual.view(-1, residual.shape[-1])
    y = launch_gemm(rows, weight, bias, res, gelu=gelu)
    return y.view(*x.shape[:-1], weight.shape[0])


@triton_op("penguin::gate_up_swiglu", mutates_args=())
def _gate_up_swiglu_op(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    y = launch_gemm(x.view(-1, x.shape[-1]), w_gate_up, None, None, swiglu=True)
    return y.view(*x.shape[:-1], w_gate_up.shape[0] // 2)


def check_weight(weight: object, name: str, x: torch.Tensor, in_features: int, source: str = "x") -> torch.Tensor:
    """``weight`` is an ``nn.Linear`` weight ``[out, in_features]`` like ``x``, rows unit-strided."""
    check_like(weight, name, x, "x")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{name} has no output features (shape {tuple(weight.shape)})")
    if weight.shape[1] != in_features:
        raise ValueError(f"{name} has {weight.shape[1]} input features but {source} has {in_features}")
    if in_features > 1 and weight.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (strides {weight.stride()})")
    return weight


def check_bias(bias: object, name: str, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """``bias`` is ``[out_features]``, contiguous, like ``x``."""
    check_like(bias, name, x, "x")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name} has shape {tuple(bias.shape)}, expected ({out_features},)")
    if out_features > 1 and bias.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")
    return bias


def check_input(x: object, name: str = "x") -> torch.Tensor:
    """``x [..., K]`` with ``K >= 1`` whose rows are addressable with one stride."""
    check_float(x, name)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise NotImplementedError(
            f"{name} is bfloat16 on the CPU: Triton's interpreter computes bfloat16 tl.dot wrongly; "
            "use float16/float32 there, or a CUDA device"
        )
    as_rows(x, name)
    return x


def check_residual(residual: object, x: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """``residual`` has the output's shape, the input's dtype and device, and addressable rows."""
    check_like(residual, "residual", x, "x")
    if tuple(residual.shape) != out_shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the output shape {out_shape}")
    as_rows(residual, "residual")
    return residual


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = act(x @ weight^T + bias) + residual`` in one kernel, ``act`` = erf GELU when ``gelu``.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32, contiguous in the last dim; a row slice of a 2-D
            tensor (any row stride) is read in place.
        weight: ``[N, K]`` as stored by ``nn.Linear``, same dtype and device as ``x``.
        bias: optional ``[N]``.
        gelu: apply the exact (erf) GELU after the bias.
        residual: optional ``[..., N]`` added last, e.g. the residual stream of a transformer block.

    Returns:
        ``[..., N]`` in the dtype of ``x``; accumulation and the epilogue run in float32.
    """
    check_input(x)
    check_weight(weight, "weight", x, x.shape[-1], f"x (shape {tuple(x.shape)})")
    out_shape = (*x.shape[:-1], weight.shape[0])
    if bias is not None:
        check_bias(bias, "bias", x, weight.shape[0])
    if residual is not None:
        check_residual(residual, x, out_shape)
    return _linear_op(x, weight, bias, residual, bool(gelu))


def gate_up_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(x Wg^T) * (x Wu^T)`` for ``w_gate_up = cat([Wg, Wu])`` in one kernel.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32, contiguous in the last dim (row slices allowed).
        w_gate_up: ``[2I, K]``: the gate rows, then the up rows.

    Returns:
        ``[..., I]`` in the dtype of ``x``; neither ``x Wg^T`` nor ``x Wu^T`` is rounded or stored.
    """
    check_input(x)
    check_weight(w_gate_up, "w_gate_up", x, x.shape[-1], f"x (shape {tuple(x.shape)})")
    if w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must stack gate and up rows [2I, K]; got {w_gate_up.shape[0]} rows")
    return _gate_up_swiglu_op(x, w_gate_up)


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
    cases = []
    for tile in _tiles(torch.bfloat16, arch, swiglu=False):
        size = f"{tile.bm}x{tile.bn}x{tile.bk}"
        cases.append(gemm_case(f"bias+residual {size}", tile, "bf16", HAS_BIAS=True, HAS_RESIDUAL=True))
        cases.append(gemm_case(f"bias+gelu ragged-K {size}", tile, "bf16", even_k=False, HAS_BIAS=True, GELU=True))
    for tile in _tiles(torch.bfloat16, arch, swiglu=True):
        cases.append(gemm_case(f"swiglu {tile.bm}x{tile.bn}x{tile.bk}", tile, "bf16", SWIGLU=True))
    tile = _tiles(torch.bfloat16, arch, swiglu=False)[1]
    cases.append(gemm_case("bias K=588 (unaligned)", tile, "bf16", k_aligned=False, HAS_BIAS=True))
    cases.append(gemm_case("fp32 all", _FP32[0], "fp32", even_k=False, HAS_BIAS=True, GELU=True, HAS_RESIDUAL=True))
    return cases
