"""Count the distinct Triton kernel specialisations a run launches: what a cold cache compiles.

Triton compiles one binary per kernel and *specialisation*: the constexpr values, each tensor's
dtype and whether its address is 16-byte aligned, each integer's width and whether it equals 1 or
is a multiple of 16, and the launch options (``num_warps``, ``num_stages``). :func:`install` wraps
the launch entry of ``@triton.jit`` kernels (compiled or interpreted) and records that key for every
launch, so a CPU run through the interpreter tells how many compilations the same code costs on a
GPU. :func:`summary` reduces the keys to counts per kernel.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["install", "keys", "summary", "write"]

_KEYS: set[tuple] = set()
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _int_key(value: int, specialise: bool) -> tuple:
    width = "i32" if -(2**31) <= value < 2**31 else "i64"
    if not specialise:
        return (width,)
    return (width, value == 1, value % 16 == 0)


def _arg_key(value: Any, specialise: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return (str(value.dtype).removeprefix("torch."), specialise and value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("i1",)
    if isinstance(value, int):
        return _int_key(value, specialise)
    if isinstance(value, float):
        return ("fp32",)
    if value is None:
        return None
    return (type(value).__name__,)


@functools.cache
def _params(fn: Any) -> tuple[tuple[str, bool, bool], ...]:
    """``(name, is_constexpr, specialised)`` per parameter of a ``@triton.jit`` function."""
    if hasattr(fn, "params"):  # JITFunction
        return tuple((p.name, bool(p.is_constexpr), not p.do_not_specialize) for p in fn.params)
    # The interpreter keeps ``@triton.jit``'s arguments; ``do_not_specialize`` holds names or indices.
    names = list(inspect.signature(fn.fn).parameters)
    unspecialised = {names[a] if isinstance(a, int) else a for a in fn.kwargs.get("do_not_specialize") or ()}
    out = []
    for name, p in inspect.signature(fn.fn).parameters.items():
        ann = p.annotation
        constexpr = "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", ""))
        out.append((name, constexpr, name not in unspecialised))
    return tuple(out)


def _key(fn: Any, args: tuple, kwargs: dict) -> tuple:
    params = _params(fn)
    bound = dict(zip((p[0] for p in params), args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    parts = []
    for name, constexpr, specialise in params:
        value = bound.get(name)
        parts.append((name, repr(value) if constexpr else _arg_key(value, specialise)))
    options = tuple((k, kwargs[k]) for k in _LAUNCH_OPTIONS if k in kwargs)
    return (_name(fn), tuple(parts), options)


def _name(fn: Any) -> str:
    inner = getattr(fn, "fn", fn)
    return f"{inner.__module__}.{inner.__name__}"


def _wrap(cls: type) -> None:
    if getattr(cls.run, "_counts_specialisations", False):
        return
    run = cls.run

    def counted(self, *args, grid, warmup, **kwargs):
        _KEYS.add(_key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    counted._counts_specialisations = True
    cls.run = counted


def install() -> None:
    """Record the specialisation key of every later ``kernel[grid](...)`` launch in this process."""
    from triton.runtime.jit import JITFunction

    _wrap(JITFunction)
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    _wrap(InterpretedFunction)


def keys() -> set[tuple]:
    return set(_KEYS)


def write(path: Path) -> None:
    """Append this process's keys, one JSON list per line (shards of one step share a file)."""
    with open(path, "a") as f:
        for key in sorted(_KEYS, key=repr):
            f.write(json.dumps(key) + "\n")


def summary(lines: Iterable[str]) -> dict[str, Any]:
    """``{"total": distinct keys, "per_kernel": {kernel: distinct keys}}`` from :func:`write`'s lines."""
    distinct = {line.strip() for line in lines if line.strip()}
    per_kernel = Counter(json.loads(line)[0] for line in distinct)
    return {"total": len(distinct), "per_kernel": dict(per_kernel.most_common())}
