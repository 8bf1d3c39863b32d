"""Drop-in acceleration of an already-loaded upstream (Hugging Face) Penguin-VL encoder.

``accelerate_encoder(module)`` takes the module a user gets from
``AutoModel.from_pretrained("tencent/Penguin-Encoder", trust_remote_code=True)`` and routes its forward
through :class:`~penguin_vl.model.PenguinEncoder`'s. ``accelerate_penguin_vl(model)`` does the same for
the vision encoder (and projector) inside a loaded Penguin-VL model.

The user's module keeps every Parameter object it had: an optimizer built before or after sees the same
tensors, and ``state_dict``, ``save_pretrained``, ``to()`` and ``copy.deepcopy`` work as before (the
patched forward is a method bound to the module it is called on, so a deep copy runs its own weights).
Each call runs one :class:`PenguinEncoder` built on the meta device through
``torch.func.functional_call``, with the module's own parameters in its place. The fused q/k/v and
gate/up weights that layer reads are concatenations of the module's separate Parameters:

- when autograd records (grad enabled and a weight requires grad) they are concatenated on every call,
  so gradients flow back to the module's Parameters;
- otherwise they are concatenated once and cached, keyed on the sources' storage, version counter,
  dtype and device, so any change to the weights (optimizer step, ``load_state_dict``, ``to()``)
  rebuilds the cache at the next call. The cache is a second copy of the q/k/v and gate/up weights, about
  two thirds of the encoder's weights (~590 MB for the released encoder in bf16); it lives on the
  module (not in its state dict, not copied by ``deepcopy``) and is freed with it, or by calling
  ``accelerate_encoder`` again.

The patched forward keeps the original signature. It needs ``pixel_values``, ``grid_sizes`` and
``merge_sizes`` and returns the merged features tensor; a call the accelerated encoder cannot run goes
to the original forward unchanged: one that sets any other argument to a non-default value (for example
asking for hidden states), or, on the Triton backend, weights of mixed dtypes or devices.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

import penguin_kernels
from penguin_vl.config import PenguinEncoderConfig
from penguin_vl.loading import FUSED_LINEARS
from penguin_vl.model import PenguinEncoder, resolve_backend

__all__ = ["accelerate_encoder", "accelerate_penguin_vl", "find_encoders"]

_STATE = "_penguin_accelerated"
_INPUTS = ("pixel_values", "grid_sizes", "merge_sizes")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def _source_names(template: PenguinEncoder) -> dict[str, tuple[str, ...]]:
    """Each parameter of ``template`` -> the names of the upstream parameters it is made of."""
    fused = {}
    for i in range(len(template.encoder.layers)):
        prefix = f"encoder.layers.{i}."
        for name, parts in FUSED_LINEARS.items():
            for kind in ("weight", "bias"):
                fused[f"{prefix}{name}.{kind}"] = tuple(f"{prefix}{part}.{kind}" for part, _ in parts)
    return {name: fused.get(name, (name,)) for name, _ in template.named_parameters()}


class _Accelerated:
    """What the patched forward of one module needs: the meta template, the backend and the cache."""

    def __init__(self, config: PenguinEncoderConfig, backend: str) -> None:
        with torch.device("meta"):
            self.template = PenguinEncoder(config)
        self.template.eval()
        self.backend = backend
        self.sources = _source_names(self.template)
        self._cache_key: tuple | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> _Accelerated:
        # A copy gets its own (empty) cache: the cached tensors belong to the original's weights.
        return _Accelerated(self.template.config, self.backend)

    def weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The template's parameters, from ``module``'s: its own Parameters, and the fused concatenations."""
        params = dict(module.named_parameters())
        missing = sorted({s for names in self.sources.values() for s in names if s not in params})
        if missing:
            raise ValueError(f"{type(module).__name__} has no parameters {missing}")
        fused = {name: [params[s] for s in names] for name, names in self.sources.items() if len(names) > 1}
        sources = [t for parts in fused.values() for t in parts]
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            self._cache_key, self._cache = None, {}
            cats = {name: torch.cat(parts) for name, parts in fused.items()}
        else:
            key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
            if key != self._cache_key:
                self._cache = {}
                # plain tensors even when the first call runs under inference_mode
                with torch.no_grad(), torch.inference_mode(False):
                    self._cache = {name: torch.cat(parts) for name, parts in fused.items()}
                self._cache_key = key
            cats = self._cache
        return {name: cats[name] if name in cats else params[names[0]] for name, names in self.sources.items()}

    def can_run(self, module: nn.Module) -> bool:
        if self.backend == "torch":
            return True
        kinds = {(p.dtype, p.device) for p in module.parameters()}
        return len(kinds) == 1 and next(iter(kinds))[0] in _KERNEL_DTYPES


def _accelerated_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched ``forward``, bound to the module it serves."""
    state: _Accelerated = self.__dict__[_STATE]
    original = types.MethodType(type(self).forward, self)
    signature = inspect.signature(original)
    bound = signature.bind(*args, **kwargs)
    others = {k: v for k, v in bound.arguments.items() if k not in _INPUTS}
    if (
        any(k not in bound.arguments for k in _INPUTS)
        or not all(_is_default(signature.parameters[k], v) for k, v in others.items())
        or not state.can_run(self)
    ):
        return original(*args, **kwargs)
    template = state.template
    template.backend = resolve_backend(
        state.backend, self.embeddings.patch_embedding.weight.device, template.config.head_dim
    )
    template.gradient_checkpointing = bool(
        getattr(self, "gradient_checkpointing", False) or getattr(self.encoder, "gradient_checkpointing", False)
    )
    return functional_call(template, state.weights(self), tuple(bound.arguments[k] for k in _INPUTS))


def accelerate_encoder(
    module: nn.Module,
    *,
    backend: str = "auto",
    config: PenguinEncoderConfig | Mapping[str, Any] | None = None,
) -> nn.Module:
    """Route ``module``'s forward through the accelerated encoder, in place; returns ``module``.

    ``module`` must have the upstream attribute names (``embeddings.patch_embedding``,
    ``encoder.layers[i].self_attn.q_proj`` ...); its ``config`` is read unless ``config`` is given.
    ``backend`` is resolved at each call against the device of the module's weights (``"auto"``: Triton
    on CUDA). Calling it again changes the backend and frees the cache.
    """
    if not _is_encoder(module):
        raise ValueError(f"{type(module).__name__} is not laid out like the Penguin-VL vision encoder")
    resolve_backend(backend, module.embeddings.patch_embedding.weight.device)
    existing = module.__dict__.get(_STATE)
    if existing is not None:
        module.__dict__[_STATE] = _Accelerated(existing.template.config, backend)
        return module
    if not isinstance(config, PenguinEncoderConfig):
        config = PenguinEncoderConfig.from_dict(config if config is not None else _config_dict(module))
    if len(module.encoder.layers) != config.num_hidden_layers:
        raise ValueError(
            f"module has {len(module.encoder.layers)} layers but its config says {config.num_hidden_layers}"
        )
    state = _Accelerated(config, backend)
    params = dict(module.named_parameters())
    missing = sorted({s for names in state.sources.values() for s in names if s not in params})
    if missing:
        raise ValueError(f"{type(module).__name__} has no parameters {missing}")
    shapes = {name: t.shape for name, t in state.template.state_dict().items()}
    misshaped = [f"{n}: {list(params[n].shape)}, expected {list(s)}" for n, s in shapes.items() if params[n].shape != s]
    if misshaped:
        raise ValueError("parameters do not fit the config: " + "; ".join(misshaped))
    module.__dict__[_STATE] = state
    module.forward = types.MethodType(_accelerated_forward, module)
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
    projector MLP as well on the Triton backend, in training too (the op has a backward).
    """
    encoders = find_encoders(model)
    if not encoders:
        raise ValueError(f"no Penguin-VL vision encoder found inside {type(model).__name__}")
    for _, encoder in encoders:
        accelerate_encoder(encoder, backend=backend)
    for name, sub in model.named_modules():
        if name.endswith("vision_projector") and _is_projector(sub):
            sub.__dict__[_STATE] = backend
            sub.forward = types.MethodType(_projector_forward, sub)
    return model


def _is_projector(module: nn.Module) -> bool:
    readout = getattr(module, "readout", None)
    return (
        isinstance(readout, nn.Sequential)
        and len(readout) == 3
        and isinstance(readout[0], nn.Linear)
        and isinstance(readout[2], nn.Linear)
    )


def _projector_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patched projector ``forward``, bound to the projector it serves."""
    l1, l2 = self.readout[0], self.readout[2]
    weights = (l1.weight, l1.bias, l2.weight, l2.bias)
    kinds = {(t.dtype, t.device) for t in (x, *weights) if t is not None}
    if (
        len(kinds) != 1
        or x.dtype not in _KERNEL_DTYPES
        or any(w is None for w in weights)
        or resolve_backend(self.__dict__[_STATE], x.device) != "triton"
    ):
        return type(self).forward(self, x)
    shape = x.shape
    y = penguin_kernels.projector_mlp(x.reshape(-1, shape[-1]), *weights)
    return y.view(*shape[:-1], y.shape[-1])
