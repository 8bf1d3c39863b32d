"""The key-frame kernel, ``csrc/keyframes.c``, built on first use as the compiled resize is
(:mod:`penguin_vl._native`: same compiler, flags, cache and ``PENGUIN_VL_NATIVE`` switch).

Where it cannot be built, :class:`penguin_vl.video.keyframes.KeyFrameTyper` runs torch's resize and
a numpy HSV instead: the same bits, about twice the time per frame.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

from penguin_vl import _native

__all__ = ["library"]

SOURCE = Path(__file__).with_name("csrc") / "keyframes.c"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False

_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
_ARGTYPES = [_P, _I64, _I32, _I32, _I32, _I32, _P, _P, _P, _I32, _P, _P, _P, _I32, _P, _P, _I32, _P, _P, _P]


def _build() -> ctypes.CDLL:
    cc = _native._compiler()
    if cc is None:
        raise RuntimeError("no C compiler found")
    flags = [*_native._flags(), "-lm"]
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), *(s.encode() for s in (*cc, *flags, platform.machine()))]))
    target = _native._cache_dir() / f"keyframes-{key.hexdigest()[:20]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{Path(cc[0]).name} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.penguin_keyframe_patches.argtypes = _ARGTYPES
    lib.penguin_keyframe_patches.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call; None where it is disabled or cannot be built."""
    global _library, _tried
    if not _native.enabled():
        return None
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _library = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError):
                    _library = None
                _tried = True
    return _library
