"""Backward of the GEMM epilogues (:mod:`penguin_kernels.gemm`) and the two MLPs (:mod:`penguin_kernels.mlp`).

For ``y = act(x W^T + b) + residual``, ``z = x W^T + b`` the pre-activation::

    dz = dy * act'(z)        gelu'(z) = Phi(z) + z phi(z)            (exact erf GELU)
    dx = dz W      dW = dz^T x      db = sum_rows dz      dresidual = dy

and for SwiGLU, ``h = silu(g) u`` with ``[g | u] = x [Wg | Wu]^T``::

    dg = dh u sigma(g) (1 + g (1 - sigma(g)))        du = dh silu(g)

Design:

* **Recompute, do not save, the pre-activation.** The forward ops write only their output, as at
  inference; the backward recomputes ``z`` (``[M, 2I]`` gate/up, ``[M, H]`` projector hidden) with
  the forward's own Triton GEMM, then one fused elementwise kernel forms ``act'`` times the incoming
  gradient (and, for the MLPs, the activation ``h`` that the second GEMM's weight gradient needs).
  This keeps an MLP's saved activations at its inputs: against the eager reference, which keeps
  ``z``, ``silu(g)`` and ``h`` per layer (12 KiB per token at 2 x 3072 in bf16, plus 6 more), the
  recompute costs one GEMM of the forward's three (about 22% of an MLP's training FLOPs with the
  backward's six), a trade that activation checkpointing makes for the whole layer anyway.
* **The dX / dW GEMMs are cuBLAS (``torch.matmul``).** ``dz W`` reads W column-major, and
  ``dz^T x`` reduces over all M tokens (10^4 - 10^6) into a small ``[N, K]`` output: the Triton
  GEMM here takes ``W [N, K]`` row-major only (a transposed copy of the activations per call
  otherwise) and has no split-K, so the weight gradient would get ``N K / (128 x 256)`` programs
  (96 at 3072 x 1024) for 132 SMs, each looping over all M. cuBLAS takes both layouts natively,
  splits K, and accumulates in float32. The fused epilogue backward is where a custom kernel pays.
* Bias gradients are float32 row sums, rounded once. The Triton kernels are deterministic; cuBLAS is
  run to run for a given shape under PyTorch's deterministic settings (``CUBLAS_WORKSPACE_CONFIG``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from penguin_kernels.gemm import _gate_up_swiglu_op, _linear_op
from penguin_kernels.mlp import _projector_mlp_op, _swiglu_mlp_op

if TYPE_CHECKING:
    from penguin_kernels.compile_case import CompileCase

__all__ = ["gelu_backward", "swiglu_backward", "compile_cases"]

_BLOCK = 1024
_NUM_WARPS = 4
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_bwd_kernel(z_ptr, dy_ptr, dz_ptr, h_ptr, n_elements, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
    """``dz = dy gelu'(z)``, and ``h = gelu(z)`` when ``STORE_H``; contiguous flat tensors."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_elements
    b_z = tl.load(z_ptr + o, mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy_ptr + o, mask=m, other=0.0).to(tl.float32)
    b_cdf = 0.5 * (1.0 + tl.erf(b_z * _SQRT1_2))
    b_pdf = tl.exp(-0.5 * b_z * b_z) * _INV_SQRT_2PI
    tl.store(dz_ptr + o, (b_dy * (b_cdf + b_z * b_pdf)).to(dz_ptr.dtype.element_ty), mask=m)
    if STORE_H:
        tl.store(h_ptr + o, (b_z * b_cdf).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(gu_ptr, dh_ptr, dgu_ptr, h_ptr, M, I, STORE_H: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr):
    """``[dg | du]`` ``[M, 2I]`` from ``[g | u]`` ``[M, 2I]`` and ``dh`` ``[M, I]``; ``h`` when ``STORE_H``."""
    i_m, i_i = tl.program_id(0), tl.program_id(1)
    o_m = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
    o_i = i_i * BI + tl.arange(0, BI)
    m = (o_m < M)[:, None] & (o_i < I)[None, :]
    # [BM, BI]
    p_g = gu_ptr + o_m[:, None] * (2 * I) + o_i[None, :]
    b_g = tl.load(p_g, mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(p_g + I, mask=m, other=0.0).to(tl.float32)
    b_dh = tl.load(dh_ptr + o_m[:, None] * I + o_i[None, :], mask=m, other=0.0).to(tl.float32)
    b_sig = tl.sigmoid(b_g)
    b_silu = b_g * b_sig
    b_dg = b_dh * b_u * b_sig * (1.0 + b_g * (1.0 - b_sig))
    p_dg = dgu_ptr + o_m[:, None] * (2 * I) + o_i[None, :]
    tl.store(p_dg, b_dg.to(dgu_ptr.dtype.element_ty), mask=m)
    tl.store(p_dg + I, (b_dh * b_silu).to(dgu_ptr.dtype.element_ty), mask=m)
    if STORE_H:
        tl.store(h_ptr + o_m[:, None] * I + o_i[None, :], (b_silu * b_u).to(h_ptr.dtype.element_ty), mask=m)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


@triton_op("penguin::gelu_backward", mutates_args=())
def _gelu_backward_op(z: torch.Tensor, dy: torch.Tensor, store_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    z = _contiguous(z)
    dy = _contiguous(dy)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    h = torch.empty(z.shape if store_h else (0,), dtype=z.dtype, device=z.device)
    n = z.numel()
    if n:
        wrap_triton(_gelu_bwd_kernel)[(triton.cdiv(n, _BLOCK),)](
            z, dy, dz, h if store_h else dz, n, STORE_H=store_h, BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return dz, h


@triton_op("penguin::swiglu_backward", mutates_args=())
def _swiglu_backward_op(gate_up: torch.Tensor, dh: torch.Tensor, store_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = _contiguous(gate_up)
    dh = _contiguous(dh)
    inter = gate_up.shape[-1] // 2
    m = gate_up.numel() // max(2 * inter, 1)
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    h = torch.empty(dh.shape if store_h else (0,), dtype=gate_up.dtype, device=gate_up.device)
    if m and inter:
        bi = min(triton.next_power_of_2(inter), 128)
        bm = max(1, _BLOCK // bi)
        wrap_triton(_swiglu_bwd_kernel)[(triton.cdiv(m, bm), triton.cdiv(inter, bi))](
            gate_up, dh, dgu, h if store_h else dgu, m, inter, STORE_H=store_h, BM=bm, BI=bi, num_warps=_NUM_WARPS
        )
    return dgu, h


def gelu_backward(z: torch.Tensor, dy: torch.Tensor, *, store_h: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy * gelu'(z), gelu(z))`` (exact erf GELU) in float32, rounded to z's dtype; ``h`` is
    empty unless ``store_h``."""
    return torch.ops.penguin.gelu_backward(z, dy, store_h)


def swiglu_backward(
    gate_up: torch.Tensor, dh: torch.Tensor, *, store_h: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([dg | du], silu(g) u)`` for ``gate_up = [g | u]`` ``[..., 2I]`` and ``dh`` ``[..., I]``;
    ``h`` is empty unless ``store_h``."""
    return torch.ops.penguin.swiglu_backward(gate_up, dh, store_h)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _weight_grads(dz: torch.Tensor, x: torch.Tensor, needs_w: bool, needs_b: bool):
    """``dz^T x`` and ``sum_rows dz`` (float32, rounded once) when asked for."""
    dw = dz.t() @ x if needs_w else None
    db = dz.sum(0, dtype=torch.float32).to(dz.dtype) if needs_b else None
    return dw, db


def _setup_linear(ctx, inputs, output) -> None:
    x, weight, bias, residual, gelu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.gelu = gelu
    ctx.has_residual = residual is not None


def _backward_linear(ctx, dy: torch.Tensor):
    x, weight, bias = ctx.saved_tensors
    needs_x, needs_w, needs_b, needs_r, _ = ctx.needs_input_grad
    x_rows, dy_rows = _rows(x), _rows(dy)
    if ctx.gelu:
        z = torch.ops.penguin.linear(x_rows, weight, bias, None, False)
        dz, _ = torch.ops.penguin.gelu_backward(z, dy_rows, False)
    else:
        dz = dy_rows
    dx = (dz @ weight).view(x.shape) if needs_x else None
    dw, db = _weight_grads(dz, x_rows, needs_w, needs_b and bias is not None)
    dres = dy if needs_r and ctx.has_residual else None
    return dx, dw, db, dres, None


def _setup_gate_up(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward_gate_up(ctx, dh: torch.Tensor):
    x, w_gate_up = ctx.saved_tensors
    needs_x, needs_w = ctx.needs_input_grad
    x_rows = _rows(x)
    gate_up = torch.ops.penguin.linear(x_rows, w_gate_up, None, None, False)
    dgu, _ = torch.ops.penguin.swiglu_backward(gate_up, _rows(dh), False)
    dx = (dgu @ w_gate_up).view(x.shape) if needs_x else None
    dw = dgu.t() @ x_rows if needs_w else None
    return dx, dw


def _setup_swiglu_mlp(ctx, inputs, output) -> None:
    x, w_gate_up, w_down, residual = inputs
    ctx.save_for_backward(x, w_gate_up, w_down)
    ctx.has_residual = residual is not None


def _backward_swiglu_mlp(ctx, dy: torch.Tensor):
    x, w_gate_up, w_down = ctx.saved_tensors
    needs_x, needs_wgu, needs_wd, needs_r = ctx.needs_input_grad
    x_rows, dy_rows = _rows(x), _rows(dy)
    gate_up = torch.ops.penguin.linear(x_rows, w_gate_up, None, None, False)
    dh = dy_rows @ w_down
    dgu, h = torch.ops.penguin.swiglu_backward(gate_up, dh, needs_wd)
    dwd = dy_rows.t() @ h if needs_wd else None
    dx = (dgu @ w_gate_up).view(x.shape) if needs_x else None
    dwgu = dgu.t() @ x_rows if needs_wgu else None
    dres = dy if needs_r and ctx.has_residual else None
    return dx, dwgu, dwd, dres


def _setup_projector(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4])


def _backward_projector(ctx, dy: torch.Tensor):
    x, w1, b1, w2 = ctx.saved_tensors
    needs_x, needs_w1, needs_b1, needs_w2, needs_b2 = ctx.needs_input_grad
    x_rows, dy_rows = _rows(x), _rows(dy)
    z = torch.ops.penguin.linear(x_rows, w1, b1, None, False)
    dz, h = torch.ops.penguin.gelu_backward(z, dy_rows @ w2, needs_w2)
    dw2, db2 = _weight_grads(dy_rows, h, needs_w2, needs_b2)
    dx = (dz @ w1).view(x.shape) if needs_x else None
    dw1, db1 = _weight_grads(dz, x_rows, needs_w1, needs_b1)
    return dx, dw1, db1, dw2, db2


_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)
_gate_up_swiglu_op.register_autograd(_backward_gate_up, setup_context=_setup_gate_up)
_swiglu_mlp_op.register_autograd(_backward_swiglu_mlp, setup_context=_setup_swiglu_mlp)
_projector_mlp_op.register_autograd(_backward_projector, setup_context=_setup_projector)


def compile_cases(arch: int) -> list[CompileCase]:
    """The two elementwise backward kernels in bf16, with and without the activation output."""
    from penguin_kernels.compile_case import CompileCase

    cases = []
    for store_h in (False, True):
        cases.append(
            CompileCase(
                name=f"gelu_bwd_bf16{'_h' if store_h else ''}",
                fn=_gelu_bwd_kernel,
                signature={
                    "z_ptr": "*bf16",
                    "dy_ptr": "*bf16",
                    "dz_ptr": "*bf16",
                    "h_ptr": "*bf16",
                    "n_elements": "i32",
                },
                constexprs={"STORE_H": store_h, "BLOCK": _BLOCK},
                num_warps=_NUM_WARPS,
                num_stages=1,
                aligned=("n_elements",),
            )
        )
        cases.append(
            CompileCase(
                name=f"swiglu_bwd_bf16{'_h' if store_h else ''}",
                fn=_swiglu_bwd_kernel,
                signature={"gu_ptr": "*bf16", "dh_ptr": "*bf16", "dgu_ptr": "*bf16", "h_ptr": "*bf16"}
                | {"M": "i32", "I": "i32"},
                constexprs={"STORE_H": store_h, "BM": _BLOCK // 128, "BI": 128},
                num_warps=_NUM_WARPS,
                num_stages=1,
                aligned=("I",),
            )
        )
    return cases
