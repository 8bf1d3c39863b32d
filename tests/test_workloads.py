"""The SPEC section 7 workload registry: token counts, segment lengths, FLOP formulas and inputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from penguin_kernels import reference
from penguin_vl.workloads import WORKLOADS, Workload, get, make_inputs, released_image_grid, uniform
from tests.test_model import GOLDEN

PROC_GOLDEN = GOLDEN / "proc_shared_golden.safetensors"


@pytest.mark.parametrize(
    "name, items, frames, tokens, out_tokens",
    [
        ("latency", 1, 1, 1024, 1024),
        ("batch64k", 64, 64, 65536, 65536),
        ("long", 1, 1, 16384, 16384),
        ("video", 180, 180, 69120, 17280),
    ],
    ids=lambda v: str(v),
)
def test_registry_matches_spec_table(name, items, frames, tokens, out_tokens):
    w = WORKLOADS[name]
    assert (w.items, w.frames, w.tokens, w.output_tokens) == (items, frames, tokens, out_tokens)
    assert len(w.seqlens) == frames and sum(w.seqlens) == tokens


def test_image_mix_is_released_sizing_of_each_picture():
    w = WORKLOADS["image_mix"]
    assert w.items == 8 and set(w.merge_sizes) == {1}
    assert w.grid_sizes[5] == (1, 32, 32)  # 448 x 448 pixels is exactly 32 x 32 patches
    _, h, wd = w.grid_sizes[2]
    assert w.grid_sizes[1] == (1, wd, h)  # 1024 x 768 and 768 x 1024 are transposes
    assert 51_000 <= w.tokens <= 53_000  # "~52,000" in the SPEC table
    # 1536 x 2048 is 3.1 MP, above max_pixels: scaled down to about 16384 * 0.95 tokens, same aspect.
    _, h, wd = w.grid_sizes[6]
    assert 15_000 < h * wd <= 16384 and abs(h / wd - 1536 / 2048) < 0.02


@pytest.mark.skipif(not PROC_GOLDEN.exists(), reason=f"processor goldens not found in {GOLDEN}")
@pytest.mark.parametrize(
    "case, height, width",
    [("gray_50x900", 900, 50), ("pal_320x240", 240, 320), ("rgba_333x217", 217, 333)],
    ids=lambda v: str(v),
)
def test_released_image_grid_matches_reference_processor(case, height, width):
    golden = load_file(PROC_GOLDEN)[f"{case}_m1.grid_sizes"]
    assert [list(released_image_grid(height, width))] == golden.tolist()


@pytest.mark.parametrize(
    "height, width, grid",
    [(10, 10, (1, 5, 5)), (448, 448, (1, 32, 32)), (14, 14, (1, 5, 5)), (100_000, 100_000, (1, 125, 125))],
    ids=["tiny-upscaled", "exact", "one-patch", "huge-capped"],
)
def test_released_image_grid_bounds(height, width, grid):
    assert released_image_grid(height, width) == grid
    _, h, w = grid
    # Rounding to whole patches may land slightly outside [min_pixels, max_pixels], not outside the token range.
    assert 16 <= h * w <= 16384


def test_attention_flops_match_per_segment_sum():
    w = Workload("mixed", ((1, 3, 5), (2, 4, 4), (1, 1, 1)), (1, 2, 1))
    assert w.seqlens == (15, 16, 16, 1)
    assert w.attention_flops(16, 128) == 4 * (15**2 + 16**2 + 16**2 + 1) * 16 * 128
    assert w.output_tokens == 15 + 2 * 4 + 1
    assert w.cu_seqlens().tolist() == [0, 15, 31, 47, 48]


def test_encoder_flops_per_token_matches_spec():
    w = WORKLOADS["latency"]
    per_token_layer = w.gemm_flops() / w.tokens
    assert 31.4e6 < per_token_layer < 31.6e6  # "~31.5 MFLOP at released dims"
    expected = 2 * 588 * 1024 * 1024 + 28 * (w.gemm_flops() + w.attention_flops(16, 128))
    assert w.encoder_flops() == expected


@pytest.mark.parametrize("seqlen, total, count", [(1024, 65536, 64), (1000, 4500, 4), (7, 3, 1)], ids=str)
def test_uniform(seqlen, total, count):
    w = uniform(seqlen, total)
    assert w.seqlens == (seqlen,) * count and w.merge_sizes == (1,) * count


def test_make_inputs_feed_the_reference_positions():
    w = Workload("small", ((1, 4, 6), (2, 2, 2)), (2, 1))
    x = make_inputs(w, dtype=torch.float16, seed=3)
    assert x.pixel_values.shape == (w.tokens, 588) and x.pixel_values.dtype == torch.float16
    assert x.pixel_values.abs().max() <= 1
    assert torch.equal(x.pixel_values, make_inputs(w, dtype=torch.float16, seed=3).pixel_values)
    positions, cu = reference.rope_positions(x.grid_sizes, x.merge_sizes)
    assert positions.shape == (w.tokens, 2)
    assert torch.equal(cu, w.cu_seqlens())


@pytest.mark.parametrize(
    "grids, merges, message",
    [
        ((), (), "empty"),
        (((1, 4, 4),), (1, 1), "merge_sizes"),
        (((1, 3, 4),), (2,), "not divisible"),
        (((0, 4, 4),), (1,), "bad grid"),
    ],
    ids=["empty", "count-mismatch", "indivisible", "zero-frames"],
)
def test_workload_validation(grids, merges, message):
    with pytest.raises(ValueError, match=message):
        Workload("bad", grids, merges)


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="image_mix"):
        get("nope")
