"""The device description the launchers read, and ``config=`` passed to every public op."""

from __future__ import annotations

import pytest
import torch

import penguin_kernels as pk
from penguin_kernels import reference
from penguin_kernels.attention import AttentionConfig
from penguin_kernels.device import INTERPRETER, Device, describe_arch, device_info, dtype_name
from penguin_kernels.gemm import Tile, select_tile
from tests.utils import HAS_CUDA, assert_rel_close, device
from tests.utils import INTERPRETER as INTERPRETING

# float32 runs IEEE products: only the summation order differs from the reference.
TOL = 1e-5

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETING), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)


@pytest.mark.parametrize(
    "arch, family, tile_arch",
    [
        (80, "ampere", 80),
        (86, "ampere", 80),
        (89, "ada", 80),
        (90, "hopper", 90),
        (100, "blackwell", 90),
        (120, "blackwell", 80),
    ],
    ids=lambda v: str(v),
)
def test_families_and_tile_sets(arch, family, tile_arch):
    d = describe_arch(arch)
    assert (d.family, d.arch, d.tile_arch) == (family, arch, tile_arch)
    assert d.shared_memory_per_block > 0 and d.sm_count == 0


def test_interpreter_and_cpu_description():
    assert device_info(torch.device("cpu")) is INTERPRETER
    assert INTERPRETER.arch is None and INTERPRETER.tile_arch is None and INTERPRETER.sm_count == 1
    assert [dtype_name(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == ["bf16", "fp16", "fp32"]


def test_tile_choice_follows_the_sm_count():
    """Few tokens on many SMs step down to smaller tiles; many tokens keep the largest."""
    big = Device(family="hopper", capability=(9, 0), sm_count=132, shared_memory_per_block=232448)
    assert select_tile(big, torch.bfloat16, 65536, 1024, 1024, False) == Tile(128, 256, 64, 8, 3, split_epilogue=True)
    assert select_tile(big, torch.bfloat16, 1024, 1024, 1024, False).bm == 64
    assert select_tile(big, torch.bfloat16, 65536, 1024, 588, False).bn == 128  # K % 16 != 0: no 256-wide tile


@requires_kernels
def test_other_configs_give_the_reference_answer():
    """A non-shipped config per op: the result matches the reference as the shipped one does."""
    dev, dt = device(), torch.float32
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 48, generator=gen).to(dev, dt)
    w = (torch.randn(40, 48, generator=gen) * 48**-0.5).to(dev, dt)
    tile = Tile(16, 32, 16, 4, 1, group_m=2)
    assert_rel_close(pk.linear(x, w, config=tile), reference.linear(x, w), TOL)
    assert_rel_close(pk.gate_up_swiglu(x, w, config=tile), reference.swiglu(reference.linear(x, w)), TOL)
    wd = (torch.randn(48, 20, generator=gen) * 20**-0.5).to(dev, dt)
    assert_rel_close(pk.swiglu_mlp(x, w, wd, config=(tile, tile)), reference.swiglu_mlp(x, w, wd), TOL)

    norm_w = torch.randn(48, generator=gen).to(dev, dt)
    assert_rel_close(
        pk.rms_norm(x, norm_w, 1e-6, config=pk.NormConfig(block_m=2, num_warps=4)),
        reference.rms_norm(x, norm_w, 1e-6),
        TOL,
    )

    q = torch.randn(37, 4, 64, generator=gen).to(dev, dt)
    k = torch.randn(37, 2, 64, generator=gen).to(dev, dt)
    v = torch.randn(37, 2, 64, generator=gen).to(dev, dt)
    cu = torch.tensor([0, 20, 37], dtype=torch.int32, device=dev)
    cfg = AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, max_pack=2, head_chunk=32)
    assert_rel_close(pk.varlen_attention(q, k, v, cu, config=cfg), reference.varlen_attention(q, k, v, cu), TOL)

    pos = torch.randint(0, 50, (37, 2), generator=gen, dtype=torch.int32).to(dev)
    qw, kw = torch.ones(64, device=dev, dtype=dt), torch.ones(64, device=dev, dtype=dt)
    got = pk.qk_norm_rope_2d(q, k, qw, kw, pos, theta=1e4, eps=1e-6, config=pk.RopeConfig(block_n=8))
    want = reference.qk_norm_rope_2d(q, k, qw, kw, pos, theta=1e4, eps=1e-6)
    for g, e in zip(got, want, strict=True):
        assert_rel_close(g, e, TOL)


def _ints(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.int64)


@pytest.mark.parametrize(
    "grid, merge, exc, match",
    [
        (_ints(2, 2), _ints(2), ValueError, r"grid_sizes must be \[B, 3\]"),
        (torch.ones(2, 3), _ints(2), TypeError, "grid_sizes must have an integer dtype"),
        (_ints(2, 3), _ints(3), ValueError, r"merge_sizes must be \[B\]"),
    ],
    ids=["shape", "dtype", "merge-count"],
)
def test_check_grid_sizes(grid, merge, exc, match):
    with pytest.raises(exc, match=match):
        pk.check_grid_sizes(grid, merge)


@requires_kernels
def test_config_reaches_the_launch():
    """A tile no kernel can take (a block that is not a power of two) fails in the launch, so it was used."""
    x = torch.randn(5, 16, device=device())
    w = torch.randn(8, 16, device=device())
    with pytest.raises(Exception, match="power of 2"):
        pk.linear(x, w, config=Tile(16, 24, 16, 4, 1))
    with pytest.raises(Exception, match="power of 2"):
        pk.rms_norm(x, torch.ones(16, device=device()), 1e-6, config=pk.NormConfig(block_m=3, num_warps=4))
