"""Gradients of the norm, rotary, GEMM and MLP ops against autograd through the float64 reference.

Relative Frobenius error of every input gradient against the float64 reference's on the same
(rounded) inputs and output gradients. The backward kernels compute in float32 and round each
gradient once; the GEMM ones also round the recomputed pre-activation and ``dz`` to the input dtype
before cuBLAS (float32 accumulation):

=========  ========  ====================================================================
dtype      tol       why
=========  ========  ====================================================================
float32    2e-6      summation order only; measured up to ~3e-7
float16    3e-3      one or two roundings at 2^-11 per value; measured up to ~4.5e-4
bfloat16   2.5e-2    the same at 2^-8 (8x fp16); GPU only (bf16 ``tl.dot`` is wrong in the
                     interpreter)
=========  ========  ====================================================================

``torch.autograd.gradcheck`` checks the backward kernels of the norms, the rotary and the GELU and
SwiGLU epilogues in float64 against finite differences of the float64 reference (the forward ops
take 16-bit and float32 inputs only). The GEMM ops' dX/dW are cuBLAS matmuls, checked by the float32
comparison above; their float64 ``tl.dot`` in the interpreter is not exact, so no gradcheck there.
Compile tests and the fake-tensor half of ``opcheck`` need a GPU: under ``TRITON_INTERPRET=1``
torch's ``wrap_triton`` hands back the interpreted kernel itself, which fails on FakeTensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import penguin_kernels as pk
from penguin_kernels import reference as ref
from penguin_kernels.rope import _inv_freq
from tests.utils import HAS_CUDA, INTERPRETER, assert_rel_close, device, kernel_dtypes, requires_cuda

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)

TOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
EPS, THETA = 1e-6, 1e6
M, D = 37, 96


def _randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm_weight(d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(d, generator=gen) + 0.5


def _rope_case(gen: torch.Generator):
    n, heads, kv_heads, hd = 29, 4, 2, 64
    # q and k as views of a fused QKV buffer, as the encoder passes them
    qkv = _randn(n, (heads + 2 * kv_heads) * hd, gen=gen, scale=3)
    positions = torch.randint(0, 4000, (n, 2), generator=gen, dtype=torch.int32)

    def kernel(qkv, wq, wk):
        q = qkv[:, : heads * hd].view(n, heads, hd)
        k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(n, kv_heads, hd)
        return pk.qk_norm_rope_2d(q, k, wq, wk, positions.to(qkv.device), theta=THETA, eps=EPS)

    def reference(qkv, wq, wk):
        q = qkv[:, : heads * hd].view(n, heads, hd)
        k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(n, kv_heads, hd)
        return ref.qk_norm_rope_2d(q, k, wq, wk, positions, theta=THETA, eps=EPS)

    return kernel, reference, [qkv, _norm_weight(hd, gen), _norm_weight(hd, gen)]


def _cases() -> dict:
    """name -> builder(gen) -> (kernel fn, reference fn, float32 inputs)."""
    return {
        "rms_norm": lambda g: (
            lambda x, w: pk.rms_norm(x, w, EPS),
            lambda x, w: ref.rms_norm(x, w, EPS),
            [_randn(3, M // 3 + 1, D, gen=g), _norm_weight(D, g)],
        ),
        "rms_norm_residual": lambda g: (
            lambda x, r, w: pk.rms_norm_residual(x, r, w, EPS),
            lambda x, r, w: ref.rms_norm_residual(x, r, w, EPS),
            [_randn(M, D, gen=g), _randn(M, D, gen=g), _norm_weight(D, g)],
        ),
        "qk_norm_rope_2d": _rope_case,
        "linear_bias_gelu_residual": lambda g: (
            lambda x, w, b, r: pk.linear(x, w, b, gelu=True, residual=r),
            lambda x, w, b, r: F.gelu(ref.linear(x, w, b)) + r,
            [_randn(M, D, gen=g), _randn(80, D, gen=g, scale=0.1), _randn(80, gen=g), _randn(M, 80, gen=g)],
        ),
        "linear_bias": lambda g: (
            lambda x, w, b: pk.linear(x, w, b),
            ref.linear,
            [_randn(2, 9, D, gen=g), _randn(40, D, gen=g, scale=0.1), _randn(40, gen=g)],
        ),
        "linear_residual": lambda g: (
            lambda x, w, r: pk.linear(x, w, residual=r),
            lambda x, w, r: ref.linear(x, w) + r,
            [_randn(M, D, gen=g), _randn(24, D, gen=g, scale=0.1), _randn(M, 24, gen=g)],
        ),
        "gate_up_swiglu": lambda g: (
            pk.gate_up_swiglu,
            lambda x, w: ref.swiglu(ref.linear(x, w)),
            [_randn(M, D, gen=g), _randn(2 * 48, D, gen=g, scale=0.2)],
        ),
        "swiglu_mlp": lambda g: (
            pk.swiglu_mlp,
            ref.swiglu_mlp,
            [_randn(M, D, gen=g), _randn(2 * 48, D, gen=g, scale=0.2), _randn(D, 48, gen=g, scale=0.2),
             _randn(M, D, gen=g)],
        ),
        "projector_mlp": lambda g: (
            pk.projector_mlp,
            ref.projector_mlp,
            [_randn(M, D, gen=g), _randn(64, D, gen=g, scale=0.2), _randn(64, gen=g),
             _randn(72, 64, gen=g, scale=0.2), _randn(72, gen=g)],
        ),
    }  # fmt: skip


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _run(fn, inputs, grads_out):
    outs = _as_tuple(fn(*inputs))
    torch.autograd.backward(outs, grads_out)
    return [t.grad for t in inputs]


@requires_kernels
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("name", list(_cases()))
def test_gradients_match_reference(name, dtype):
    gen = torch.Generator().manual_seed(len(name))
    kernel, reference, inputs = _cases()[name](gen)
    leaves = [t.to(device=device(), dtype=dtype).requires_grad_() for t in inputs]
    with torch.no_grad():
        outs = _as_tuple(kernel(*leaves))
    grads_out = [torch.randn(o.shape, generator=gen).to(device=device(), dtype=dtype) for o in outs]
    got = _run(kernel, leaves, grads_out)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    expected = _run(reference, ref_leaves, [g.cpu().double() for g in grads_out])
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == dtype and g.shape == e.shape
        assert_rel_close(g.float().cpu(), e, TOL[dtype], f"{name}: gradient of input {i}")


@requires_kernels
@pytest.mark.parametrize("name", ["rms_norm", "qk_norm_rope_2d", "swiglu_mlp"])
def test_repeated_backward_is_bit_identical(name):
    kernel, _, inputs = _cases()[name](torch.Generator().manual_seed(1))
    leaves = [t.to(device()).requires_grad_() for t in inputs]
    outs = _as_tuple(kernel(*leaves))
    grads_out = [torch.ones_like(o) for o in outs]
    first = torch.autograd.grad(outs, leaves, grads_out, retain_graph=True)
    second = torch.autograd.grad(outs, leaves, grads_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@requires_kernels
def test_rms_norm_residual_with_only_the_normed_output_used():
    gen = torch.Generator().manual_seed(4)
    x, r, w = (
        t.to(device()).requires_grad_() for t in (_randn(M, D, gen=gen), _randn(M, D, gen=gen), _norm_weight(D, gen))
    )
    dy = _randn(M, D, gen=gen).to(device())
    pk.rms_norm_residual(x, r, w, EPS)[0].backward(dy)
    xe, re, we = (t.detach().cpu().double().requires_grad_() for t in (x, r, w))
    ref.rms_norm_residual(xe, re, we, EPS)[0].backward(dy.cpu().double())
    for g, e, what in ((x.grad, xe.grad, "x"), (r.grad, re.grad, "residual"), (w.grad, we.grad, "weight")):
        assert_rel_close(g.cpu(), e, TOL[torch.float32], what)


@requires_kernels
def test_frozen_weights_get_no_gradient():
    gen = torch.Generator().manual_seed(6)
    x = _randn(M, D, gen=gen).to(device()).requires_grad_()
    w1, b1, w2, b2 = (
        t.to(device())
        for t in (_randn(64, D, gen=gen), _randn(64, gen=gen), _randn(8, 64, gen=gen), _randn(8, gen=gen))
    )
    pk.projector_mlp(x, w1, b1, w2, b2).sum().backward()
    xe = x.detach().cpu().double().requires_grad_()
    ref.projector_mlp(xe, *(t.cpu().double() for t in (w1, b1, w2, b2))).sum().backward()
    assert_rel_close(x.grad.cpu(), xe.grad, TOL[torch.float32], "x")
    assert all(t.grad is None for t in (w1, b1, w2, b2))


@requires_kernels
def test_activation_checkpointing_of_a_block():
    gen = torch.Generator().manual_seed(8)
    x, res, w_norm = _randn(M, D, gen=gen), _randn(M, D, gen=gen), _norm_weight(D, gen)
    w_gu, w_down = _randn(2 * 48, D, gen=gen, scale=0.2), _randn(D, 48, gen=gen, scale=0.2)
    leaves = [t.to(device()).requires_grad_() for t in (x, res, w_norm, w_gu, w_down)]

    def block(x, res, w_norm, w_gu, w_down):
        h, s = pk.rms_norm_residual(x, res, w_norm, EPS)
        return pk.swiglu_mlp(h, w_gu, w_down, s)

    dy = torch.randn(M, D, generator=gen).to(device())
    expected = torch.autograd.grad(block(*leaves), leaves, dy)
    out = torch.utils.checkpoint.checkpoint(block, *leaves, use_reentrant=False)
    got = torch.autograd.grad(out, leaves, dy)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def _with_our_backward(forward, backward):
    """``forward`` (the float64 reference) with ``backward(saved inputs, output grads)`` as its gradient."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return forward(*inputs)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx.saved_tensors, grads)

    return Function.apply


def _gradcheck_cases(gen: torch.Generator) -> dict:
    """name -> (reference forward, our backward kernels on its saved inputs, float32 inputs)."""
    ops = torch.ops.penguin
    n, hd = 6, 64
    positions = torch.randint(0, 300, (n, 2), generator=gen, dtype=torch.int32).to(device())
    inv_freq = _inv_freq(hd, THETA, torch.device(device()))
    return {
        "rms_norm": (
            lambda x, w: ref.rms_norm(x, w, EPS),
            lambda saved, grads: ops.rms_norm_backward(grads[0], *saved, None, EPS),
            [_randn(5, 24, gen=gen), _norm_weight(24, gen)],
        ),
        "rms_norm_residual": (
            lambda x, r, w: ref.rms_norm_residual(x, r, w, EPS),
            lambda saved, grads: _residual_grads(grads, *saved),
            [_randn(5, 24, gen=gen), _randn(5, 24, gen=gen), _norm_weight(24, gen)],
        ),
        "qk_norm_rope_2d": (
            lambda q, k, wq, wk: ref.qk_norm_rope_2d(q, k, wq, wk, positions, theta=THETA, eps=EPS),
            lambda saved, grads: ops.qk_norm_rope_2d_backward(*grads, *saved, positions, inv_freq, EPS),
            [_randn(n, 2, hd, gen=gen), _randn(n, 1, hd, gen=gen), _norm_weight(hd, gen), _norm_weight(hd, gen)],
        ),
        "gelu": (
            F.gelu,
            lambda saved, grads: ops.gelu_backward(saved[0], grads[0], False)[0],
            [_randn(7, 33, gen=gen, scale=2)],
        ),
        "swiglu": (
            ref.swiglu,
            lambda saved, grads: ops.swiglu_backward(saved[0], grads[0], False)[0],
            [_randn(7, 2 * 20, gen=gen, scale=2)],
        ),
    }  # fmt: skip


def _residual_grads(grads, x, residual, weight) -> tuple[torch.Tensor, ...]:
    dx, dw = torch.ops.penguin.rms_norm_backward(grads[0], x + residual, weight, grads[1], EPS)
    return dx, dx, dw


@requires_kernels
@pytest.mark.parametrize("name", ["rms_norm", "rms_norm_residual", "qk_norm_rope_2d", "gelu", "swiglu"])
def test_gradcheck_float64(name):
    # The backward kernels against finite differences of the float64 reference. The forward ops take
    # 16-bit and float32 inputs only, so the float64 function differentiated here is the reference,
    # and its gradient is ours: the backward kernels run on the float64 tensors (computing in float32,
    # hence the 1e-5 tolerances, ~100x their measured error and far below a wrong term's).
    forward, backward, inputs = _gradcheck_cases(torch.Generator().manual_seed(9))[name]
    leaves = [t.to(device=device(), dtype=torch.float64).requires_grad_() for t in inputs]
    # fast mode: random projections of the Jacobian (the full one runs the kernels once per output element)
    check = _with_our_backward(forward, backward)
    assert torch.autograd.gradcheck(check, leaves, atol=1e-5, rtol=1e-5, fast_mode=True)


def _opcheck_utils() -> tuple[str, ...]:
    utils = ("test_schema", "test_autograd_registration")
    return utils + ("test_faketensor", "test_aot_dispatch_dynamic") if device() == "cuda" else utils


@requires_kernels
def test_ops_schema_and_autograd_registration():
    gen = torch.Generator().manual_seed(10)
    dev = device()
    x, r, dy = (_randn(6, 32, gen=gen).to(dev) for _ in range(3))
    w = _norm_weight(32, gen).to(dev)
    wl, b = _randn(16, 32, gen=gen).to(dev), _randn(16, gen=gen).to(dev)
    w_down = _randn(32, 8, gen=gen).to(dev)
    q, k = _randn(5, 2, 64, gen=gen).to(dev), _randn(5, 1, 64, gen=gen).to(dev)
    wq, wk = _norm_weight(64, gen).to(dev), _norm_weight(64, gen).to(dev)
    positions = torch.randint(0, 30, (5, 2), generator=gen, dtype=torch.int32).to(dev)
    inv_freq = _inv_freq(64, THETA, torch.device(dev))
    ops = torch.ops.penguin
    calls = [
        (ops.rms_norm.default, (x, w, EPS)),
        (ops.rms_norm_residual.default, (x, r, w, EPS)),
        (ops.rms_norm_backward.default, (dy, x, w, r, EPS)),
        (ops.linear.default, (x, wl, b, None, True)),
        (ops.gate_up_swiglu.default, (x, wl)),
        (ops.swiglu_mlp.default, (x, wl, w_down, r)),
        (ops.projector_mlp.default, (x, wl, b, wl[:, :16].contiguous(), b)),
        (ops.gelu_backward.default, (x, dy, True)),
        (ops.swiglu_backward.default, (torch.cat([x, r], 1), dy, True)),
        (ops.qk_norm_rope_2d.default, (q, k, wq, wk, positions, inv_freq, EPS)),
        (ops.qk_norm_rope_2d_backward.default, (q, k, q, k, wq, wk, positions, inv_freq, EPS)),
    ]
    for op, args in calls:
        # forward ops with inputs that require grad, so that their autograd registration is checked
        if "backward" not in str(op):
            args = tuple(a.clone().requires_grad_() if _is_float(a) else a for a in args)
        torch.library.opcheck(op, args, test_utils=_opcheck_utils())


def _is_float(a: object) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


@requires_cuda
def test_gpu_block_forward_and_backward_under_torch_compile():
    gen = torch.Generator().manual_seed(12)
    shapes = [(300, 1024), (300, 1024), (1024,), (2 * 3072, 1024), (1024, 3072)]
    eager = [
        (torch.randn(*s, generator=gen) * (0.02 if len(s) == 2 and s[0] != 300 else 1)).cuda().bfloat16()
        for s in shapes
    ]
    eager = [t.requires_grad_() for t in eager]
    compiled = [t.detach().clone().requires_grad_() for t in eager]

    def block(x, res, w_norm, w_gu, w_down):
        h, s = pk.rms_norm_residual(x, res, w_norm, EPS)
        return pk.swiglu_mlp(h, w_gu, w_down, s)

    dy = torch.randn(300, 1024, generator=gen).cuda().bfloat16()
    block(*eager).backward(dy)
    torch.compile(block, fullgraph=True)(*compiled).backward(dy)
    # inductor may re-order the float32 weight-gradient sums it fuses: at most a bf16 rounding apart
    for i, (c, e) in enumerate(zip(compiled, eager, strict=True)):
        assert_rel_close(c.grad.float(), e.grad.float(), 1e-2, f"gradient of input {i}")
