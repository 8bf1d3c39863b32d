"""What the kernels run on: one description of the device every launcher reads, and the dtypes they take.

A launcher picks its tiles from a :class:`Device`: the architecture family, the SM count (to size
grids) and the shared memory a block may use. Tiles come in two sets, tuned and statically inspected
on sm_90 and sm_80; :attr:`Device.tile_arch` says which set a device takes. The sm_90 set needs
~160 KiB of shared memory per block and 8-warp MMAs, so it goes to sm_90 and to datacenter
Blackwell (sm_100, also 227 KiB); Ampere, Ada and consumer Blackwell (sm_120, ~99 KiB) take the
sm_80 set, whose rings stay under 64 KiB. Descriptions are cached per device index: a launch costs a
dictionary lookup, not a driver query.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before triton is imported) is described as a
device too, :data:`INTERPRETER`, so that the launchers need no second code path to ask about it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = [
    "DTYPES",
    "INTERPRETER",
    "INTERPRETING",
    "SHARED_MEMORY_PER_BLOCK",
    "Device",
    "describe_arch",
    "device_info",
    "dtype_name",
    "interpreter_active",
]

# The element types every kernel accepts, by the short names Triton signatures and the tools use.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Largest dynamic shared memory one block may opt into, in bytes, per compute capability (CUDA
# programming guide, "Technical Specifications per Compute Capability").
SHARED_MEMORY_PER_BLOCK = {
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    103: 232448,
    120: 101376,
    121: 101376,
}
_FAMILIES = {8: "ampere", 9: "hopper", 10: "blackwell", 12: "blackwell"}
# The sm_90 tiles take up to ~160 KiB per block; 200 KiB leaves room and excludes sm_80's 163 KiB.
_LARGE_TILE_SHARED = 200 * 1024


@dataclass(frozen=True)
class Device:
    """One GPU as the launchers see it, or Triton's CPU interpreter (``capability`` ``None``).

    ``sm_count`` is 0 for a description built from an architecture alone (:func:`describe_arch`).
    """

    family: str
    capability: tuple[int, int] | None
    sm_count: int
    shared_memory_per_block: int

    @property
    def arch(self) -> int | None:
        """``10 * major + minor`` (90 for sm_90), ``None`` for the interpreter."""
        return None if self.capability is None else 10 * self.capability[0] + self.capability[1]

    @property
    def tile_arch(self) -> int | None:
        """The architecture whose tile set this device takes: 90 or 80, ``None`` for the interpreter."""
        if self.capability is None:
            return None
        return 90 if self.capability >= (9, 0) and self.shared_memory_per_block >= _LARGE_TILE_SHARED else 80


INTERPRETER = Device(family="interpreter", capability=None, sm_count=1, shared_memory_per_block=0)
# Triton reads TRITON_INTERPRET when a kernel is decorated, so the value at import is the one that counts.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return INTERPRETING


def _family(major: int, minor: int) -> str:
    return "ada" if (major, minor) == (8, 9) else _FAMILIES.get(major, f"sm_{major}{minor}")


def describe_arch(arch: int) -> Device:
    """A device of architecture ``sm_<arch>`` (90, 80, 100, ...) without a GPU, for static inspection."""
    major, minor = divmod(arch, 10)
    shared = SHARED_MEMORY_PER_BLOCK.get(arch, 0)
    return Device(family=_family(major, minor), capability=(major, minor), sm_count=0, shared_memory_per_block=shared)


@functools.cache
def _cuda_device(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    arch = 10 * props.major + props.minor
    shared = getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY_PER_BLOCK.get(arch, 0)
    return Device(
        family=_family(props.major, props.minor),
        capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        shared_memory_per_block=shared,
    )


def device_info(device: torch.device) -> Device:
    """The description of ``device``: a CUDA device (cached per index), else :data:`INTERPRETER`."""
    if device.type != "cuda":
        return INTERPRETER
    index = device.index
    return _cuda_device(torch.cuda.current_device() if index is None else index)


def dtype_name(dtype: torch.dtype) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for a kernel dtype."""
    return _DTYPE_NAMES[dtype]
