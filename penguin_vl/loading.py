"""Checkpoint I/O: safetensors only (nothing is ever unpickled).

A checkpoint directory holds ``config.json`` and either one ``*.safetensors`` file or shards listed in
``model.safetensors.index.json``. The encoder's tensors may sit behind a prefix (a full Penguin-VL
checkpoint nests them, e.g. ``model.vision_encoder.``); the prefix is found from the tensor names, and
only the tensors the encoder (and projector) need are read.

Checkpoints keep the released tensor names; the model holds q/k/v and gate/up fused (one GEMM each).
:data:`FUSED_LINEARS` is the one map between the two: :func:`fuse_linears` concatenates on load and
:func:`split_linears` splits on save, both called from the model's state-dict hooks.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from penguin_vl.config import PenguinEncoderConfig, ProjectorConfig

# The encoder class is passed in (loading knows the model only by its constructor and state dict).
Model = TypeVar("Model", bound=torch.nn.Module)

__all__ = [
    "FUSED_LINEARS",
    "fuse_linears",
    "split_linears",
    "load_encoder",
    "save_encoder",
    "checkpoint_files",
    "CheckpointError",
]

# Fused linear of an encoder layer -> the released linears whose rows it stacks, in order, each with the
# config field giving its row count.
FUSED_LINEARS: dict[str, tuple[tuple[str, str], ...]] = {
    "self_attn.qkv_proj": (
        ("self_attn.q_proj", "q_dim"),
        ("self_attn.k_proj", "kv_dim"),
        ("self_attn.v_proj", "kv_dim"),
    ),
    "mlp.gate_up_proj": (("mlp.gate_proj", "intermediate_size"), ("mlp.up_proj", "intermediate_size")),
}
_LINEAR_TENSORS = ("weight", "bias")

_ANCHOR = "embeddings.patch_embedding.weight"
_PROJECTOR_ANCHOR = "vision_projector.readout.0.weight"
_PROJECTOR_NAMES = ("readout.0.weight", "readout.0.bias", "readout.2.weight", "readout.2.bias")
# Buffers some exporters write beside the weights; they carry nothing the encoder needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the encoder: missing, unexpected or mis-shaped tensors."""


# what safetensors stores weights as that the encoder can take
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@contextlib.contextmanager
def _open(file: Path, device: str = "cpu") -> Iterator:
    """``safe_open`` whose errors (a cut or damaged file) name the file."""
    try:
        with safe_open(file, framework="pt", device=device) as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _config(path: Path) -> PenguinEncoderConfig:
    """The encoder config in ``path``; an invalid one is named by its file."""
    file = path / "config.json"
    try:
        return PenguinEncoderConfig.from_pretrained(path)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(str(e) if str(file) in str(e) else f"{file}: {e}") from None


def _check_device(device: torch.device | str | None) -> None:
    """A device the tensors can be read to, said before any file is opened."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine; load with device='cpu'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint in ``path`` to the safetensors file holding it."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' in the index")
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {absent}")
        return files
    single = path / "model.safetensors"
    candidates = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not candidates:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {pickles}: pickle checkpoints are not loaded; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")
    if len(candidates) > 1:
        raise CheckpointError(f"several safetensors files and no index in {path}: {[c.name for c in candidates]}")
    with _open(candidates[0]) as f:
        return {name: candidates[0] for name in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)


def fuse_linears(state: MutableMapping[str, torch.Tensor], prefix: str) -> None:
    """In place: replace the released linears of the layer at ``prefix`` by their fused concatenation.

    A group with some parts absent is left as it is, so the load names what is missing.
    """
    for fused, parts in FUSED_LINEARS.items():
        for kind in _LINEAR_TENSORS:
            names = [f"{prefix}{part}.{kind}" for part, _ in parts]
            if all(name in state for name in names):
                state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(name) for name in names])


def split_linears(state: MutableMapping[str, torch.Tensor], prefix: str, config: PenguinEncoderConfig) -> None:
    """In place: replace the fused linears of the layer at ``prefix`` by views of their released parts."""
    for fused, parts in FUSED_LINEARS.items():
        for kind in _LINEAR_TENSORS:
            name = f"{prefix}{fused}.{kind}"
            if name in state:
                pieces = state.pop(name).split([getattr(config, field) for _, field in parts])
                state.update((f"{prefix}{part}.{kind}", t) for (part, _), t in zip(parts, pieces, strict=True))


def _find_prefix(names: list[str], anchor: str, what: str) -> str | None:
    prefixes = sorted({n[: -len(anchor)] for n in names if n == anchor or n.endswith("." + anchor)})
    if len(prefixes) > 1:
        raise CheckpointError(f"several {what}s in the checkpoint, under prefixes {prefixes}")
    return prefixes[0] if prefixes else None


def _expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_encoder(
    cls: type[Model],
    path: str | Path,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    load_projector: bool,
) -> Model:
    """Build ``cls`` on the meta device and assign the checkpoint's tensors (read once, at ``dtype``)."""
    path = Path(path)
    if dtype is not None and dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
    _check_device(device)
    config = _config(path)
    files = checkpoint_files(path)
    names = list(files)
    prefix = _find_prefix(names, _ANCHOR, "vision encoder")
    if prefix is None:
        raise CheckpointError(f"{path}: no '{_ANCHOR}' tensor; not a Penguin-VL encoder checkpoint")
    proj_prefix = _find_prefix(names, _PROJECTOR_ANCHOR, "projector") if load_projector else None
    if proj_prefix is not None:
        proj_prefix += "vision_projector."

    wanted: dict[str, str] = {}  # model name -> checkpoint name
    for name in names:
        if name.startswith(prefix) and not name.endswith(_IGNORED_SUFFIXES) and ".vision_projector." not in "." + name:
            wanted[name[len(prefix) :]] = name
    projector = None
    if proj_prefix is not None:
        for suffix in _PROJECTOR_NAMES:
            wanted["projector." + suffix] = proj_prefix + suffix
        missing_proj = [proj_prefix + s for s in _PROJECTOR_NAMES if proj_prefix + s not in files]
        if missing_proj:
            raise CheckpointError(f"{path}: projector tensors missing: {missing_proj}")
        out_dim, in_dim = _tensor_shape(files, proj_prefix + "readout.0.weight")
        projector = ProjectorConfig(in_dim=in_dim, out_dim=out_dim)

    with torch.device("meta"):
        model = cls(config, projector)
    expected = _expected_shapes(model)
    missing = sorted(set(expected) - set(wanted))
    unexpected = sorted(wanted[k] for k in set(wanted) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_listed([_ckpt_name(k, prefix, proj_prefix) for k in missing])}")
        if unexpected:
            parts.append(f"unexpected tensors {_listed(unexpected)}")
        raise CheckpointError(f"{path}: " + "; ".join(parts) + _FROM_CONFIG.format(path / "config.json"))

    state = _read_tensors(files, wanted, expected, device, path / "config.json")
    stored = {t.dtype for t in state.values()}
    target = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    if target not in _DTYPES:
        raise CheckpointError(f"{path}: tensors are stored as {target}; pass dtype= one of {_DTYPES}")
    state = {k: v.to(target) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model


# the config decides which tensors the encoder has and their shapes: a wrong value there shows as tensors that
# do not fit, so the message names both
_FROM_CONFIG = " (the names and shapes expected follow {})"


def _listed(items: list[str], most: int = 8) -> list[str]:
    """At most ``most`` items and a count of the rest: a config with a wrong layer count misses hundreds."""
    return items if len(items) <= most else [*items[:most], f"... {len(items) - most} more"]


def _ckpt_name(model_name: str, prefix: str, proj_prefix: str | None) -> str:
    if model_name.startswith("projector."):
        return (proj_prefix or "vision_projector.") + model_name[len("projector.") :]
    return prefix + model_name


def _tensor_shape(files: dict[str, Path], name: str) -> tuple[int, ...]:
    with _open(files[name]) as f:
        return tuple(f.get_slice(name).get_shape())


def _read_tensors(
    files: dict[str, Path],
    wanted: dict[str, str],
    expected: dict[str, tuple[int, ...]],
    device: torch.device | str | None,
    config: Path,
) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for model_name, ckpt_name in wanted.items():
        by_file.setdefault(files[ckpt_name], []).append(model_name)
    state: dict[str, torch.Tensor] = {}
    misfits = []
    target = str(torch.device(device)) if device is not None else "cpu"
    for file, model_names in by_file.items():
        with _open(file, target) as f:
            for model_name in model_names:
                ckpt_name = wanted[model_name]
                tensor = f.get_slice(ckpt_name)
                shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
                if shape != expected[model_name]:
                    misfits.append(f"{ckpt_name}: {list(shape)}, expected {list(expected[model_name])} (in {file})")
                elif dtype not in _FLOAT_DTYPES:
                    # an integer or boolean tensor cast to float would load as other weights, without a word
                    misfits.append(f"{ckpt_name}: stored as {dtype}, expected floating point (in {file})")
                else:
                    state[model_name] = f.get_tensor(ckpt_name)
    if misfits:
        raise CheckpointError(
            "tensors that do not fit the encoder: " + "; ".join(_listed(misfits)) + _FROM_CONFIG.format(config)
        )
    return state


def save_encoder(
    model: torch.nn.Module,
    path: str | Path,
    *,
    prefix: str = "",
    projector_prefix: str = "vision_projector.",
    max_shard_bytes: int | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write ``config.json`` and safetensors weights for ``model`` (a ``PenguinEncoder``) into directory ``path``.

    ``prefix`` puts the encoder's tensors behind a prefix as a full Penguin-VL checkpoint does (then the
    encoder config is nested under ``vision_encoder_config``, and the projector's tensors go under
    ``projector_prefix`` beside the outermost ``vision_encoder.`` of ``prefix``); ``max_shard_bytes``
    splits the weights into shards with a ``model.safetensors.index.json``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    encoder_cfg = model.config.to_dict()
    encoder_cfg.update(extra_config or {})
    encoder_cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    config = {"vision_encoder_config": encoder_cfg, "model_type": "penguinvl"} if prefix else encoder_cfg
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("projector."):
            base = prefix.split("vision_encoder.", 1)[0]
            tensors[base + projector_prefix + name[len("projector.") :]] = t.contiguous()
        else:
            tensors[prefix + name] = t.contiguous()
    if max_shard_bytes is None:
        save_file(tensors, path / "model.safetensors")
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file)
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": weight_map,
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
