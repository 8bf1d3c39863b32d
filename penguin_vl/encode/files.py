"""Files that appear whole or not at all: written under a temporary name beside the target, then moved in."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

__all__ = ["OutputError", "atomic_write", "file_mode", "write_text"]


class OutputError(OSError):
    """An output that cannot be written (a read-only or full disk, a missing permission); names the file."""


@functools.cache
def file_mode() -> int:
    # mkstemp and safetensors create files readable by their owner only; outputs get the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[str], None], *, replace: bool = True) -> None:
    """``write(tmp)`` to a temporary file beside ``path`` (its directory made if need be), then move it to
    ``path`` in one step; :class:`OutputError` when it cannot be written.

    Without ``replace``, an existing ``path`` (even one that appeared while the run was going) is left alone
    and :class:`FileExistsError` is raised: the file is hard-linked into place, which fails if the name exists.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    try:
        try:
            write(tmp)
            os.chmod(tmp, file_mode())
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            raise OutputError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from e
        if replace:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"output exists: {path}; pass --overwrite to replace it") from None
        except OSError:  # a file system without hard links: check, then rename
            if path.exists():
                raise FileExistsError(f"output exists: {path}; pass --overwrite to replace it") from None
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(text: str) -> Callable[[str], None]:
    return lambda tmp: Path(tmp).write_text(text)
