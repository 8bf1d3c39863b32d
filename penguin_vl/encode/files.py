"""Files that appear whole or not at all: written under a temporary name beside the target, then moved in."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "file_mode", "write_text"]


@functools.cache
def file_mode() -> int:
    # mkstemp and safetensors create files readable by their owner only; outputs get the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[str], None], *, replace: bool = True) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it to ``path`` in one step.

    Without ``replace``, an existing ``path`` (even one that appeared while the run was going) is left alone
    and :class:`FileExistsError` is raised: the file is hard-linked into place, which fails if the name exists.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
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
