"""Triton kernels for the Penguin-VL vision encoder.

Every public function validates its inputs before launching and has a plain-PyTorch twin in
:mod:`penguin_kernels.reference`.
"""

from penguin_kernels import reference

__all__ = ["reference"]
