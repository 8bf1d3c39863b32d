"""One shipped launch configuration of a kernel, described for compiling it without a GPU.

Every kernel module lists its configurations with ``compile_cases(arch) -> list[CompileCase]``, beside
the tile tables they come from, so that a changed table and its inspection change in one place. The
record holds only data; compiling it and reading back the cubin is tooling (``python -m bench.inspect``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CompileCase"]


@dataclass(frozen=True)
class CompileCase:
    """One shipped launch config of a ``@triton.jit`` kernel.

    ``signature`` maps every runtime argument to its Triton type (``"*bf16"``, ``"*fp32"``,
    ``"i32"``, ``"i64"``, ``"fp32"``); ``constexprs`` maps each ``tl.constexpr`` parameter, and any
    runtime argument pinned to a constant at launch (a stride of 1), to its value. ``aligned`` names
    int arguments that are multiples of 16 at the shapes this config serves. ``tensor_cores`` says
    the kernel is meant to run its dots on tensor cores (wgmma on sm_90, mma on sm_80).
    """

    name: str
    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False
    aligned: tuple[str, ...] = ()
