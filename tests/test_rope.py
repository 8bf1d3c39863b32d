"""``qk_norm_rope_2d`` and ``rope_positions`` against ``penguin_kernels.reference``.

The kernel mirrors every rounding of the reference (normalised value, weight product, cos/sin, the
two rotary products and their sum are each rounded to the input dtype), so in 16-bit dtypes only
sub-ulp float32 differences (sin/cos within 1.6 ulp of exact, summation order, rsqrt) can flip a
rounding, by one 16-bit ulp, in a small fraction of the elements. Bounds, relative Frobenius error
against the reference run in the same dtype on the same inputs:

=========  ========  ==========================================================================
dtype      tol       why
=========  ========  ==========================================================================
float32    1e-6      sin/cos, sum order and rsqrt each within ~2 ulp (2^-23); measured ~7e-8
float16    1e-4      1-ulp flips (2^-10 relative) in ~1e-4 of the elements; measured ~7e-6
bfloat16   1e-3      the same flips at 2^-7 relative; bf16 runs on a GPU only (the interpreter
                     truncates float32 -> bf16 instead of rounding to nearest)
=========  ========  ==========================================================================

and for 16-bit dtypes at most ``MISMATCH`` = 1e-3 of the elements may differ from the reference at
all (measured ~6e-5 for float16): a rounding step missing from the kernel would change most of them.
"""

from __future__ import annotations

import random

import pytest
import torch

import penguin_kernels.rope as rope
from bench.compile import check_case
from penguin_kernels import qk_norm_rope_2d, reference, rope_positions
from tests.utils import (
    HAS_CUDA,
    INTERPRETER,
    assert_rel_close,
    device,
    interpreter_fuses_fma,
    kernel_dtypes,
    poison,
    requires_cuda,
)

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)
# The sin/cos range reduction is exact only with a fused multiply-add (every GPU has one); Triton's
# interpreter before 3.7 rounds tl.fma twice, which moves large angles by ~1 ulp and the results by ~1e-5.
requires_fused_fma = pytest.mark.skipif(
    INTERPRETER and not interpreter_fuses_fma(),
    reason="this Triton's interpreter rounds tl.fma twice (Triton < 3.7); the parity bounds assume a fused fma",
)

TOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
MISMATCH = 1e-3
THETA, EPS = 1e6, 1e-6


@pytest.fixture
def poisoned(monkeypatch):
    """Every ``torch.empty`` during the test starts NaN-filled, so unwritten output elements show."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))


@pytest.fixture
def no_launch(monkeypatch):
    def launch(*args, **kwargs):
        raise AssertionError("the kernel was launched: validation should have failed first")

    monkeypatch.setattr(rope, "_launch", launch)


def _inputs(n, heads, kv_heads, hd, dtype, *, layout="fused", max_pos=4000, seed=0, dev=None):
    """q, k (views as ``layout`` says), norm weights near 1, positions below ``max_pos``, and the buffer."""
    gen = torch.Generator().manual_seed(seed)
    dev = dev or device()
    width = (heads + 2 * kv_heads) * hd
    if layout == "fused":
        # q and k as views of a fused QKV projection output [N, (H + 2 KV) hd]
        buf = (torch.randn(n, width, generator=gen) * 3).to(device=dev, dtype=dtype)
        q = buf[:, : heads * hd].view(n, heads, hd)
        k = buf[:, heads * hd : (heads + kv_heads) * hd].view(n, kv_heads, hd)
    elif layout == "head_major":
        # heads outermost: token stride hd, head stride N * hd
        buf = (torch.randn(heads + kv_heads, n, hd, generator=gen) * 3).to(device=dev, dtype=dtype)
        q = buf[:heads].transpose(0, 1)
        k = buf[heads:].transpose(0, 1)
    else:
        buf = None
        q = torch.randn(n, heads, hd, generator=gen).to(device=dev, dtype=dtype)
        k = torch.randn(n, kv_heads, hd, generator=gen).to(device=dev, dtype=dtype)
    wq, wk = ((1 + 0.2 * torch.randn(hd, generator=gen)).to(device=dev, dtype=dtype) for _ in range(2))
    # positions as a column slice of a wider int32 buffer: row stride 3, not 2
    pos = torch.randint(0, max_pos, (n, 3), generator=gen, dtype=torch.int32)[:, :2].to(dev)
    return q, k, wq, wk, pos, buf


def _check(out, expected, dtype, what):
    assert out.shape == expected.shape and out.dtype == expected.dtype, what
    assert out.is_contiguous(), f"{what}: output must be contiguous"
    assert_rel_close(out.float().cpu(), expected.float().cpu(), TOL[dtype], what)
    if dtype != torch.float32:
        mismatch = (out != expected).float().mean().item()
        assert mismatch <= MISMATCH, f"{what}: {mismatch:.2e} of the elements differ from the reference"


# (N, H, KV, hd, layout, max_pos): odd N and N=1, GQA ratios 1/2/4, every supported head dim family,
# the released dims, rows/cols up to thousands (and one case up to 10^5), each strided layout.
CASES = {
    "n1_mha_hd64": (1, 2, 2, 64, "fused", 4000),
    "odd_gqa2_hd128": (37, 4, 2, 128, "fused", 4000),
    "gqa4_hd64": (53, 8, 2, 64, "fused", 4000),
    "released_dims": (21, 16, 8, 128, "fused", 4000),
    "head_major_gqa2": (19, 4, 2, 64, "head_major", 3000),
    "contiguous_hd128": (23, 2, 1, 128, "contiguous", 4000),
    "hd16": (9, 2, 1, 16, "fused", 4000),
    "hd256": (5, 1, 1, 256, "fused", 4000),
    "many_blocks": (131, 2, 1, 64, "fused", 4000),
    "positions_1e5": (17, 2, 2, 64, "fused", 100_000),
}


@requires_kernels
@requires_fused_fma
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_reference(case, dtype):
    n, heads, kv_heads, hd, layout, max_pos = case
    q, k, wq, wk, pos, buf = _inputs(n, heads, kv_heads, hd, dtype, layout=layout, max_pos=max_pos, seed=n)
    before = None if buf is None else buf.clone()
    q_out, k_out = qk_norm_rope_2d(q, k, wq, wk, pos, theta=THETA, eps=EPS)
    q_ref, k_ref = reference.qk_norm_rope_2d(q, k, wq, wk, pos, theta=THETA, eps=EPS)
    _check(q_out, q_ref, dtype, "q")
    _check(k_out, k_ref, dtype, "k")
    if buf is not None:
        assert torch.equal(buf, before), "the input buffer (v of a fused QKV included) must be left untouched"


@requires_kernels
def test_positions_from_rope_positions_and_theta_1e4():
    """The model's path: positions built by ``rope_positions`` for images and a clip, theta 1e4."""
    grid = torch.tensor([[1, 6, 10], [2, 4, 6], [1, 1, 1]], device=device())
    merge = torch.tensor([1, 2, 1], device=device())
    pos, _ = rope_positions(grid, merge)
    q, k, wq, wk, _, _ = _inputs(pos.shape[0], 4, 2, 64, torch.float16, seed=3)
    q_out, k_out = qk_norm_rope_2d(q, k, wq, wk, pos, theta=1e4, eps=1e-5)
    q_ref, k_ref = reference.qk_norm_rope_2d(q, k, wq, wk, pos, theta=1e4, eps=1e-5)
    _check(q_out, q_ref, torch.float16, "q")
    _check(k_out, k_ref, torch.float16, "k")


@requires_kernels
def test_empty_batch():
    q, k, wq, wk, pos, _ = _inputs(0, 2, 1, 64, torch.float32)
    q_out, k_out = qk_norm_rope_2d(q, k, wq, wk, pos, theta=THETA, eps=EPS)
    assert q_out.shape == (0, 2, 64) and k_out.shape == (0, 1, 64)


@requires_kernels
@requires_fused_fma
def test_weights_requiring_grad_are_fine_under_no_grad():
    q, k, wq, wk, pos, _ = _inputs(5, 2, 1, 64, torch.float32)
    wq.requires_grad_(True)
    with torch.no_grad():
        q_out, _ = qk_norm_rope_2d(q, k, wq, wk, pos, theta=THETA, eps=EPS)
    q_ref, _ = reference.qk_norm_rope_2d(q, k, wq.detach(), wk, pos, theta=THETA, eps=EPS)
    assert_rel_close(q_out, q_ref, TOL[torch.float32])


def _bad(name):
    """Valid arguments on the kernel device, then one thing wrong."""
    dev = device()
    q, k, wq, wk, pos, _ = _inputs(6, 4, 2, 64, torch.float32, dev=dev)
    args = {"q": q, "k": k, "q_norm_weight": wq, "k_norm_weight": wk, "positions": pos}
    kwargs = {"theta": THETA, "eps": EPS}

    def randn(*shape):
        return torch.randn(*shape, device=dev)

    change = {
        "q_2d": {"q": q.reshape(6, -1)},
        "q_int": {"q": q.to(torch.int32)},
        "k_dtype": {"k": k.half()},
        "k_tokens": {"k": k[:5]},
        "k_head_dim": {"k": randn(6, 2, 32)},
        "weight_shape": {"q_norm_weight": wq[:32]},
        "weight_dtype": {"k_norm_weight": wk.half()},
        "weight_strided": {"q_norm_weight": randn(128)[::2]},
        "last_dim_strided": {"q": randn(6, 4, 128)[..., ::2]},
        "head_dim_96": {"q": randn(6, 4, 96), "k": randn(6, 2, 96)},
        "head_dim_8": {"q": randn(6, 4, 8), "k": randn(6, 2, 8)},
        "positions_int64": {"positions": pos.long()},
        "positions_shape": {"positions": pos[:, :1]},
        "positions_tokens": {"positions": pos[:4]},
        "positions_device": {"positions": pos.to("meta")},
        "k_device": {"k": k.to("meta")},
        "no_heads": {"q": randn(6, 0, 64)},
        "theta": {"theta": 0.0},
        "eps": {"eps": -1.0},
    }[name]
    for key, value in change.items():
        (kwargs if key in kwargs else args)[key] = value
    return args, kwargs


ERRORS = {
    "q_2d": (ValueError, "q must be"),
    "q_int": (TypeError, "q must have dtype"),
    "k_dtype": (TypeError, "k has dtype"),
    "k_tokens": (ValueError, "k must be"),
    "k_head_dim": (ValueError, "k must be"),
    "weight_shape": (ValueError, "q_norm_weight must be"),
    "weight_dtype": (TypeError, "k_norm_weight has dtype"),
    "weight_strided": (ValueError, "q_norm_weight must be contiguous"),
    "last_dim_strided": (ValueError, "contiguous in head_dim"),
    "head_dim_96": (NotImplementedError, "head_dim 96"),
    "head_dim_8": (NotImplementedError, "head_dim 8"),
    "positions_int64": (TypeError, "positions must be int32"),
    "positions_shape": (ValueError, "positions must be"),
    "positions_tokens": (ValueError, "positions must be"),
    "positions_device": (ValueError, "positions is on meta"),
    "k_device": (ValueError, "k is on meta"),
    "no_heads": (ValueError, "q has no heads"),
    "theta": (ValueError, "theta"),
    "eps": (ValueError, "eps"),
}


@requires_kernels
@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("name", list(ERRORS), ids=str)
def test_bad_inputs_raise_before_launch(name):
    args, kwargs = _bad(name)
    exc, message = ERRORS[name]
    with pytest.raises(exc, match=message):
        qk_norm_rope_2d(*args.values(), **kwargs)


def test_compile_cases_name_kernel_parameters():
    cases = rope.compile_cases(90)
    assert {c.name for c in cases} >= {"qk_norm_rope_2d_bf16_hd128", "qk_norm_rope_2d_fp16_hd64"}
    for case in cases:
        check_case(case)


@requires_cuda
@pytest.mark.usefixtures("poisoned")
def test_gpu_bf16_released_dims_many_tokens():
    q, k, wq, wk, pos, _ = _inputs(4099, 16, 8, 128, torch.bfloat16, dev="cuda", seed=7)
    q_out, k_out = qk_norm_rope_2d(q, k, wq, wk, pos, theta=THETA, eps=EPS)
    q_ref, k_ref = reference.qk_norm_rope_2d(q, k, wq, wk, pos, theta=THETA, eps=EPS)
    _check(q_out, q_ref, torch.bfloat16, "q")
    _check(k_out, k_ref, torch.bfloat16, "k")


@requires_cuda
def test_gpu_offsets_past_2_31():
    """A fused QKV buffer of more than 2^31 elements: the last tokens must land where they belong."""
    n, heads, kv_heads, hd = 525_000, 16, 8, 128
    assert n * (heads + 2 * kv_heads) * hd > 2**31
    buf = torch.randn(n, (heads + 2 * kv_heads) * hd, device="cuda", dtype=torch.bfloat16)
    q = buf[:, : heads * hd].view(n, heads, hd)
    k = buf[:, heads * hd : (heads + kv_heads) * hd].view(n, kv_heads, hd)
    w = torch.ones(hd, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 4000, (n, 2), device="cuda", dtype=torch.int32)
    q_out, k_out = qk_norm_rope_2d(q, k, w, w, pos, theta=THETA, eps=EPS)
    tail = slice(n - 7, n)
    q_ref, k_ref = reference.qk_norm_rope_2d(q[tail], k[tail], w, w, pos[tail], theta=THETA, eps=EPS)
    _check(q_out[tail], q_ref, torch.bfloat16, "q tail")
    _check(k_out[tail], k_ref, torch.bfloat16, "k tail")


@requires_cuda
def test_gpu_op_under_torch_compile():
    heads, kv_heads, hd = 16, 8, 128

    def attention_inputs(qkv, wq, wk, pos):
        n = qkv.shape[0]
        q = qkv[:, : heads * hd].view(n, heads, hd)
        k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(n, kv_heads, hd)
        return qk_norm_rope_2d(q, k, wq, wk, pos, theta=THETA, eps=EPS)

    _, _, wq, wk, pos, qkv = _inputs(301, heads, kv_heads, hd, torch.bfloat16, dev="cuda")
    compiled = torch.compile(attention_inputs, fullgraph=True)
    for got, want in zip(compiled(qkv, wq, wk, pos), attention_inputs(qkv, wq, wk, pos), strict=True):
        assert torch.equal(got, want)


def _random_batch(rng: random.Random, items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (t = 1) and clips (t > 1) with merge sizes 1, 2, 4 and grids of mixed sizes."""
    grids, merges = [], []
    for _ in range(items):
        m = rng.choice((1, 2, 4))
        t = 1 if rng.random() < 0.6 else rng.randint(2, 9)
        grids.append((t, m * rng.randint(1, 12), m * rng.randint(1, 12)))
        merges.append(m)
    return torch.tensor(grids), torch.tensor(merges)


def _assert_positions_match(grid, merge, **hints):
    pos, cu = rope_positions(grid, merge, **hints)
    pos_ref, cu_ref = reference.rope_positions(grid, merge)
    assert pos.dtype == cu.dtype == torch.int32
    assert pos.device == cu.device == grid.device
    assert torch.equal(pos.cpu(), pos_ref.cpu()), "positions differ from the reference"
    assert torch.equal(cu.cpu(), cu_ref.cpu()), "cu_seqlens differ from the reference"


@pytest.mark.parametrize("seed", range(12), ids=lambda s: f"seed{s}")
def test_rope_positions_random_mixes(seed):
    rng = random.Random(seed)
    grid, merge = _random_batch(rng, rng.randint(1, 14))
    _assert_positions_match(grid, merge)


def test_rope_positions_180_frame_clip_among_images():
    grid = torch.tensor([[1, 32, 32], [180, 16, 24], [1, 14, 4], [3, 8, 8]], dtype=torch.int32)
    merge = torch.tensor([1, 2, 1, 4], dtype=torch.int32)
    _assert_positions_match(grid, merge)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8], ids=str)
def test_rope_positions_integer_dtypes(dtype):
    grid = torch.tensor([[1, 6, 10], [2, 4, 6]], dtype=dtype)
    _assert_positions_match(grid, torch.tensor([1, 2], dtype=dtype))


def test_rope_positions_hints_match_and_are_checked_on_cpu():
    grid = torch.tensor([[1, 6, 10], [5, 4, 6]])
    merge = torch.tensor([1, 2])
    _assert_positions_match(grid, merge, total_tokens=180, num_frames=6)
    with pytest.raises(ValueError, match="disagree"):
        rope_positions(grid, merge, total_tokens=181, num_frames=6)
    with pytest.raises(ValueError, match="both"):
        rope_positions(grid, merge, total_tokens=180)


def test_rope_positions_one_host_read_without_hints_none_with(monkeypatch):
    """One device-to-host read (N, frames, validity) without hints; with them, meta tensors suffice,
    which proves no value is read (nor looped over) on the host."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    grid = torch.tensor([[180, 16, 24], [1, 32, 32]])
    merge = torch.tensor([2, 1])
    rope_positions(grid, merge)
    assert len(reads) == 1
    pos, cu = rope_positions(grid.to("meta"), merge.to("meta"), total_tokens=70_144, num_frames=181)
    assert pos.shape == (70_144, 2) and cu.shape == (182,) and pos.dtype == cu.dtype == torch.int32


def test_rope_positions_empty_batch():
    pos, cu = rope_positions(torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert pos.shape == (0, 2) and cu.tolist() == [0]


@pytest.mark.parametrize(
    "grid, merge, exc, message",
    [
        ([[1, 4, 4]], [1.0], TypeError, "merge_sizes must have an integer dtype"),
        ([[1.0, 4, 4]], [1], TypeError, "grid_sizes must have an integer dtype"),
        ([[1, 4]], [1], ValueError, r"grid_sizes must be \[B, 3\]"),
        ([[1, 4, 4], [1, 2, 2]], [1], ValueError, r"merge_sizes must be \[B\] = \[2\]"),
        ([[1, 4, 4], [1, 6, 4]], [1, 4], ValueError, r"item 1: .*\(1, 6, 4\) with merge_sizes 4"),
        ([[0, 4, 4]], [1], ValueError, "item 0"),
        ([[1, -4, 4]], [1], ValueError, "item 0"),
        ([[1, 4, 4]], [0], ValueError, "item 0"),
    ],
    ids=["merge_float", "grid_float", "grid_shape", "merge_count", "indivisible", "t0", "negative", "merge0"],
)
def test_rope_positions_bad_inputs(grid, merge, exc, message):
    with pytest.raises(exc, match=message):
        rope_positions(torch.tensor(grid), torch.tensor(merge))


def test_rope_positions_bool_and_device_mismatch():
    with pytest.raises(TypeError, match="grid_sizes must have an integer dtype"):
        rope_positions(torch.ones(1, 3, dtype=torch.bool), torch.ones(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="merge_sizes is on meta"):
        rope_positions(torch.ones(1, 3, dtype=torch.int64), torch.ones(1, dtype=torch.int64, device="meta"))


@requires_cuda
@pytest.mark.parametrize("seed", range(3), ids=lambda s: f"seed{s}")
def test_gpu_rope_positions(seed):
    rng = random.Random(seed)
    grid, merge = _random_batch(rng, 10)
    grid, merge = grid.cuda(), merge.cuda()
    _assert_positions_match(grid, merge)
    n, frames = int((grid.prod(1)).sum()), int(grid[:, 0].sum())
    _assert_positions_match(grid, merge, total_tokens=n, num_frames=frames)
