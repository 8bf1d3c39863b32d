"""The models of a run: ``--model`` resolved and loaded (a checkpoint directory, a hub id in the local cache,
or random weights), the preprocessor that goes with a checkpoint, and random-weight checkpoints in the
released layout (``penguin-vl init-checkpoint``) for tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from penguin_vl.config import PenguinEncoderConfig, ProjectorConfig
from penguin_vl.encode.files import file_mode
from penguin_vl.hub import resolve
from penguin_vl.loading import CheckpointError, save_encoder
from penguin_vl.model import PenguinEncoder
from penguin_vl.processor import CONFIG_NAME, ImageProcessor, ProcessorSettings

__all__ = [
    "RANDOM",
    "RANDOM_LLM_HIDDEN",
    "TINY_CONFIG",
    "TINY_LLM_HIDDEN",
    "init_checkpoint",
    "load_model",
    "make_processor",
    "resolve_model",
]

RANDOM = "random"
# Penguin-VL-2B's LLM width: the projector of a random full checkpoint maps 1024 -> 2048 like the 2B one.
RANDOM_LLM_HIDDEN = 2048
RANDOM_NOTE = (
    "Random weights in the released layout and dimensions, written by `penguin-vl init-checkpoint`: "
    "for tests and benchmarks only; its features mean nothing."
)
TINY_CONFIG = PenguinEncoderConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rope_theta=1e4,
)  # fmt: skip
TINY_LLM_HIDDEN = 96


def resolve_model(spec: str) -> Path:
    """The checkpoint directory for ``--model``: a directory, or a hub id ``org/name[@revision]`` in the local
    Hugging Face cache (see :func:`penguin_vl.hub.resolve`). Nothing is downloaded."""
    return resolve(spec, label=f"--model {spec!r}", other=f"or {RANDOM!r}", how_to="--model DIR")


def load_model(
    spec: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    project: bool,
    seed: int = 0,
) -> tuple[PenguinEncoder, str, bool]:
    """Load ``--model``; returns ``(model, resolved path or "", random_init)``.

    ``spec`` is a checkpoint directory, a hub id in the local cache (see :func:`resolve_model`), or
    ``"random"``: released dimensions with seeded random weights (and a 1024 -> 2048 projector with
    ``project``), built on the fly.
    """
    if spec == RANDOM:
        config = PenguinEncoderConfig()
        projector = ProjectorConfig(config.hidden_size, RANDOM_LLM_HIDDEN) if project else None
        model = PenguinEncoder.from_config(
            config, projector=projector, dtype=dtype, device=device, backend=backend, seed=seed
        )
        return model.eval(), "", True
    path = resolve_model(spec)
    model = PenguinEncoder.from_pretrained(path, dtype=dtype, device=device, backend=backend, load_projector=project)
    if project and model.projector is None:
        raise CheckpointError(
            f"--project: {path} holds no projector (a standalone encoder); pass a full Penguin-VL checkpoint"
        )
    return model, str(path), bool(model.config.extra.get("penguin_random_init", False))


def make_processor(
    model_path: str | Path | None,
    patch_size: int,
    *,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    num_threads: int = 1,
) -> ImageProcessor:
    """The preprocessor of a checkpoint: its ``preprocessor_config.json`` if it has one, else the released
    settings; ``min_tokens`` / ``max_tokens`` override the token budget. Its patch size must be the model's."""
    config = Path(model_path) / CONFIG_NAME if model_path else None
    settings = (
        ProcessorSettings.from_pretrained(config) if config is not None and config.is_file() else ProcessorSettings()
    )
    processor = ImageProcessor.from_settings(settings.with_budget(min_tokens, max_tokens), num_threads=num_threads)
    if processor.patch_size != patch_size:
        raise CheckpointError(
            f"{config}: patch_size {processor.patch_size} differs from the encoder's patch_size {patch_size}"
        )
    return processor


_CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", CONFIG_NAME)


def init_checkpoint(
    path: str | Path,
    *,
    full: bool = False,
    tiny: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight checkpoint in the released layout into directory ``path``.

    Standalone encoder (``config.json`` with ``model_type: penguinvl_vision_encoder`` and
    ``model.safetensors``), or with ``full`` a Penguin-VL-style checkpoint: the encoder under
    ``model.vision_encoder.``, a projector under ``model.vision_projector.`` and the encoder config nested
    in ``config.json``. Released dimensions unless ``tiny``. The encoder config carries
    ``"penguin_random_init": true`` and a note. The files are written beside ``path`` and moved in, config
    last, so an interrupted call leaves no checkpoint that loads.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    present = [n for n in _CHECKPOINT_FILES if (path / n).exists()] if path.is_dir() else []
    if present and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint ({', '.join(present)}); pass --overwrite")
    config = TINY_CONFIG if tiny else PenguinEncoderConfig()
    llm_hidden = TINY_LLM_HIDDEN if tiny else RANDOM_LLM_HIDDEN
    projector = ProjectorConfig(config.hidden_size, llm_hidden) if full else None
    model = PenguinEncoder.from_config(config, projector=projector, dtype=dtype, backend="torch", seed=seed)
    extra = {"penguin_random_init": True, "penguin_note": RANDOM_NOTE, "penguin_seed": seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_encoder(model, staging, prefix="model.vision_encoder." if full else "", extra_config=extra)
        ImageProcessor().save_pretrained(staging)
        path.mkdir(exist_ok=True)
        _remove_checkpoint(path)
        written = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
        for file in written:
            os.chmod(file, file_mode())
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _remove_checkpoint(path: Path) -> None:
    """Remove the files a checkpoint in ``path`` consists of, so that new files are not mixed with old shards."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            shards = set()
        for shard_name in shards:
            (path / shard_name).unlink(missing_ok=True)
    for name in _CHECKPOINT_FILES:
        (path / name).unlink(missing_ok=True)
