"""Checkpoints by hub id, from the local Hugging Face cache only: nothing is ever downloaded.

``resolve("tencent/Penguin-Encoder")`` finds ``models--tencent--Penguin-Encoder/snapshots/<commit>/`` in
the cache that ``huggingface-cli download`` (or ``hf download``) fills; a directory is returned as it is.
Both ``from_pretrained`` methods and the command line go through it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["ModelNotFoundError", "hub_cache_dir", "resolve"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFoundError(FileNotFoundError):
    """Neither a checkpoint directory nor a model in the local Hugging Face cache."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def resolve(
    spec: str | os.PathLike,
    *,
    needs: str = "config.json",
    label: str | None = None,
    other: str = "",
    how_to: str = "a checkpoint directory",
) -> Path:
    """The directory ``spec`` names: itself if it is one, else the snapshot of hub id ``org/name[@revision]``
    in the local cache (``revision``: a branch or tag recorded under ``refs/``, or a commit; default
    ``main``), which must hold ``needs``.

    ``label``, ``other`` and ``how_to`` only word the errors (the command line names its option there).
    """
    path = Path(spec).expanduser()
    label = label or repr(os.fspath(spec))
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{label} is a file; pass the checkpoint directory holding {needs}")
    repo, _, revision = os.fspath(spec).partition("@")
    if not _HUB_ID.fullmatch(repo):
        raise ModelNotFoundError(
            f"{label}: no such directory (pass a checkpoint directory or a hub id such as "
            f"tencent/Penguin-Encoder that is in the local Hugging Face cache{', ' + other if other else ''})"
        )
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    advice = (
        f"download it first (`huggingface-cli download {repo}` or `hf download {repo}`, which fill this cache), "
        f"set HF_HUB_CACHE or HF_HOME to the cache that holds it, or pass {how_to}"
    )
    snapshots = repo_dir / "snapshots"
    available = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if not available:
        raise ModelNotFoundError(f"{label}: not in the Hugging Face cache at {cache}; {advice}")
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
    elif revision:
        commit = revision
    elif len(available) == 1:
        commit = available[0]
    else:
        raise ModelNotFoundError(
            f"{label}: {repo_dir} has no refs/main and several snapshots {available}; choose one as {repo}@<commit>"
        )
    snapshot = snapshots / commit
    if not snapshot.is_dir():
        raise ModelNotFoundError(
            f"{label}: revision {revision or 'main'!r} ({commit}) is not in {snapshots} (cached: {available}); {advice}"
        )
    if not (snapshot / needs).is_file():
        raise ModelNotFoundError(f"{label}: {snapshot} has no {needs} (incomplete download?); {advice}")
    return snapshot
