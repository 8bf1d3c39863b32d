"""The compiled resize: ``csrc/resize.c`` built on first use with the system C compiler, loaded with ctypes.

Triton already needs a C compiler at run time (it builds its launchers with one), so this adds no
dependency; where none is found, or the build fails, the preprocessor falls back to Pillow's own resize
(see ``penguin_vl/_resize.py``), which gives the same bits more slowly. :func:`status` says which is in use
and why; :func:`penguin_vl.processor.resize_backend` is its public face.

The library is cached under ``$PENGUIN_VL_CACHE_DIR`` (default ``~/.cache/penguin_vl``), keyed by
the source, the compiler and its flags; builds land under a temporary name and are renamed into
place, so concurrent processes (``torchrun``) do not trip over each other. Set
``PENGUIN_VL_NATIVE=0`` to use Pillow's resize, ``CC`` to choose the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["build", "enabled", "library", "status"]

SOURCE = Path(__file__).with_name("csrc") / "resize.c"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason = "not built yet"
_tried = False

_ARGTYPES = [
    ctypes.c_void_p,  # src
    ctypes.c_int64,  # src_stride
    ctypes.c_int32,  # height
    ctypes.c_int32,  # width
    ctypes.c_int32,  # channels
    ctypes.c_int32,  # out_height
    ctypes.c_int32,  # out_width
    ctypes.c_int32,  # vertical_first
    ctypes.c_void_p,  # h_first
    ctypes.c_void_p,  # h_count
    ctypes.c_void_p,  # h_weights
    ctypes.c_int32,  # h_ksize
    ctypes.c_void_p,  # v_first
    ctypes.c_void_p,  # v_count
    ctypes.c_void_p,  # v_weights
    ctypes.c_int32,  # v_ksize
    ctypes.c_void_p,  # table
    ctypes.c_int32,  # patch
    ctypes.c_int32,  # merge
    ctypes.c_void_p,  # out
]


def enabled() -> bool:
    """Whether ``PENGUIN_VL_NATIVE`` allows the compiled path (read on every call: tests flip it)."""
    return os.environ.get("PENGUIN_VL_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> list[str] | None:
    """The compiler's command: ``$CC`` (which may carry words, as in ``ccache gcc``), else cc, gcc or clang."""
    words = shlex.split(os.environ.get("CC", ""))
    if words:
        found = shutil.which(words[0])
        return [found, *words[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _flags() -> list[str]:
    # no contraction: the kernels reproduce other libraries' float operations one rounding at a time
    flags = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off"]
    # The vector loops are written for the compiler's auto-vectoriser: widen them where the CPU can.
    # torch's dispatch level names what this CPU runs (not -march=native: a shared cache may serve others).
    level = torch.backends.cpu.get_cpu_capability() if platform.machine().lower() in ("x86_64", "amd64") else ""
    if level in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if level == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("PENGUIN_VL_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "penguin_vl"


def build(source: Path) -> ctypes.CDLL:
    """Compile ``source`` into a shared library in the cache (once per source, compiler and flags) and load it.

    Also builds the video key-frame kernel (:mod:`penguin_vl.video._compiled`)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    flags = _flags()
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *(s.encode() for s in (*cc, *flags, platform.machine()))]))
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:20]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        except OSError as exc:
            raise RuntimeError(f"cannot write to {target.parent} ({exc}); set PENGUIN_VL_CACHE_DIR") from exc
        os.close(fd)
        try:
            done = subprocess.run([*cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{Path(cc[0]).name} failed on {source.name}: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def _build() -> ctypes.CDLL:
    lib = build(SOURCE)
    fn = lib.penguin_resize
    fn.argtypes = _ARGTYPES
    fn.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled library, built on the first call; None where it is disabled or cannot be built."""
    global _library, _reason, _tried
    if not enabled():
        return None
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _build()
                _reason = f"compiled ({_library._name})"
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _library, _reason = None, f"unavailable, using Pillow's resize: {exc}"
            _tried = True
    return _library


def status() -> str:
    """Which resize the preprocessor uses, and why."""
    if not enabled():
        return "disabled by PENGUIN_VL_NATIVE, using Pillow's resize"
    library()
    return _reason
