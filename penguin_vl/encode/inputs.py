"""Inputs of a feature-extraction run: what the command line names (files, directories, globs, clips,
videos), expanded into a deterministic list, shared among ranks, and read into pixels.

An input kind is found by :func:`collect_inputs` and read by :func:`read`; both know every kind.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from penguin_vl.video import VIDEO_SUFFIXES, Video, check_sampling, load_video

__all__ = [
    "CLIP_SUFFIX",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Input",
    "InputError",
    "RELEASED_SAMPLING",
    "VideoOptions",
    "collect_inputs",
    "read",
    "shard",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLIP_SUFFIX = ".npy"
_INPUT_SUFFIXES = (*IMAGE_SUFFIXES, CLIP_SUFFIX, *VIDEO_SUFFIXES)
_GLOB_CHARS = re.compile(r"[*?\[]")


class InputError(ValueError):
    """An input argument that names nothing usable: a missing path, an empty directory, a glob with no match."""


@dataclass(frozen=True)
class Input:
    """One item to encode. ``kind``: ``"image"`` (a file), ``"frames"`` (a directory of frames, one clip),
    ``"array"`` (a ``.npy`` clip, uint8 ``[T, H, W, C]``) or ``"video"`` (a video file, sampled as the
    reference samples it: :func:`penguin_vl.video.load_video`)."""

    name: str
    kind: str
    path: Path
    frames: tuple[Path, ...] = ()

    @property
    def is_clip(self) -> bool:
        """A clip's frames are sized together, from the first, at the clip merge size (the reference's video path)."""
        return self.kind != "image"

    @property
    def files(self) -> tuple[Path, ...]:
        """The files the input is read from."""
        return self.frames or (self.path,)


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _name(path: Path) -> str:
    return Path(os.path.normpath(path)).as_posix()


def _files_under(root: Path) -> list[Path]:
    found = [
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _INPUT_SUFFIXES and not _is_hidden(p, root)
    ]
    return sorted(found, key=_natural_key)


def _expand(arg: str) -> tuple[list[Path], bool]:
    """The paths an argument names, and whether they came from a pattern."""
    path = Path(arg).expanduser()
    if path.exists():
        return [path], False
    if _GLOB_CHARS.search(arg):
        matches = sorted((Path(m) for m in glob.glob(str(path), recursive=True)), key=_natural_key)
        if not matches:
            raise InputError(f"input {arg!r}: the pattern matches nothing")
        return matches, True
    raise InputError(f"input {arg!r}: no such file or directory")


def _file_input(path: Path) -> Input:
    suffix = path.suffix.lower()
    kind = "array" if suffix == CLIP_SUFFIX else "video" if suffix in VIDEO_SUFFIXES else "image"
    return Input(_name(path), kind, path)


def _clip_input(path: Path, arg: str) -> Input:
    if not path.is_dir():
        raise InputError(f"--clip {arg!r}: {path} is not a directory of frames")
    frames = sorted(
        (
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        ),
        key=_natural_key,
    )
    if not frames:
        raise InputError(f"--clip {arg!r}: no image files in {path} (frames: {', '.join(IMAGE_SUFFIXES)})")
    return Input(_name(path), "frames", path, tuple(frames))


def collect_inputs(paths: Sequence[str], clips: Sequence[str] = ()) -> list[Input]:
    """Expand the input arguments into a deterministic list of inputs.

    ``paths``: image files (any format Pillow reads), video files (any the bundled FFmpeg decodes, by
    suffix: :data:`VIDEO_SUFFIXES`), ``.npy`` clips, directories (searched recursively for all three,
    hidden entries skipped) and glob patterns (``**`` recurses).
    ``clips``: directories (or patterns matching directories) whose image files, in natural order, are the
    frames of one clip. An input's name is its path as given, normalised (``./a//b.png`` -> ``a/b.png``);
    files inside a directory are named by the directory's name joined with their relative path. Order:
    arguments in the order given, then natural order within a directory or pattern; an input reached twice
    is kept once.
    """
    found: list[Input] = []
    for arg in paths:
        matches, pattern = _expand(arg)
        # named explicitly, a file is taken whatever its suffix; matched by a pattern, only image files and
        # clips (and directories holding some) count, and the pattern must reach at least one
        files = [
            f
            for path in matches
            for f in (_files_under(path) if path.is_dir() else [path])
            if not pattern or path.is_dir() or f.suffix.lower() in _INPUT_SUFFIXES
        ]
        if not files:
            raise InputError(
                f"input {arg!r}: no image files, videos or {CLIP_SUFFIX} clips {'matched' if pattern else 'under'} "
                f"{arg if pattern else matches[0]} (images: {', '.join(IMAGE_SUFFIXES)}; videos: "
                f"{', '.join(VIDEO_SUFFIXES)}; a directory of "
                "frames is one clip with --clip)"
            )
        found.extend(_file_input(f) for f in files)
    for arg in clips:
        found.extend(_clip_input(path, arg) for path in _expand(arg)[0])
    seen: set[Path] = set()
    unique = []
    for inp in found:
        key = inp.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(inp)
    return unique


def shard(inputs: Sequence[Input], rank: int, world_size: int) -> list[Input]:
    """The inputs of ``rank``: every ``world_size``-th one, starting at ``rank`` (strided, so ranks get
    similar mixes when input sizes drift along the list)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(inputs[rank::world_size])


@dataclass(frozen=True)
class VideoOptions:
    """How video files are sampled (:func:`penguin_vl.video.load_video`'s arguments; released: fps 1, 180 frames)."""

    fps: float = 1.0
    max_frames: int = 180
    start: float | None = None
    end: float | None = None

    def __post_init__(self) -> None:
        check_sampling(self.fps, self.max_frames, self.start, self.end)


RELEASED_SAMPLING = VideoOptions()


def read(inp: Input, video: VideoOptions = RELEASED_SAMPLING) -> list[Image.Image] | list[np.ndarray] | Video:
    """The pixels of an input as the processor takes them: a list of one image, the frames of a clip, or
    a video (its frames, timestamps and frame types)."""
    if inp.kind == "video":
        return load_video(inp.path, fps=video.fps, max_frames=video.max_frames, start=video.start, end=video.end)
    if inp.kind == "image":
        image = _open_image(inp.path)
        if getattr(image, "n_frames", 1) > 1 and inp.path.suffix == ".gif":
            # an animated GIF is a clip: read with the reference's rules for GIFs, like a video
            return load_video(inp.path, fps=video.fps, max_frames=video.max_frames, start=video.start, end=video.end)
        return [image]
    if inp.kind == "frames":
        return [_open_image(f) for f in inp.frames]
    return _load_array(inp.path)


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        # counted while the file is open (Pillow counts GIF frames by seeking through it), so that the
        # processor can refuse an animated image rather than encode its first frame
        getattr(img, "n_frames", 1)
        return img


def _load_array(path: Path) -> list[np.ndarray]:
    array = np.load(path, allow_pickle=False)
    if array.ndim != 4 or array.dtype != np.uint8 or array.shape[0] == 0:
        raise ValueError(f"a .npy clip must be a non-empty uint8 [T, H, W, C] array, got {array.dtype} {array.shape}")
    return list(array)
