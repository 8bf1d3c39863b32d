"""A small GEMM kernel with known compile properties, to test the static inspection tools."""

from __future__ import annotations

import triton
import triton.language as tl

from penguin_kernels.compile_case import CompileCase


@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    # [BM, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        m_k = k + o_k < K
        b_a = tl.load(a_ptr + o_m[:, None] * stride_am + (k + o_k)[None, :] * stride_ak, mask=m_k[None, :])
        b_b = tl.load(b_ptr + (k + o_k)[:, None] * stride_bk + o_n[None, :] * stride_bn, mask=m_k[:, None])
        acc = tl.dot(b_a, b_b, acc)
    m_c = (o_m < M)[:, None] & (o_n < N)[None, :]
    tl.store(c_ptr + o_m[:, None] * stride_cm + o_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=m_c)


_SIGNATURE = {
    "a_ptr": "*bf16",
    "b_ptr": "*bf16",
    "c_ptr": "*bf16",
    "M": "i32",
    "N": "i32",
    "K": "i32",
    "stride_am": "i32",
    "stride_bk": "i32",
    "stride_cm": "i32",
}


def compile_cases(arch: int) -> list[CompileCase]:
    """``fits``: a tensor-core tile that compiles cleanly; ``spills``: a 64 x 128 fp32 accumulator on one warp."""
    tiles = {"fits": (128, 128, 64, 8, 3), "spills": (64, 128, 32, 1, 1)}
    return [
        CompileCase(
            name=name,
            fn=_matmul_kernel,
            signature=_SIGNATURE,
            constexprs={"stride_ak": 1, "stride_bn": 1, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            num_warps=warps,
            num_stages=stages,
            tensor_cores=True,
            aligned=("stride_am", "stride_bk", "stride_cm"),
        )
        for name, (bm, bn, bk, warps, stages) in tiles.items()
    ]
