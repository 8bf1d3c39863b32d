"""Triton kernels for the Penguin-VL vision encoder.

Every public function validates its inputs before launching and has a plain-PyTorch twin in
:mod:`penguin_kernels.reference`. Every op is differentiable: the ``*_backward`` modules, imported
here, register each op's backward with autograd.
"""

# The *_backward modules are imported for their side effect: each registers its ops' backward.
from penguin_kernels import attention_backward, gemm_backward, norm_backward, reference, rope_backward  # noqa: F401
from penguin_kernels.attention import varlen_attention, varlen_attention_op
from penguin_kernels.gemm import gate_up_swiglu, linear
from penguin_kernels.mlp import projector_mlp, swiglu_mlp
from penguin_kernels.norm import rms_norm, rms_norm_residual
from penguin_kernels.rope import qk_norm_rope_2d, rope_positions

__all__ = [
    "reference",
    "varlen_attention",
    "varlen_attention_op",
    "linear",
    "gate_up_swiglu",
    "swiglu_mlp",
    "projector_mlp",
    "rms_norm",
    "rms_norm_residual",
    "qk_norm_rope_2d",
    "rope_positions",
]
