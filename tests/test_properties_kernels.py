"""Properties of the public kernel functions over random shapes, dtypes, strides, devices and segment mixes:
each call either matches :mod:`penguin_kernels.reference` or raises a documented error (TypeError,
ValueError, NotImplementedError) that names the argument at fault, before any kernel is launched.

Every example draws one case: all arguments valid, or exactly one of them made bad in one way (a dtype the
kernels do not take, another device, a last dim that is not contiguous, a wrong size, not a tensor). Valid
strided layouts (row slices of a wider tensor) must give the reference's result.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from hypothesis import given
from hypothesis import strategies as st
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import penguin_kernels as pk
from penguin_kernels import reference
from tests.utils import assert_rel_close, device, kernel_dtypes

# float32: summation order only; float16: a result rounded to 11 bits (2^-11 = 4.9e-4) once or twice after
# float32 math. Random small shapes include one-row, one-hidden-unit cases whose single, nearly cancelling
# dot product is not averaged over a large output (4.7e-5 measured in float32 at k=16, i=1), hence ten
# times the per-op tests' bounds, which hold on averaged shapes.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DOCUMENTED = (TypeError, ValueError, NotImplementedError)
BAD_KINDS = ("dtype", "device", "stride", "size", "type")


class _Launches:
    count = 0


@contextlib.contextmanager
def _counting_launches() -> Iterator[_Launches]:
    """Count kernel launches (compiled or interpreted) inside the block."""
    launches = _Launches()

    def counted(original: Callable) -> Callable:
        def run(self, *args, **kwargs):
            launches.count += 1
            return original(self, *args, **kwargs)

        return run

    with (
        mock.patch.object(JITFunction, "run", counted(JITFunction.run)),
        mock.patch.object(InterpretedFunction, "run", counted(InterpretedFunction.run)),
    ):
        yield launches


def _spoil(t: torch.Tensor, kind: str) -> Any:
    """``t`` made bad in one way."""
    if kind == "dtype":
        return t.double()
    if kind == "device":
        return t.to("meta")
    if kind == "stride":  # the same values with a last dim of stride 2
        wide = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "size":
        return torch.cat([t, t[..., :1]], dim=-1)
    return t.tolist()


def _row_slice(t: torch.Tensor) -> torch.Tensor:
    """The same values as every other row of a taller tensor: a valid strided layout."""
    rows = t.reshape(-1, t.shape[-1])
    tall = torch.empty((2 * rows.shape[0], rows.shape[1]), dtype=t.dtype, device=t.device).normal_()
    tall[::2] = rows
    return tall[::2] if t.dim() == 2 else t


def _check(
    call: Callable[[dict], Any],
    ref: Callable[[dict], Any],
    args: dict,
    culprit: str | None,
    dtype,
    layout: bool = False,
) -> None:
    """``call(args)`` raises naming ``culprit`` before any launch, or (no culprit, or only a ``layout`` the
    kernels may copy into shape) returns the reference's result."""
    with _counting_launches() as launches:
        try:
            out = call(args)
        except DOCUMENTED as e:
            assert culprit is not None, f"valid arguments refused: {type(e).__name__}: {e}"
            assert re.search(rf"\b{culprit}\b", str(e)), f"the error does not name {culprit!r}: {e}"
            assert launches.count == 0, f"{launches.count} kernel launches before the error"
            return
    assert culprit is None or layout, f"a bad {culprit} was accepted"
    expected = ref(args)
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    for o, e in zip(outs, exps, strict=True):
        assert o.dtype == dtype and o.is_contiguous()
        assert_rel_close(o.float().cpu(), e.float().cpu(), TOL[dtype])


class Case(dict):
    """Arguments by name; ``culprit`` names the one made bad, ``layout`` says it only lost its unit stride."""

    culprit: str | None = None
    layout: bool = False


def _case(draw, tensors: dict[str, torch.Tensor], slicable: tuple[str, ...]) -> Case:
    """Leave the arguments valid, lay one out as a row slice (still valid), or spoil one."""
    case = Case(tensors)
    choice = draw(st.sampled_from(["valid", "row-slice", "bad"]))
    if choice == "row-slice" and slicable:
        name = draw(st.sampled_from(slicable))
        case[name] = _row_slice(tensors[name])
    elif choice == "bad":
        name = draw(st.sampled_from(sorted(tensors)))
        kind = draw(st.sampled_from(BAD_KINDS))
        if (
            kind == "stride"
            and tensors[name].shape[-1] < 2
            or kind == "dtype"
            and not tensors[name].is_floating_point()
        ):
            kind = "size"
        case[name] = _spoil(tensors[name], kind)
        case.culprit, case.layout = name, kind == "stride"
    return case


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape) * scale).to(dtype=dtype, device=device())


dtypes = st.sampled_from(kernel_dtypes())
seeds = st.integers(0, 2**31 - 1)  # tensors drawn from a seed per example, so that a failure replays
rows = st.integers(0, 9)


@given(seed=seeds, data=st.data(), dtype=dtypes, m=rows, d=st.integers(1, 40), residual=st.booleans())
def test_rms_norm(seed, data, dtype, m, d, residual):
    torch.manual_seed(seed)
    tensors = {"x": _randn(m, d, dtype=dtype), "weight": _randn(d, dtype=dtype)}
    if residual:
        tensors["residual"] = _randn(m, d, dtype=dtype)
    args = _case(data.draw, tensors, ("x", "residual") if residual else ("x",))
    if residual:
        _check(
            lambda a: pk.rms_norm_residual(a["x"], a["residual"], a["weight"], 1e-6),
            lambda a: reference.rms_norm_residual(a["x"], a["residual"], a["weight"], 1e-6),
            args,
            args.culprit,
            dtype,
            args.layout,
        )
    else:
        _check(
            lambda a: pk.rms_norm(a["x"], a["weight"], 1e-6),
            lambda a: reference.rms_norm(a["x"], a["weight"], 1e-6),
            args,
            args.culprit,
            dtype,
            args.layout,
        )


@given(
    seed=seeds,
    data=st.data(),
    dtype=dtypes,
    m=rows,
    k=st.integers(1, 40),
    n=st.integers(1, 24),
    bias=st.booleans(),
    gelu=st.booleans(),
    residual=st.booleans(),
)
def test_linear(seed, data, dtype, m, k, n, bias, gelu, residual):
    torch.manual_seed(seed)
    tensors = {"x": _randn(m, k, dtype=dtype), "weight": _randn(n, k, dtype=dtype, scale=k**-0.5)}
    if bias:
        tensors["bias"] = _randn(n, dtype=dtype)
    if residual:
        tensors["residual"] = _randn(m, n, dtype=dtype)
    args = _case(data.draw, tensors, ("x",))

    def ref(a: dict) -> torch.Tensor:
        y = reference.linear(a["x"].float(), a["weight"].float(), a["bias"].float() if bias else None)
        y = torch.nn.functional.gelu(y) if gelu else y
        return y + a["residual"].float() if residual else y

    _check(
        lambda a: pk.linear(a["x"], a["weight"], a.get("bias"), gelu=gelu, residual=a.get("residual")),
        ref,
        args,
        args.culprit,
        dtype,
        args.layout,
    )


@given(
    seed=seeds, data=st.data(), dtype=dtypes, m=rows, k=st.integers(1, 40), i=st.integers(1, 24), residual=st.booleans()
)
def test_swiglu_mlp(seed, data, dtype, m, k, i, residual):
    torch.manual_seed(seed)
    tensors = {
        "x": _randn(m, k, dtype=dtype),
        "w_gate_up": _randn(2 * i, k, dtype=dtype, scale=k**-0.5),
        "w_down": _randn(k, i, dtype=dtype, scale=i**-0.5),
    }
    if residual:
        tensors["residual"] = _randn(m, k, dtype=dtype)
    args = _case(data.draw, tensors, ("x",))

    def ref(a: dict) -> torch.Tensor:
        f = {name: t.float() for name, t in a.items()}
        return reference.swiglu_mlp(f["x"], f["w_gate_up"], f["w_down"], f.get("residual"))

    _check(
        lambda a: pk.swiglu_mlp(a["x"], a["w_gate_up"], a["w_down"], a.get("residual")),
        ref,
        args,
        args.culprit,
        dtype,
        args.layout,
    )


@given(seed=seeds, data=st.data(), dtype=dtypes, m=rows, d=st.integers(1, 32), h=st.integers(1, 24))
def test_projector_mlp(seed, data, dtype, m, d, h):
    torch.manual_seed(seed)
    tensors = {
        "x": _randn(m, d, dtype=dtype),
        "w1": _randn(h, d, dtype=dtype, scale=d**-0.5),
        "b1": _randn(h, dtype=dtype),
        "w2": _randn(h, h, dtype=dtype, scale=h**-0.5),
        "b2": _randn(h, dtype=dtype),
    }
    args = _case(data.draw, tensors, ("x",))
    names = ("x", "w1", "b1", "w2", "b2")
    _check(
        lambda a: pk.projector_mlp(*(a[n] for n in names)),
        lambda a: reference.projector_mlp(*(a[n].float() for n in names)),
        args,
        args.culprit,
        dtype,
        args.layout,
    )


segment_lengths = st.lists(st.integers(0, 9), min_size=1, max_size=5)


@given(
    seed=seeds,
    data=st.data(),
    dtype=dtypes,
    lengths=segment_lengths,
    kv=st.sampled_from([1, 2]),
    group=st.integers(1, 2),
)
def test_varlen_attention(seed, data, dtype, lengths, kv, group):
    torch.manual_seed(seed)
    n, h, hd = sum(lengths), kv * group, 64
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device())
    tensors = {name: _randn(n, heads, hd, dtype=dtype) for name, heads in (("q", h), ("k", kv), ("v", kv))}
    args = _case(data.draw, tensors, ())
    bad_cu = data.draw(st.sampled_from([None, "int64", "not-from-0", "past-the-end", "decreasing"]))
    if bad_cu == "decreasing" and cu[-1] == 0:
        bad_cu = "not-from-0"  # all segments empty: reversed, the offsets are the same
    if bad_cu is not None:
        args = Case(tensors)
        args.culprit = "cu_seqlens"
        cu = {
            "int64": cu.long(),
            "not-from-0": cu + 1,
            "past-the-end": torch.cat([cu[:-1], cu[-1:] + 1]),
            "decreasing": cu.flip(0),
        }[bad_cu]
    _check(
        lambda a: pk.varlen_attention(a["q"], a["k"], a["v"], cu),
        lambda a: reference.varlen_attention(a["q"].float(), a["k"].float(), a["v"].float(), cu.to(torch.int32)),
        args,
        args.culprit,
        dtype,
        args.layout,
    )


grids = st.lists(
    st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 2])), min_size=1, max_size=3
)


@given(seed=seeds, data=st.data(), dtype=dtypes, items=grids, kv=st.sampled_from([1, 2]), hd=st.sampled_from([16, 32]))
def test_qk_norm_rope_2d(seed, data, dtype, items, kv, hd):
    torch.manual_seed(seed)
    grid = torch.tensor([[t, h * m, w * m] for t, h, w, m in items])
    merge = torch.tensor([m for *_, m in items])
    positions, _ = reference.rope_positions(grid, merge)
    n = positions.shape[0]
    tensors = {
        "q": _randn(n, 2 * kv, hd, dtype=dtype),
        "k": _randn(n, kv, hd, dtype=dtype),
        "q_norm_weight": _randn(hd, dtype=dtype),
        "k_norm_weight": _randn(hd, dtype=dtype),
        "positions": positions.to(device()),
    }
    args = _case(data.draw, tensors, ())
    names = ("q", "k", "q_norm_weight", "k_norm_weight", "positions")

    def ref(a: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.qk_norm_rope_2d(*(a[n].cpu() for n in names), theta=1e4, eps=1e-6)

    _check(
        lambda a: pk.qk_norm_rope_2d(*(a[n] for n in names), theta=1e4, eps=1e-6),
        ref,
        args,
        args.culprit,
        dtype,
        args.layout,
    )


@given(
    items=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 7), st.integers(0, 7), st.integers(-1, 3)), max_size=4),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.float32]),
)
def test_rope_positions(items, dtype):
    """Any grid and merge sizes: the reference's positions, or an error naming grid_sizes or merge_sizes."""
    grid = torch.tensor([i[:3] for i in items], dtype=dtype).view(-1, 3)
    merge = torch.tensor([i[3] for i in items], dtype=dtype)
    valid = dtype != torch.float32 and all(min(t, h, w, m) >= 1 and h % m == w % m == 0 for t, h, w, m in items)
    try:
        positions, cu = pk.rope_positions(grid.to(device()), merge.to(device()))
    except DOCUMENTED as e:
        assert not valid, f"valid grid refused: {e}"
        assert re.search(r"\b(grid_sizes|merge_sizes)\b", str(e)), str(e)
        return
    assert valid, f"bad grid {items} accepted"
    expected, expected_cu = reference.rope_positions(grid, merge)
    assert torch.equal(positions.cpu(), expected) and torch.equal(cu.cpu(), expected_cu)
