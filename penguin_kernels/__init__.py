"""Triton kernels for the Penguin-VL vision encoder.

Every public function validates its inputs before launching and has a plain-PyTorch twin in
:mod:`penguin_kernels.reference`; each takes an optional ``config=`` that replaces its shipped launch
configuration (for tuning). :mod:`penguin_kernels.device` describes the device the launchers pick
their configurations for. The package imports nothing from the model or from the tooling. Every
op is differentiable: the ``*_backward`` modules, imported here, register each op's backward with
autograd.
"""

# The *_backward modules are imported for their side effect: each registers its ops' backward.
from penguin_kernels import attention_backward, gemm_backward, norm_backward, reference, rope_backward  # noqa: F401
from penguin_kernels.attention import AttentionConfig, varlen_attention, varlen_attention_op
from penguin_kernels.gemm import Tile, gate_up_swiglu, linear
from penguin_kernels.mlp import projector_mlp, swiglu_mlp
from penguin_kernels.norm import NormConfig, rms_norm, rms_norm_residual
from penguin_kernels.positions import check_grid_sizes, rope_positions
from penguin_kernels.rope import RopeConfig, qk_norm_rope_2d

__all__ = [
    "reference",
    "AttentionConfig",
    "NormConfig",
    "RopeConfig",
    "Tile",
    "check_grid_sizes",
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
