"""Launch configurations of the attention kernels, forward and backward: the tile tables per
architecture, with the register and shared-memory cost that chose each (checked by the kernels'
``compile_cases`` on sm_90 and sm_80), and the selectors the launchers call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from penguin_kernels.device import Device

__all__ = ["AttentionConfig", "BackwardConfig", "heads_per_tile", "select_config", "select_backward_configs"]


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch parameters of one shipped configuration.

    ``max_pack`` caps the query heads packed into one tile (at least 16 tokens per tile on the GPU);
    ``head_chunk`` splits ``q k^T`` into dots over that many columns (0: one dot over head_dim).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_pack: int
    head_chunk: int = 0


_C = AttentionConfig
# (tile set, head_dim, short) -> config. Tile set 90 (``Device.tile_arch``): sm_90 and sm_100, 227 KB
# of shared memory per block, wgmma on sm_90; 80: every other CUDA device (99 KB on sm_86/89/120 is
# enough for these). "short": every segment is one 64-key block at most, where 128 x 128 tiles would
# compute half-empty blocks.
# All of them compile to 0 bytes of spill on sm_90 and sm_80 (see compile_cases).
_CONFIGS = {
    (90, 128, False): _C(block_m=128, block_n=128, num_warps=8, num_stages=2, max_pack=8),
    (90, 64, False): _C(block_m=128, block_n=128, num_warps=8, num_stages=3, max_pack=8),
    (90, 128, True): _C(block_m=64, block_n=64, num_warps=4, num_stages=2, max_pack=4),
    (90, 64, True): _C(block_m=64, block_n=64, num_warps=4, num_stages=2, max_pack=4),
    (80, 128, False): _C(block_m=128, block_n=64, num_warps=8, num_stages=2, max_pack=8),
    (80, 64, False): _C(block_m=128, block_n=64, num_warps=8, num_stages=3, max_pack=8),
    (80, 128, True): _C(block_m=64, block_n=64, num_warps=8, num_stages=2, max_pack=4),
    (80, 64, True): _C(block_m=64, block_n=64, num_warps=4, num_stages=2, max_pack=4),
}
# float32 runs IEEE dots on CUDA cores, for parity runs rather than speed. Triton's FMA dot keeps
# whole rows of its operands in each thread: one dot over head_dim 128 spills at any tile size, so
# q k^T is split into head_chunk-column dots. 16 is triton 3.6's smallest dot K; at 16, hd 64 spills
# on sm_80 (triton 3.9), and at 32 hd 128 does: hence a chunk per head dim.
_FP32_CONFIGS = {
    64: _C(block_m=64, block_n=16, num_warps=8, num_stages=1, max_pack=4, head_chunk=32),
    128: _C(block_m=64, block_n=16, num_warps=8, num_stages=1, max_pack=4, head_chunk=16),
}
# Interpreter: small tiles keep the CPU tests fast yet cover several key blocks, a tail and packing;
# float32 there runs the chunked path that float32 takes on a GPU.
_INTERPRETER_CONFIG = _C(block_m=32, block_n=16, num_warps=4, num_stages=1, max_pack=8)
_INTERPRETER_FP32_CONFIG = _C(block_m=32, block_n=16, num_warps=4, num_stages=1, max_pack=8, head_chunk=32)
_SHORT_SEQLEN = 64


def heads_per_tile(group: int, cfg: AttentionConfig | BackwardConfig) -> int:
    """Query heads per tile: the largest power of two dividing ``group``, at most ``cfg.max_pack``."""
    return min(group & -group, cfg.max_pack)


def select_config(device: Device, dtype: torch.dtype, head_dim: int, max_seqlen: int) -> AttentionConfig:
    """The shipped configuration for ``device`` (see :func:`penguin_kernels.device.device_info`)."""
    if device.tile_arch is None:
        return _INTERPRETER_FP32_CONFIG if dtype == torch.float32 else _INTERPRETER_CONFIG
    if dtype == torch.float32:
        return _FP32_CONFIGS[head_dim]
    return _CONFIGS[device.tile_arch, head_dim, max_seqlen <= _SHORT_SEQLEN]


@dataclass(frozen=True)
class BackwardConfig:
    """One kernel's tiles: ``block_m`` query rows (token, head) pairs, ``block_n`` keys.

    ``head_chunk`` (dq kernel only) splits ``q k^T`` and ``dO v^T`` into dots over that many
    columns (0: one dot over head_dim).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_pack: int
    head_chunk: int = 0


_B = BackwardConfig
# (tile_arch, head_dim) -> (dk/dv config, dq config), 16-bit inputs. Register and shared-memory
# figures from compile_cases on sm_90 / sm_80 (triton 3.9); none of the 16-bit configs spills. The
# dk/dv kernel keeps two float32 [BLOCK_N, hd] accumulators and its K and V tiles resident, so at
# head_dim 128 on sm_90 it takes 32-row query tiles under 128 keys (245 registers, 114 KB with 3
# stages); 64-row query tiles spilled (255 registers, ~15 spilled words). The dq kernel holds one
# accumulator and its q and dO tiles: 128 x 64, 8 warps (203 registers at head_dim 128). On sm_80
# (mma.sync, at most 99 KB of shared memory on sm_86/89) 64-key dq tiles spilled at head_dim 128
# (~140 words at 4 or 8 warps); 128 x 32 does not (255 registers, 80 KB).
_BACKWARD_CONFIGS = {
    (90, 128): (_B(32, 128, 8, 3, 8), _B(128, 64, 8, 2, 8)),
    (90, 64): (_B(64, 128, 8, 3, 8), _B(128, 64, 8, 3, 8)),
    (80, 128): (_B(64, 64, 8, 2, 8), _B(128, 32, 8, 2, 8)),
    (80, 64): (_B(64, 64, 8, 3, 8), _B(64, 64, 4, 3, 4)),
}
# float32 (parity runs) takes IEEE dots on CUDA cores, whose dots hold whole operand rows per thread:
# the dq kernel's q k^T and dO v^T over head_dim spilled (~3 KB of local traffic per key block at
# 16 x 16) until split into 16-column chunks, as in the forward (32-wide chunks still spilled at 64).
_BACKWARD_FP32_CONFIGS = {
    64: (_B(16, 16, 4, 1, 8), _B(16, 16, 4, 1, 8, head_chunk=16)),
    128: (_B(16, 16, 4, 1, 8), _B(16, 16, 4, 1, 8, head_chunk=16)),
}
# Interpreter: small tiles cover several query and key blocks, tails and head packing in CPU tests.
_BACKWARD_INTERPRETER_CONFIG = (_B(32, 16, 4, 1, 8), _B(32, 16, 4, 1, 8))
# float32 there runs the chunked dq path that float32 takes on a GPU.
_BACKWARD_INTERPRETER_FP32_CONFIG = (_B(32, 16, 4, 1, 8), _B(32, 16, 4, 1, 8, head_chunk=32))


def select_backward_configs(device: Device, dtype: torch.dtype, head_dim: int) -> tuple[BackwardConfig, BackwardConfig]:
    """``(dk/dv config, dq config)`` for ``device`` (the tile set of its architecture, or the interpreter's)."""
    if device.tile_arch is None:
        return _BACKWARD_INTERPRETER_FP32_CONFIG if dtype == torch.float32 else _BACKWARD_INTERPRETER_CONFIG
    if dtype == torch.float32:
        return _BACKWARD_FP32_CONFIGS[head_dim]
    return _BACKWARD_CONFIGS[device.tile_arch, head_dim]
