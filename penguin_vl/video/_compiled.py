"""The key-frame kernel, ``csrc/keyframes.c``, built on first use as the compiled resize is
(:mod:`penguin_vl._native`: same compiler, flags, cache and ``PENGUIN_VL_NATIVE`` switch).

Where it cannot be built, :class:`penguin_vl.video.keyframes.KeyFrameTyper` runs torch's resize and
a numpy HSV instead: the same bits, about ten times the time per frame (~4.2 ms against ~0.35-0.4 ms on
a 608x342 frame).
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

_P, _I32, _I64, _F64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_double


def _build() -> ctypes.CDLL:
    lib = _native.build(SOURCE)
    lib.penguin_keyframe_work_bytes.argtypes = [_I32, _I32, _I32, _I32]
    lib.penguin_keyframe_work_bytes.restype = _I64
    resize = [_P, _P, _P, _I32]  # first taps, tap counts, weights, most taps
    compare = [_P, _P, _P, _F64, _F64, _P, _P]  # key, its squares, squares, threshold, margin, counts, close
    lib.penguin_keyframe_prepare.argtypes = [_I32, _I32, *resize, _P]
    lib.penguin_keyframe_prepare.restype = _I32
    lib.penguin_keyframe_patches.argtypes = [_P, _I64, _I32, _I32, _I32, _I32, *resize, *resize, _P, _I32, _P, *compare]
    lib.penguin_keyframe_patches.restype = _I64
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
