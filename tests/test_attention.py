"""``varlen_attention`` against the float32 reference: odd segment sizes, GQA, dtypes, errors."""

from __future__ import annotations

import pytest
import torch

import penguin_kernels.attention as attention
import penguin_kernels.device as device_module
from penguin_kernels import reference as ref
from penguin_kernels.attention import varlen_attention, varlen_attention_op
from tests.utils import HAS_CUDA, INTERPRETER, assert_rel_close, device, kernel_dtypes, poison, requires_cuda

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)

# Relative Frobenius error against the float32 reference on the same (rounded) inputs. The kernel
# rounds the softmax weights to the input dtype for the second matmul and the output once:
# float32 differs only by summation order and exp2 (measured ~2e-7); fp16 (unit roundoff 2^-11)
# measures ~2.5e-4 in the interpreter, and bf16 (2^-8, GPU only) should land 8x higher, ~2e-3.
# The bounds leave ~8x headroom.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _cu(lengths: list[int], dev: torch.device | str) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(dtype=torch.int32, device=dev)


def _qkv(n: int, heads: int, kv_heads: int, hd: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, hd, generator=gen) for h in (heads, kv_heads, kv_heads))
    return tuple(t.to(device=device(), dtype=dtype) for t in (q, k, v))


def _expected(q, k, v, cu, softmax_scale=None):
    """The float32 reference on the inputs' device, returned on the CPU."""
    return ref.varlen_attention(q.float(), k.float(), v.float(), cu.to(q.device), softmax_scale).cpu()


def _poisoned_empty(*args, **kwargs):
    return poison(torch.empty(*args, **kwargs))


@pytest.fixture
def poisoned(monkeypatch):
    """The op's output and block table start as NaN / INT_MAX, so unwritten elements show."""
    monkeypatch.setattr(attention, "_empty", _poisoned_empty)


def _never(*args, **kwargs):
    raise AssertionError("a buffer was allocated: validation should have failed first")


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(attention, "_empty", _never)


SEGMENTS = {
    "len1": [1, 1, 1, 1, 1],
    "odd": [17, 1, 40, 33, 5],
    "one": [75],
    "empty_segments": [0, 7, 0, 0, 19, 0],
    "several_key_blocks": [3, 101],
}


@requires_kernels
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("lengths", list(SEGMENTS.values()), ids=list(SEGMENTS))
def test_segments(lengths, dtype):
    q, k, v = _qkv(sum(lengths), 4, 2, 64, dtype, seed=len(lengths))
    cu = _cu(lengths, device())
    out = varlen_attention(q, k, v, cu)
    assert out.shape == q.shape and out.dtype == dtype
    assert_rel_close(out.float().cpu(), _expected(q, k, v, cu), TOL[dtype], f"{lengths}")


@requires_kernels
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("hd", [64, 128], ids=lambda d: f"hd{d}")
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1)], ids=["mha", "gqa2", "gqa4", "gqa8"])
def test_gqa_and_head_dims(heads, kv_heads, hd, dtype):
    lengths = [1, 19, 38]
    q, k, v = _qkv(sum(lengths), heads, kv_heads, hd, dtype, seed=heads * hd)
    cu = _cu(lengths, device())
    out = varlen_attention(q, k, v, cu)
    assert_rel_close(out.float().cpu(), _expected(q, k, v, cu), TOL[dtype], f"H={heads} KV={kv_heads} hd={hd}")


@requires_kernels
@pytest.mark.usefixtures("poisoned")
def test_many_short_segments():
    # one dtype: the interpreter runs one program per segment here, the costliest test of the file
    dtype = torch.float16
    gen = torch.Generator().manual_seed(5)
    # sorted, so the reference runs one SDPA call per distinct length (the block table's handling of
    # arbitrary orders is tested on its own below)
    lengths = sorted(torch.randint(0, 7, (500,), generator=gen).tolist())
    q, k, v = _qkv(sum(lengths), 2, 1, 64, dtype, seed=5)
    cu = _cu(lengths, device())
    out = varlen_attention(q, k, v, cu)
    assert_rel_close(out.float().cpu(), _expected(q, k, v, cu), TOL[dtype], "500 segments")


@requires_kernels
@pytest.mark.usefixtures("poisoned")
def test_packed_batch_equals_per_segment_runs():
    lengths = [9, 0, 40, 1, 23]
    q, k, v = _qkv(sum(lengths), 4, 2, 64, torch.float16, seed=7)
    cu = _cu(lengths, device())
    max_seqlen = max(lengths)
    packed = varlen_attention(q, k, v, cu, max_seqlen)
    start = 0
    for length in lengths:
        end = start + length
        alone = varlen_attention(q[start:end], k[start:end], v[start:end], _cu([length], device()), max_seqlen)
        # same config (same max_seqlen bound), same tiles: bit-identical
        assert torch.equal(packed[start:end], alone), f"segment [{start}, {end})"
        start = end


@requires_kernels
@pytest.mark.usefixtures("poisoned")
def test_strided_views_of_fused_qkv():
    heads, kv_heads, hd, lengths = 4, 2, 64, [13, 30]
    n = sum(lengths)
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * hd, generator=gen).to(device=device(), dtype=torch.float16)
    q = qkv[:, : heads * hd].view(n, heads, hd)
    k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(n, kv_heads, hd)
    v = qkv[:, (heads + kv_heads) * hd :].view(n, kv_heads, hd)
    assert not q.is_contiguous()
    cu = _cu(lengths, device())
    out = varlen_attention(q, k, v, cu)
    assert torch.equal(out, varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu))
    assert_rel_close(out.float().cpu(), _expected(q, k, v, cu), TOL[torch.float16], "fused qkv views")


@requires_kernels
@pytest.mark.usefixtures("poisoned")
def test_softmax_scale_and_flash_attn_keywords():
    lengths = [6, 21]
    q, k, v = _qkv(sum(lengths), 4, 2, 64, torch.float32, seed=11)
    cu = _cu(lengths, device())
    out = varlen_attention(q, k, v, cu, softmax_scale=0.3)
    assert_rel_close(out.cpu(), _expected(q, k, v, cu, softmax_scale=0.3), TOL[torch.float32], "scale 0.3")
    flash = varlen_attention(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=21, max_seqlen_k=21, softmax_scale=0.3
    )
    assert torch.equal(flash, out)


@requires_kernels
@pytest.mark.usefixtures("poisoned")
def test_registered_op_matches_public_function():
    lengths = [4, 0, 29]
    q, k, v = _qkv(sum(lengths), 4, 1, 64, torch.float16, seed=13)
    cu = _cu(lengths, device())
    out, _ = torch.ops.penguin.varlen_attention(q, k, v, cu, 29, None)
    assert torch.equal(out, varlen_attention(q, k, v, cu))
    # a larger max_seqlen is a valid bound: more spare table rows, same result
    assert torch.equal(varlen_attention_op(q, k, v, cu, 64), out)


@requires_kernels
@pytest.mark.parametrize("lengths", [[], [0, 0]], ids=["no_segments", "only_empty"])
def test_no_tokens(lengths):
    q, k, v = _qkv(0, 4, 2, 64, torch.float32, seed=0)
    out = varlen_attention(q, k, v, _cu(lengths, device()))
    assert out.shape == (0, 4, 64)


@requires_kernels
@pytest.mark.usefixtures("poisoned")
def test_block_table_across_chunks():
    # 2500 segments and more table rows than one chunk of the planning kernel: exercises the carries.
    gen = torch.Generator().manual_seed(17)
    lengths = torch.randint(0, 40, (2500,), generator=gen)
    lengths[100] = 700
    cu = _cu(lengths.tolist(), device())
    tokens = 16
    counts = (lengths + tokens - 1) // tokens
    n_plan = int(counts.sum()) + 37
    plan = _poisoned_empty((n_plan, 4), dtype=torch.int32, device=device())
    attention._plan_kernel[(1,)](cu, plan, lengths.numel(), n_plan, TOKENS_PER_BLOCK=tokens, BLOCK=1024)
    rows = []
    bounds = cu.tolist()
    for s, c in enumerate(counts.tolist()):
        rows += [(bounds[s], bounds[s + 1], bounds[s] + j * tokens) for j in range(c)]
    got = plan[:, :3].cpu()
    assert torch.equal(got[: len(rows)], torch.tensor(rows, dtype=torch.int32))
    spare = got[len(rows) :]
    assert (spare[:, 2] >= spare[:, 1]).all(), "spare rows must hold an empty range"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hd", [64, 128], ids=lambda d: f"hd{d}")
def test_gpu_long_segments_released_heads(hd, dtype, poisoned):
    lengths = [4096, 1, 1000, 77, 2048 + 3]
    q, k, v = _qkv(sum(lengths), 16, 8, hd, dtype, seed=hd)
    cu = _cu(lengths, device())
    out = varlen_attention(q, k, v, cu)
    assert_rel_close(out.float().cpu(), _expected(q, k, v, cu), TOL[dtype], f"long segments hd={hd}")


@requires_cuda
def test_gpu_offsets_past_int32():
    # Views of a fused QKV buffer with a 4096-element row stride: the last tokens sit past 2^31 elements.
    heads, kv_heads, hd, seqlen = 16, 8, 128, 1024
    n = 600 * seqlen + 77
    width = (heads + 2 * kv_heads) * hd
    assert (n - 1) * width > 2**31
    qkv = torch.randn(n, width, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : heads * hd].view(n, heads, hd)
    k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(n, kv_heads, hd)
    v = qkv[:, (heads + kv_heads) * hd :].view(n, kv_heads, hd)
    lengths = [seqlen] * 600 + [77]
    out = varlen_attention(q, k, v, _cu(lengths, "cuda"))
    tail = slice(n - 77 - seqlen, n)
    expected = _expected(q[tail], k[tail], v[tail], _cu([seqlen, 77], "cpu"))
    assert_rel_close(out[tail].float().cpu(), expected, TOL[torch.bfloat16], "segments past 2^31 elements")


@requires_cuda
def test_gpu_op_in_cuda_graph(poisoned):
    lengths = [300, 0, 17, 1024]
    q, k, v = _qkv(sum(lengths), 16, 8, 128, torch.bfloat16, seed=1)
    cu = _cu(lengths, device())
    eager = varlen_attention_op(q, k, v, cu, 1024)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = varlen_attention_op(q, k, v, cu, 1024)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@requires_cuda
def test_gpu_op_under_torch_compile():
    lengths = [100, 3, 250]
    q, k, v = _qkv(sum(lengths), 8, 2, 128, torch.bfloat16, seed=2)
    cu = _cu(lengths, device())
    compiled = torch.compile(lambda q, k, v, cu: varlen_attention_op(q, k, v, cu, 250), fullgraph=True)
    assert torch.equal(compiled(q, k, v, cu), varlen_attention_op(q, k, v, cu, 250))


def _inputs(n=8, heads=4, kv_heads=2, hd=64, dtype=torch.float32, dev="cpu"):
    q = torch.randn(n, heads, hd, dtype=dtype, device=dev)
    k = torch.randn(n, kv_heads, hd, dtype=dtype, device=dev)
    v = torch.randn(n, kv_heads, hd, dtype=dtype, device=dev)
    return q, k, v, _cu([3, 5], dev)


def _bad(hd: int = 64, **changes) -> dict:
    q, k, v, cu = _inputs(hd=hd)
    return {"q": q, "k": k, "v": v, "cu_seqlens": cu} | changes


def _flash(cu_q, cu_k, max_q=None, max_k=None) -> dict:
    """flash-attn's keywords in place of ``cu_seqlens`` / ``max_seqlen``."""
    return _bad(cu_seqlens=None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


def _i32(*values: int, dev: str = "cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=dev)


ERRORS = {
    "cu_not_from_0": (ValueError, "start at 0", lambda: _bad(cu_seqlens=_i32(1, 3, 8))),
    "cu_decreasing": (ValueError, "non-decreasing", lambda: _bad(cu_seqlens=_i32(0, 5, 3, 8))),
    "cu_last_not_n": (ValueError, "end at N", lambda: _bad(cu_seqlens=_i32(0, 3, 7))),
    "cu_int64": (TypeError, "int32", lambda: _bad(cu_seqlens=torch.tensor([0, 3, 8]))),
    "cu_2d": (ValueError, "1-D", lambda: _bad(cu_seqlens=torch.tensor([[0, 3, 8]], dtype=torch.int32))),
    "cu_empty": (ValueError, "1-D", lambda: _bad(cu_seqlens=torch.zeros(0, dtype=torch.int32))),
    "cu_device": (ValueError, "cu_seqlens is on meta", lambda: _bad(cu_seqlens=_i32(0, 3, 8, dev="meta"))),
    "cu_not_tensor": (TypeError, "cu_seqlens must be a torch.Tensor", lambda: _bad(cu_seqlens=[0, 3, 8])),
    "heads_not_multiple": (ValueError, "multiple", lambda: _bad(k=torch.randn(8, 3, 64), v=torch.randn(8, 3, 64))),
    "head_dim_96": (ValueError, "head_dim", lambda: _bad(hd=96)),
    "head_dim_32": (ValueError, "head_dim", lambda: _bad(hd=32)),
    "k_dtype": (TypeError, "k has dtype", lambda: _bad(k=torch.randn(8, 2, 64, dtype=torch.float16))),
    "v_dtype": (TypeError, "v has dtype", lambda: _bad(v=torch.randn(8, 2, 64, dtype=torch.float16))),
    "q_int": (TypeError, "q must have dtype", lambda: _bad(q=torch.zeros(8, 4, 64, dtype=torch.int32))),
    "k_device": (ValueError, "k is on meta", lambda: _bad(k=torch.randn(8, 2, 64, device="meta"))),
    "q_2d": (ValueError, "q must be 3-D", lambda: _bad(q=torch.randn(8, 256))),
    "tokens_differ": (ValueError, "N=8", lambda: _bad(k=torch.randn(9, 2, 64), v=torch.randn(9, 2, 64))),
    "k_v_shapes": (ValueError, "same shape", lambda: _bad(v=torch.randn(8, 1, 64))),
    "kv_head_dim": (ValueError, "head_dim=64", lambda: _bad(k=torch.randn(8, 2, 128), v=torch.randn(8, 2, 128))),
    "q_last_dim_strided": (ValueError, "last dim", lambda: _bad(q=torch.randn(8, 64, 4).transpose(1, 2))),
    "v_last_dim_strided": (ValueError, "last dim", lambda: _bad(v=torch.randn(8, 64, 2).transpose(1, 2))),
    "causal": (NotImplementedError, "causal", lambda: _bad(causal=True)),
    "dropout": (NotImplementedError, "dropout_p", lambda: _bad(dropout_p=0.1)),
    "scale_negative": (ValueError, "softmax_scale", lambda: _bad(softmax_scale=-0.1)),
    "scale_nan": (ValueError, "softmax_scale", lambda: _bad(softmax_scale=float("nan"))),
    "max_seqlen_short": (ValueError, "longest segment", lambda: _bad(max_seqlen=4)),
    "max_seqlen_tensor": (TypeError, "max_seqlen must be an int", lambda: _bad(max_seqlen=torch.tensor(5))),
    "flash_cu_differ": (ValueError, "must be equal", lambda: _flash(_i32(0, 3, 8), _i32(0, 4, 8))),
    "flash_max_differ": (ValueError, "must be equal", lambda: _flash(_i32(0, 3, 8), _i32(0, 3, 8), 5, 6)),
    "flash_half_pair": (TypeError, "passed together", lambda: _bad(cu_seqlens=None, cu_seqlens_q=_i32(0, 3, 8))),
    "flash_and_ours": (TypeError, "not both", lambda: _bad(cu_seqlens_q=_i32(0, 3, 8), cu_seqlens_k=_i32(0, 3, 8))),
    "no_cu_seqlens": (TypeError, "required", lambda: _bad(cu_seqlens=None)),
}  # fmt: skip


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_errors(case, monkeypatch):
    monkeypatch.setattr(device_module, "INTERPRETING", True)  # the CPU inputs are valid devices for these checks
    exc, match, make = ERRORS[case]
    with pytest.raises(exc, match=match):
        varlen_attention(**make())


@pytest.mark.usefixtures("no_launch")
def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(device_module, "INTERPRETING", False)
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="CUDA"):
        varlen_attention(q, k, v, cu)
