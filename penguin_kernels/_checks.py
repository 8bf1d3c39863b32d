"""Input validation shared by the public kernel wrappers (clear errors raised before any launch), and the
cache that runs it once per input signature."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

from penguin_kernels.device import DTYPES, interpreter_active

KERNEL_DTYPES = tuple(DTYPES.values())
# Distinct shapes remembered per op: a serving process sees a few image sizes; the bound only stops
# a stream of ever-new shapes from growing the cache without end.
_CACHE_SIZE = 512

T = TypeVar("T")


class ShapeCache(Generic[T]):
    """What an op works out from its inputs' metadata (checks passed, tiles, grid), once per signature.

    ``get(key, *args)`` returns ``build(*args)`` computed on the first call with ``key``; the builder
    raises on bad input, and an error is never cached. ``key`` must hold every piece of metadata the
    builder reads (shapes, strides, dtypes, devices, options). While ``torch.compile`` traces with
    symbolic shapes the key is unhashable and the builder simply runs.
    """

    def __init__(self, build: Callable[..., T]) -> None:
        self.build = build
        self._entries: dict[Hashable, T] = {}

    def get(self, key: Hashable, *args: object) -> T:
        try:
            return self._entries[key]
        except KeyError:
            pass
        except TypeError:
            return self.build(*args)
        value = self.build(*args)
        if len(self._entries) >= _CACHE_SIZE:
            self._entries.clear()
        self._entries[key] = value
        return value


def signature(t: torch.Tensor) -> tuple:
    """The metadata a check reads: shape, strides, dtype and device."""
    return t.shape, t.stride(), t.dtype, t.device


def runnable(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``'s device: a key part, so that tests may switch the interpreter."""
    return t.is_cuda or interpreter_active()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: float32 is the parity dtype, so IEEE products, not TF32's 10-bit mantissa."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_float(t: object, name: str, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> torch.Tensor:
    """``t`` is a tensor of one of ``dtypes`` on a device the kernels can run on."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).removeprefix('torch.')}")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreter_active()):
        raise ValueError(
            f"{name} is on {t.device}; the Triton kernels need a CUDA tensor "
            "(or a CPU tensor with TRITON_INTERPRET=1 set before triton is imported)"
        )
    return t


def check_like(t: object, name: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """``t`` is a tensor with the dtype and device of ``ref``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")
    return t


def as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` ``[..., D]`` as a 2-D ``[rows, D]`` view with a unit last stride and one row stride."""
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} and strides {t.stride()} cannot be addressed as rows with one "
            "stride; pass a contiguous tensor or a row slice of a 2-D one"
        ) from None
    return rows


def check_weight(weight: object, name: str, x: torch.Tensor, in_features: int, source: str = "x") -> torch.Tensor:
    """``weight`` is an ``nn.Linear`` weight ``[out, in_features]`` like ``x``, rows unit-strided."""
    check_like(weight, name, x, "x")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{name} has no output features (shape {tuple(weight.shape)})")
    if weight.shape[1] != in_features:
        raise ValueError(f"{name} has {weight.shape[1]} input features but {source} has {in_features}")
    if in_features > 1 and weight.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (strides {weight.stride()})")
    return weight


def check_bias(bias: object, name: str, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """``bias`` is ``[out_features]``, contiguous, like ``x``."""
    check_like(bias, name, x, "x")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name} has shape {tuple(bias.shape)}, expected ({out_features},)")
    if out_features > 1 and bias.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")
    return bias


def check_input(x: object, name: str = "x") -> torch.Tensor:
    """``x [..., K]`` with ``K >= 1`` whose rows are addressable with one stride; returns the ``[M, K]`` view."""
    check_float(x, name)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise NotImplementedError(
            f"{name} is bfloat16 on the CPU: Triton's interpreter computes bfloat16 tl.dot wrongly; "
            "use float16/float32 there, or a CUDA device"
        )
    return as_rows(x, name)


def check_residual(residual: object, x: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """``residual`` has the output's shape, the input's dtype and device; returns its ``[M, N]`` view."""
    check_like(residual, "residual", x, "x")
    if tuple(residual.shape) != out_shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the output shape {out_shape}")
    return as_rows(residual, "residual")
