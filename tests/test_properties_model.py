"""Properties of :class:`PenguinEncoder` over random packed batches: grids, merge sizes (the interpolating
3 included), clips and images mixed, both backends. A valid batch gives contiguous features, equal to one
item at a time and, through the Triton kernels, to the torch path; a bad one raises a documented error
naming the argument (or the item) at fault before any kernel is launched."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from penguin_vl import PenguinEncoder, PenguinEncoderConfig
from tests.test_properties_kernels import DOCUMENTED, _counting_launches
from tests.utils import assert_rel_close, device

# a one-layer encoder small enough for the interpreter, with the kernels' smallest attention head dim
CONFIG = PenguinEncoderConfig(
    hidden_size=64, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, patch_size=2, rope_theta=1e4,
)  # fmt: skip
# float32 both ways: the kernels and the torch path differ in summation order (~1e-6 measured); packed
# against one item at a time is the same math in other matmul shapes
TOL = 1e-5


@pytest.fixture(scope="module")
def models() -> dict[str, PenguinEncoder]:
    torch_model = PenguinEncoder.from_config(CONFIG, backend="torch", seed=1)
    triton_model = PenguinEncoder.from_config(CONFIG, backend="torch", seed=1).to(device()).set_backend("triton")
    return {"torch": torch_model, "triton": triton_model}


items = st.lists(
    st.tuples(
        st.integers(1, 2),  # t: frames
        st.integers(1, 2),  # h / m
        st.integers(1, 3),  # w / m
        st.sampled_from([1, 2, 3]),  # m
    ),
    min_size=1,
    max_size=3,
)


def _batch(specs: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grid = torch.tensor([[t, h * m, w * m] for t, h, w, m in specs])
    merge = torch.tensor([m for *_, m in specs])
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    return torch.randn(n, CONFIG.patch_dim), grid, merge


@given(specs=items, backend=st.sampled_from(["torch", "triton"]))
@example(specs=[(1, 2, 3, 3)], backend="torch")  # one interpolated item: its rows were a strided view
def test_valid_batches(models, specs, backend):
    torch.manual_seed(len(specs))
    pixels, grid, merge = _batch(specs)
    with torch.inference_mode():
        _check_valid(models, backend, specs, pixels, grid, merge)


def _check_valid(models, backend, specs, pixels, grid, merge) -> None:
    out = models[backend](pixels.to(device()), grid, merge)
    expected_rows = sum(t * h * w for t, h, w, _ in specs)
    assert out.shape == (expected_rows, CONFIG.hidden_size) and out.is_contiguous()
    assert_rel_close(out.cpu(), models["torch"](pixels, grid, merge), TOL, "triton vs torch")
    start, parts = 0, []
    for i, (t, h, w, m) in enumerate(specs):
        n = t * h * w * m * m
        parts.append(models["torch"](pixels[start : start + n], grid[i : i + 1], merge[i : i + 1]))
        start += n
    assert_rel_close(out.cpu(), torch.cat(parts), TOL, "packed vs one item at a time")


def _spoil(draw, pixels, grid, merge):
    """One argument made bad; returns the arguments and what the error must name."""
    kind = draw(
        st.sampled_from(
            [
                "rows", "patch-dim", "pixel-dtype", "grid-float", "grid-shape", "merge-shape",
                "zero", "negative", "not-divisible", "pixels-1d",
            ]
        )
    )  # fmt: skip
    i = draw(st.integers(0, grid.shape[0] - 1))
    item = rf"(item {i}|grid_sizes|merge_sizes)"
    if kind == "rows":
        return (pixels[:-1], grid, merge), "pixel_values"
    if kind == "patch-dim":
        return (pixels[:, :-1], grid, merge), "pixel_values"
    if kind == "pixel-dtype":
        return (pixels.to(torch.int32), grid, merge), "pixel_values"
    if kind == "pixels-1d":
        return (pixels.flatten(), grid, merge), "pixel_values"
    if kind == "grid-float":
        return (pixels, grid.float(), merge), "grid_sizes"
    if kind == "grid-shape":
        return (pixels, grid[:, :2], merge), "grid_sizes"
    if kind == "merge-shape":
        return (pixels, grid, torch.cat([merge, merge])), "merge_sizes"
    bad_grid, bad_merge = grid.clone(), merge.clone()
    if kind == "zero":
        bad_grid[i, 0] = 0
    elif kind == "negative":
        bad_merge[i] = -bad_merge[i]
    else:
        bad_grid[i, 1] += 1
        bad_merge[i] = max(int(bad_merge[i]), 2)
    return (pixels, bad_grid, bad_merge), item


@given(data=st.data(), specs=items, backend=st.sampled_from(["torch", "triton"]))
def test_bad_batches_are_refused_before_any_launch(models, data, specs, backend):
    pixels, grid, merge = _batch(specs)
    args, culprit = _spoil(data.draw, pixels.to(device()), grid, merge)
    with torch.inference_mode(), _counting_launches() as launches, pytest.raises(DOCUMENTED) as error:
        models[backend](*args)
    assert re.search(culprit, str(error.value)), f"the error does not name {culprit}: {error.value}"
    assert launches.count == 0
