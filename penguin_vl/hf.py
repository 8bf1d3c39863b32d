"""Drop-in acceleration of an already-loaded upstream (Hugging Face) Penguin-VL encoder.

``accelerate_encoder(module)`` takes the module a user gets from
``AutoModel.from_pretrained("tencent/Penguin-Encoder", trust_remote_code=True)`` and swaps its forward
for :class:`~penguin_vl.model.PenguinEncoder`'s, sharing the module's parameters (no copy; with the
Triton backend, q/k/v and gate/up weights are re-laid into one concatenated tensor each, and the
module's parameters become views of it). ``accelerate_penguin_vl(model)`` does the same for the vision
encoder (and projector) inside a loaded Penguin-VL model.

The patched forward keeps the original signature. It needs ``pixel_values``, ``grid_sizes`` and
``merge_sizes`` and returns the merged features tensor; a call that sets any other argument of the
original forward to a non-default value (for example asking for hidden states) goes to the original
forward unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from penguin_vl.config import PenguinEncoderConfig
from penguin_vl.model import PenguinEncoder

__all__ = ["accelerate_encoder", "accelerate_penguin_vl", "find_encoders"]

_ATTR = "_penguin_encoder"
_INPUTS = ("pixel_values", "grid_sizes", "merge_sizes")


def _config_dict(module: nn.Module) -> Mapping[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"{type(module).__name__} has no .config; pass config= explicitly")
    if isinstance(config, Mapping):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return vars(config)


def _is_encoder(module: nn.Module) -> bool:
    return (
        isinstance(getattr(getattr(module, "embeddings", None), "patch_embedding", None), nn.Conv2d)
        and isinstance(getattr(getattr(module, "encoder", None), "layers", None), nn.ModuleList)
        and hasattr(module.encoder, "norm")
    )


def find_encoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules of ``model`` laid out like the Penguin-VL vision encoder, outermost first."""
    return [(name, m) for name, m in model.named_modules() if _is_encoder(m)]


def _share_parameters(source: nn.Module, target: nn.Module) -> None:
    """Make every parameter of ``target`` the very same Parameter object found at that name in ``source``."""
    for name, _ in list(target.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        src_owner = source.get_submodule(owner_name)
        param = getattr(src_owner, attr, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"upstream module has no parameter {name!r}")
        setattr(target.get_submodule(owner_name), attr, param)


def accelerate_encoder(
    module: nn.Module,
    *,
    backend: str = "auto",
    config: PenguinEncoderConfig | Mapping[str, Any] | None = None,
) -> nn.Module:
    """Swap ``module.forward`` for the accelerated encoder, in place; returns ``module``.

    ``module`` must have the upstream attribute names (``embeddings.patch_embedding``,
    ``encoder.layers[i].self_attn.q_proj`` ...); its ``config`` is read unless ``config`` is given.
    Calling it again only changes the backend.
    """
    existing = module.__dict__.get(_ATTR)
    if existing is not None:
        existing.set_backend(backend)
        _share_parameters(existing, module)
        return module
    if not _is_encoder(module):
        raise ValueError(f"{type(module).__name__} is not laid out like the Penguin-VL vision encoder")
    if not isinstance(config, PenguinEncoderConfig):
        config = PenguinEncoderConfig.from_dict(config if config is not None else _config_dict(module))
    if len(module.encoder.layers) != config.num_hidden_layers:
        raise ValueError(
            f"module has {len(module.encoder.layers)} layers but its config says {config.num_hidden_layers}"
        )
    with torch.device("meta"):
        fast = PenguinEncoder(config)
    _share_parameters(module, fast)
    fast.eval().set_backend(backend)
    # The Triton backend may re-lay weights; the upstream module must see the same tensors.
    _share_parameters(fast, module)
    module.__dict__[_ATTR] = fast  # outside _modules: the parameters are already the module's own

    original = module.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        others = {k: v for k, v in bound.arguments.items() if k not in _INPUTS}
        if any(k not in bound.arguments for k in _INPUTS) or not all(
            _is_default(signature.parameters[k], v) for k, v in others.items()
        ):
            return original(*args, **kwargs)
        return module.__dict__[_ATTR](*(bound.arguments[k] for k in _INPUTS))

    module.forward = forward
    return module


def _is_default(param: inspect.Parameter, value: Any) -> bool:
    if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return not value
    if value is param.default:
        return True
    plain = (bool, int, float, str, type(None))
    return isinstance(value, plain) and isinstance(param.default, plain) and value == param.default


def accelerate_penguin_vl(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Accelerate the vision encoder(s) inside a loaded Penguin-VL model, in place; returns ``model``.

    The vision projector (``...vision_projector.readout``: Linear, GELU, Linear) runs through the fused
    projector MLP as well when the backend is Triton.
    """
    encoders = find_encoders(model)
    if not encoders:
        raise ValueError(f"no Penguin-VL vision encoder found inside {type(model).__name__}")
    for _, encoder in encoders:
        accelerate_encoder(encoder, backend=backend)
    for name, sub in model.named_modules():
        if name.endswith("vision_projector") and isinstance(getattr(sub, "readout", None), nn.Sequential):
            _accelerate_projector(sub, backend)
    return model


def _accelerate_projector(projector: nn.Module, backend: str) -> None:
    readout = projector.readout
    if len(readout) != 3 or not isinstance(readout[0], nn.Linear) or not isinstance(readout[2], nn.Linear):
        return
    use_triton = backend == "triton" or (backend == "auto" and readout[0].weight.is_cuda)
    if not use_triton:
        return
    import penguin_kernels as pk

    original = projector.forward
    l1, l2 = readout[0], readout[2]

    @functools.wraps(original)
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad or torch.is_grad_enabled() and l1.weight.requires_grad:
            return original(x)
        shape = x.shape
        y = pk.projector_mlp(x.reshape(-1, shape[-1]), l1.weight, l1.bias, l2.weight, l2.bias)
        return y.view(*shape[:-1], y.shape[-1])

    projector.forward = forward
