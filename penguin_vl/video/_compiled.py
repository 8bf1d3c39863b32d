"""The key-frame kernel, ``csrc/keyframes.c``, built on first use as the compiled resize is
(:mod:`penguin_vl._native`: same compiler, flags, cache and ``PENGUIN_VL_NATIVE`` switch).

Where it cannot be built, :class:`penguin_vl.video.keyframes.KeyFrameTyper` runs torch's resize and
a numpy HSV instead: the same bits, several times the time per frame (~4.2 ms against ~0.63 ms on a
608x342 frame).
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
from pathlib import Path

from penguin_vl import _native

__all__ = ["library"]

SOURCE = Path(__file__).with_name("csrc") / "keyframes.c"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False

_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
_ARGTYPES = [_P, _I64, _I32, _I32, _I32, _I32, _P, _P, _P, _I32, _P, _P, _P, _I32, _P, _P, _P]


def _build() -> ctypes.CDLL:
    lib = _native.build(SOURCE)
    lib.penguin_keyframe_patches.argtypes = _ARGTYPES
    lib.penguin_keyframe_patches.restype = ctypes.c_int
    lib.penguin_patch_dots.argtypes = [_P, _P, _I64, _I32, _P]
    lib.penguin_patch_dots.restype = None
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
