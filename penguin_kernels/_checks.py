"""Input validation shared by the public kernel wrappers: clear errors raised before any launch."""

from __future__ import annotations

import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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
