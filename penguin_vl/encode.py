"""Feature extraction at scale: image files and clips in, safetensors features out.

The pipeline of one process on one device::

    collect inputs -> thread pool: decode + preprocess each input
                   -> packer thread: pack, in input order, into varlen batches of at most
                      ``batch_tokens`` patches (an input larger than that is a batch of its own)
                   -> main thread: encoder forward -> split per input -> sink

The pool runs a bounded window of inputs ahead and the packer keeps two packed batches ready, so the
device does not wait for image decoding or resizing. On CUDA the host copy of batch k's features is
queued behind its forward and collected only after batch k+1 has been launched, so the device also
does not wait for the split and the write.

Sinks: :class:`FileSink` keeps every feature in host memory and writes one safetensors file at the end;
:class:`DirSink` writes one file per input as it is encoded, then an ``index.json``. Every file is
written to a temporary name beside its target and renamed into place, so an interrupted run leaves no
file under an output name; in a directory, ``index.json`` is written last and marks a finished run.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``), every rank collects the same input list, takes the inputs
``i`` with ``i % world_size == rank``, and writes its own part. No process group is needed: after writing
its part, a rank looks for all the parts of the run (same input list, settings and model, recorded as a
digest in every part), and when they are all there it writes the index. So the last rank to finish
writes it; :func:`merge_index` rebuilds it from the parts.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import glob
import hashlib
import importlib.metadata
import json
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from penguin_vl.config import PenguinEncoderConfig, ProjectorConfig
from penguin_vl.hub import ModelNotFoundError, hub_cache_dir, resolve
from penguin_vl.loading import CheckpointError, save_encoder
from penguin_vl.model import PenguinEncoder
from penguin_vl.processor import ImageProcessor, restore_default_torch_threads, torch_worker_pool

__all__ = [
    "DirSink",
    "FileSink",
    "Input",
    "InputError",
    "ModelNotFoundError",
    "RunInfo",
    "Summary",
    "collect_inputs",
    "encode",
    "files_fingerprint",
    "hub_cache_dir",
    "init_checkpoint",
    "load_model",
    "make_processor",
    "processor_settings",
    "merge_index",
    "part_path",
    "resolve_model",
    "run_metadata",
    "shard",
]

PREPROCESSOR_CONFIG = "preprocessor_config.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLIP_SUFFIX = ".npy"
FORMAT = "penguin-vl-features/1"
INDEX_FORMAT = "penguin-vl-features-index/1"
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
_GLOB_CHARS = re.compile(r"[*?\[]")
# longest stem of a per-input file name in bytes: room for "~N" and ".safetensors" within 255
_MAX_STEM_BYTES = 200


class InputError(ValueError):
    """An input argument that names nothing usable: a missing path, an empty directory, a glob with no match."""


@dataclass(frozen=True)
class Input:
    """One item to encode. ``kind``: ``"image"`` (a file), ``"frames"`` (a directory of frames, one clip)
    or ``"array"`` (a ``.npy`` clip, uint8 ``[T, H, W, C]``)."""

    name: str
    kind: str
    path: Path
    frames: tuple[Path, ...] = ()


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _name(path: Path) -> str:
    return Path(os.path.normpath(path)).as_posix()


def _files_under(root: Path) -> list[Path]:
    found = [
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, CLIP_SUFFIX) and not _is_hidden(p, root)
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
    kind = "array" if path.suffix.lower() == CLIP_SUFFIX else "image"
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

    ``paths``: image files (any format Pillow reads), ``.npy`` clips, directories (searched recursively
    for image files and ``.npy`` clips, hidden entries skipped) and glob patterns (``**`` recurses).
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
            if not pattern or path.is_dir() or f.suffix.lower() in (*IMAGE_SUFFIXES, CLIP_SUFFIX)
        ]
        if not files:
            raise InputError(
                f"input {arg!r}: no image files or {CLIP_SUFFIX} clips {'matched' if pattern else 'under'} "
                f"{arg if pattern else matches[0]} (images: {', '.join(IMAGE_SUFFIXES)}; a directory of "
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


def resolve_model(spec: str) -> Path:
    """The checkpoint directory for ``--model``: a directory, or a hub id ``org/name[@revision]`` in the local
    Hugging Face cache (see :func:`penguin_vl.hub.resolve`). Nothing is downloaded."""
    return resolve(spec, label=f"--model {spec!r}", other=f"or {RANDOM!r}", how_to="--model DIR")


@dataclass(frozen=True)
class RunInfo:
    """What produced the features; written into the output's metadata."""

    model: str
    model_path: str
    random_init: bool
    dtype: str
    device: str
    backend: str
    projected: bool
    feature_dim: int
    settings: dict[str, Any]

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "model": self.model,
            "model_path": self.model_path,
            "random_init": json.dumps(self.random_init),
            "dtype": self.dtype,
            "device": self.device,
            "backend": self.backend,
            "projected": json.dumps(self.projected),
            "feature_dim": str(self.feature_dim),
            "settings": json.dumps(self.settings, sort_keys=True),
        }


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


_CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", PREPROCESSOR_CONFIG)


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
        (staging / PREPROCESSOR_CONFIG).write_text(json.dumps(_released_preprocessor(), indent=2) + "\n")
        path.mkdir(exist_ok=True)
        _remove_checkpoint(path)
        written = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
        for file in written:
            os.chmod(file, _file_mode())
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _released_preprocessor() -> dict[str, Any]:
    p = ImageProcessor()
    return {
        "patch_size": p.patch_size,
        "min_tokens": p.min_tokens,
        "max_tokens": p.max_tokens,
        "image_mean": list(p.image_mean),
        "image_std": list(p.image_std),
        "rescale_factor": p.rescale_factor,
        "resample": int(Image.Resampling.BICUBIC),
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
    }


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
    config = Path(model_path) / PREPROCESSOR_CONFIG if model_path else None
    base = ImageProcessor.from_pretrained(config) if config is not None and config.is_file() else ImageProcessor()
    processor = ImageProcessor(
        patch_size=base.patch_size,
        min_tokens=base.min_tokens if min_tokens is None else min_tokens,
        max_tokens=base.max_tokens if max_tokens is None else max_tokens,
        image_mean=base.image_mean,
        image_std=base.image_std,
        rescale_factor=base.rescale_factor,
        do_rescale=base.do_rescale,
        do_normalize=base.do_normalize,
        num_threads=num_threads,
    )
    if processor.patch_size != patch_size:
        raise CheckpointError(
            f"{config}: patch_size {processor.patch_size} differs from the encoder's patch_size {patch_size}"
        )
    return processor


def processor_settings(processor: ImageProcessor) -> dict[str, Any]:
    """The preprocessor settings that determine the features, for the output's metadata."""
    return {
        "patch_size": processor.patch_size,
        "min_tokens": processor.min_tokens,
        "max_tokens": processor.max_tokens,
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
        "rescale_factor": processor.rescale_factor if processor.do_rescale else None,
        "normalize": processor.do_normalize,
    }


@dataclass
class Prepared:
    """One preprocessed input: its rows of the packed batch and its grid."""

    name: str
    pixel_values: torch.Tensor  # [n, C*p*p] float32
    grid_sizes: torch.Tensor  # [rows, 3] int64
    merge_sizes: torch.Tensor  # [rows] int64
    seconds: float

    @property
    def tokens(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def out_tokens(self) -> int:
        g, m = self.grid_sizes, self.merge_sizes
        return int((g[:, 0] * (g[:, 1] // m) * (g[:, 2] // m)).sum())


@dataclass
class _Batch:
    items: list[Prepared]
    pixel_values: torch.Tensor
    grid_sizes: torch.Tensor
    merge_sizes: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.pixel_values.shape[0]


@dataclass
class _Failure:
    name: str
    reason: str


_END = object()


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def _load_array(path: Path) -> list[np.ndarray]:
    array = np.load(path, allow_pickle=False)
    if array.ndim != 4 or array.dtype != np.uint8 or array.shape[0] == 0:
        raise ValueError(f"a .npy clip must be a non-empty uint8 [T, H, W, C] array, got {array.dtype} {array.shape}")
    return list(array)


def prepare(inp: Input, processor: ImageProcessor, merge_size: int, clip_merge_size: int) -> Prepared:
    """Decode and preprocess one input. An image is a list of one, so it is sized on its own; a clip is the
    list of its frames, sized together from the first with the token budget shared (the reference's video
    path), one grid row per frame."""
    start = time.perf_counter()
    if inp.kind == "image":
        images, merge = [_open_image(inp.path)], merge_size
    elif inp.kind == "frames":
        images, merge = [_open_image(f) for f in inp.frames], clip_merge_size
    else:
        images, merge = _load_array(inp.path), clip_merge_size
    out = processor(images, merge_size=merge)
    return Prepared(inp.name, out.pixel_values, out.grid_sizes, out.merge_sizes, time.perf_counter() - start)


def _prepared_in_order(
    inputs: Sequence[Input], fn: Callable[[Input], Prepared], pool: cf.Executor, window: int, stop: threading.Event
) -> Iterator[Prepared | _Failure]:
    """Results in input order while at most ``window`` inputs are in flight in ``pool``."""
    pending: deque[tuple[Input, cf.Future]] = deque()
    todo = iter(inputs)
    for inp in todo:
        pending.append((inp, pool.submit(fn, inp)))
        if len(pending) >= window:
            break
    while pending and not stop.is_set():
        inp, future = pending.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(fn, nxt)))
        try:
            yield future.result()
        except Exception as e:  # noqa: BLE001 (an unreadable input is reported and skipped, whatever the cause)
            yield _Failure(inp.name, f"{type(e).__name__}: {e}")


def _pack(items: list[Prepared], pin: bool) -> _Batch:
    n = sum(p.tokens for p in items)
    pixel_values = torch.empty((n, items[0].pixel_values.shape[1]), dtype=torch.float32, pin_memory=pin)
    torch.cat([p.pixel_values for p in items], out=pixel_values)
    return _Batch(
        items,
        pixel_values,
        torch.cat([p.grid_sizes for p in items]),
        torch.cat([p.merge_sizes for p in items]),
    )


def _batches(results: Iterable[Prepared | _Failure], batch_tokens: int, pin: bool) -> Iterator[_Batch | _Failure]:
    group: list[Prepared] = []
    tokens = 0
    for r in results:
        if isinstance(r, _Failure):
            yield r
            continue
        if group and tokens + r.tokens > batch_tokens:
            yield _pack(group, pin)
            group, tokens = [], 0
        group.append(r)
        tokens += r.tokens
    if group:
        yield _pack(group, pin)


class Progress:
    """A one-line progress bar on a text stream: items, items/s, tokens/s, ETA."""

    def __init__(self, total: int, stream: TextIO | None, label: str = "") -> None:
        self.total, self.stream, self.label = total, stream, label
        self.items = self.tokens = self.failed = 0
        self.start = self._last = time.perf_counter()

    def update(self, items: int, tokens: int, failed: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        self.failed += failed
        now = time.perf_counter()
        if self.stream is not None and (now - self._last >= 0.1 or self.items >= self.total):
            self._last = now
            self._render(now)

    def _render(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        done = self.items / max(self.total, 1)
        bar = "#" * round(24 * done) + "." * (24 - round(24 * done))
        rate = self.items / elapsed
        eta = f"{(self.total - self.items) / rate:.0f}s" if rate > 0 and self.items < self.total else "-"
        failed = f" | {self.failed} failed" if self.failed else ""
        self.stream.write(
            f"\r{self.label}[{bar}] {self.items}/{self.total} | {rate:.2f} items/s | "
            f"{self.tokens / elapsed:,.0f} tokens/s | ETA {eta}{failed}   "
        )
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line, once; later calls do nothing."""
        if self.stream is not None:
            if self.items < self.total:
                self._render(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
            self.stream = None


@dataclass
class Summary:
    """What a run did. Times in seconds; ``preprocess`` is summed over the pool's workers and overlaps the
    encoder, ``input_wait`` is the time the encoder loop waited for a packed batch."""

    items: int = 0
    tokens: int = 0
    out_tokens: int = 0
    batches: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    encoded: list[str] = field(default_factory=list)
    preprocess: float = 0.0
    input_wait: float = 0.0
    encode: float = 0.0
    write: float = 0.0
    total: float = 0.0


@functools.cache
def _file_mode() -> int:
    # mkstemp and safetensors create files readable by their owner only; outputs get the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write: Callable[[str], None], *, replace: bool = True) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it to ``path`` in one step.

    Without ``replace``, an existing ``path`` (even one that appeared while the run was going) is left alone
    and :class:`FileExistsError` is raised: the file is hard-linked into place, which fails if the name exists.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
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


def _write_text(text: str) -> Callable[[str], None]:
    return lambda tmp: Path(tmp).write_text(text)


def part_path(path: Path, rank: int, world_size: int) -> Path:
    """``out.safetensors`` -> ``out.rank00001-of-00004.safetensors`` (the path itself for one rank)."""
    if world_size == 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank:05d}-of-{world_size:05d}{path.suffix}")


def index_path(out: Path, directory: bool) -> Path:
    """Where the index of a sharded run goes: ``out.index.json`` beside a file, ``index.json`` in a directory."""
    return out / "index.json" if directory else out.with_name(f"{out.stem}.index.json")


class FileSink:
    """All features in one safetensors file, written once at the end: ``<name>.features`` [n, dim] in the
    model's dtype, ``<name>.grid`` [rows, 3] int64 (t, h, w in patches), ``<name>.merge`` [rows] int64."""

    def __init__(self, path: Path, rank: int = 0, world_size: int = 1, *, overwrite: bool = True) -> None:
        self.overwrite = overwrite
        self.path = part_path(path, rank, world_size)
        self.index = index_path(path, directory=False) if world_size > 1 else None
        self.sharded = world_size > 1
        self.tensors: dict[str, torch.Tensor] = {}

    def conflicts(self) -> list[Path]:
        return [p for p in (self.path, self.index) if p is not None and p.exists()]

    def clear_stale(self) -> None:
        """Before overwriting a sharded run, drop this rank's old part and the index: an index must describe
        only parts of one finished run, and the last rank to finish writes it again. A single file is simply
        replaced at the end."""
        if self.index is not None:
            self.path.unlink(missing_ok=True)
            self.index.unlink(missing_ok=True)

    def add(self, name: str, features: torch.Tensor, grid: torch.Tensor, merge: torch.Tensor) -> None:
        self.tensors[f"{name}.features"] = features
        self.tensors[f"{name}.grid"] = grid
        self.tensors[f"{name}.merge"] = merge

    def commit(self, metadata: dict[str, str]) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path, lambda tmp: save_file(self.tensors, tmp, metadata=metadata), replace=self.overwrite)
        return self.path


def _file_names(names: Sequence[str]) -> dict[str, str]:
    """A distinct, flat, portable file name for every input name."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        stem = re.sub(r"[^\w.+-]", "_", name.strip("/").replace("/", "__")).lstrip(".") or "input"
        if len(stem.encode()) > _MAX_STEM_BYTES:
            # file systems allow 255 bytes: keep the name's start and make it distinct with a hash of the whole
            digest = hashlib.sha256(name.encode()).hexdigest()[:16]
            stem = stem.encode()[: _MAX_STEM_BYTES - 17].decode(errors="ignore") + "-" + digest
        candidate, k = stem, 1
        while candidate.lower() in used:
            k += 1
            candidate = f"{stem}~{k}"
        used.add(candidate.lower())
        out[name] = candidate + ".safetensors"
    return out


class DirSink:
    """One safetensors file per input in a directory (tensors ``features``, ``grid``, ``merge``), each written
    as soon as its input is encoded, and at the end ``index.json`` mapping input names to files (a rank's
    ``index.rankRRRRR-of-WWWWW.json`` under torchrun). File names are derived from all the inputs of the run,
    so ranks never collide."""

    def __init__(
        self,
        path: Path,
        all_names: Sequence[str],
        names: Sequence[str],
        rank: int = 0,
        world_size: int = 1,
        *,
        overwrite: bool = True,
    ):
        self.overwrite = overwrite
        self.dir = path
        names_to_files = _file_names(all_names)
        self.files = {n: names_to_files[n] for n in names}
        self.index = index_path(path, directory=True)
        self.part = part_path(self.index, rank, world_size) if world_size > 1 else None
        self.sharded = world_size > 1
        self.metadata: dict[str, str] = {}
        self.written: dict[str, str] = {}

    def conflicts(self) -> list[Path]:
        paths = [self.index, self.part, *(self.dir / f for f in self.files.values())]
        return [p for p in paths if p is not None and p.exists()]

    def clear_stale(self) -> None:
        """Before overwriting, drop the index and this rank's part: an index must describe only files of one
        finished run, and the last rank to finish writes it again."""
        self.index.unlink(missing_ok=True)
        if self.part is not None:
            self.part.unlink(missing_ok=True)

    def add(self, name: str, features: torch.Tensor, grid: torch.Tensor, merge: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        file = self.files[name]
        tensors = {"features": features, "grid": grid, "merge": merge}
        metadata = {**self.metadata, "name": name}
        _atomic_write(self.dir / file, lambda tmp: save_file(tensors, tmp, metadata=metadata), replace=self.overwrite)
        self.written[name] = file

    def commit(self, metadata: dict[str, str]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        record = _part_record(metadata, self.written)
        target = self.part or self.index
        _atomic_write(target, _write_text(json.dumps(record, indent=1) + "\n"), replace=self.overwrite)
        return target


def _part_record(metadata: dict[str, str], inputs: dict[str, str]) -> dict[str, Any]:
    meta = {k: v for k, v in metadata.items() if k not in ("inputs", "failed", "rank", "run", "world_size")}
    return {
        "format": INDEX_FORMAT,
        "run": metadata["run"],
        "rank": int(metadata["rank"]),
        "world_size": int(metadata["world_size"]),
        "inputs": inputs,
        "failed": json.loads(metadata["failed"]),
        "metadata": meta,
    }


def run_metadata(info: RunInfo, all_inputs: Sequence[Input], rank: int, world_size: int) -> dict[str, str]:
    """Metadata of one rank's output: :meth:`RunInfo.metadata` plus the rank, the world size and the run digest."""
    meta = info.metadata()
    meta["package_version"] = _package_version()
    meta["rank"], meta["world_size"] = str(rank), str(world_size)
    # the fingerprint stats every input file; only parts of a sharded run are ever matched against each other
    fingerprint = files_fingerprint(all_inputs, info) if world_size > 1 else ""
    meta["run"] = run_digest([i.name for i in all_inputs], world_size, meta, fingerprint)
    return meta


def files_fingerprint(inputs: Sequence[Input], info: RunInfo) -> str:
    """Size and modification time of every input file and checkpoint file: a part left by an earlier run
    over the same names joins a new run's index only if none of the files it was computed from changed."""
    files = [f for i in inputs for f in (i.frames or (i.path,))]
    if info.model_path:
        files += sorted(p for p in Path(info.model_path).iterdir() if p.suffix in (".json", ".safetensors"))
    stamps = []
    for f in files:
        try:
            st = f.stat()
            stamps.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((str(f), -1, -1))
    return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]


def _package_version() -> str:
    try:
        return importlib.metadata.version("penguin-kernels")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_digest(names: Sequence[str], world_size: int, metadata: dict[str, str], fingerprint: str = "") -> str:
    """Identity of a (sharded) run: every rank computes the same value from its own arguments and the
    :func:`files_fingerprint` of the files they name."""
    keys = ("model", "model_path", "dtype", "projected", "settings")
    blob = json.dumps([list(names), world_size, {k: metadata.get(k) for k in keys}, fingerprint])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_parts(out: Path, directory: bool, world_size: int | None) -> tuple[int, list[dict[str, Any]]] | None:
    if directory:
        pattern, reader = str(out / "index.rank*-of-*.json"), _read_dir_part
    else:
        pattern, reader = str(out.with_name(f"{glob.escape(out.stem)}.rank*-of-*{out.suffix}")), _read_file_part
    found: dict[int, dict[int, Path]] = {}
    for p in glob.glob(pattern):
        m = re.search(r"\.rank(\d+)-of-(\d+)\.", Path(p).name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = Path(p)
    if world_size is None:
        if len(found) != 1:
            raise FileNotFoundError(
                f"{out}: expected the parts of one sharded run, found world sizes {sorted(found) or 'none'}"
            )
        world_size = next(iter(found))
    parts = found.get(world_size, {})
    if sorted(parts) != list(range(world_size)):
        return None
    return world_size, [reader(parts[r]) for r in range(world_size)]


def _read_dir_part(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _read_file_part(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    names = json.loads(metadata["inputs"])
    return _part_record(metadata, dict.fromkeys(names, path.name))


def merge_index(
    out: str | Path, *, directory: bool, world_size: int | None = None, require: bool = True
) -> Path | None:
    """Write the index of a sharded run from its parts: ``out`` is the ``--out`` file or (``directory``) the
    ``--out-dir``.

    The index (``out.index.json``, or ``index.json`` in the directory) maps every input name to the file
    holding it and lists the failed inputs. Returns its path; if a part is missing or the parts belong to
    different runs, raises (``require``) or returns ``None``.
    """
    out = Path(out)
    got = _read_parts(out, directory, world_size)
    if got is None:
        if require:
            raise FileNotFoundError(f"{out}: not all ranks' parts are there (world size {world_size})")
        return None
    world_size, parts = got
    runs = {p["run"] for p in parts}
    if len(runs) != 1:
        if require:
            raise ValueError(f"{out}: the parts come from different runs ({sorted(runs)}); rerun the missing ranks")
        return None
    inputs: dict[str, str] = {}
    failed: dict[str, str] = {}
    for p in parts:
        inputs.update(p["inputs"])
        failed.update(p["failed"])
    index = {
        "format": INDEX_FORMAT,
        "run": runs.pop(),
        "world_size": world_size,
        "inputs": inputs,
        "failed": failed,
        "metadata": parts[0]["metadata"],
    }
    if not directory:
        index["files"] = [part_path(out, r, world_size).name for r in range(world_size)]
    path = index_path(out, directory)
    _atomic_write(path, _write_text(json.dumps(index, indent=1) + "\n"))
    return path


def encode(
    model: PenguinEncoder,
    processor: ImageProcessor,
    inputs: Sequence[Input],
    sink: FileSink | DirSink,
    *,
    metadata: dict[str, str],
    batch_tokens: int = 16384,
    merge_size: int = 1,
    clip_merge_size: int = 2,
    project: bool = False,
    workers: int = 4,
    progress: Progress | None = None,
) -> Summary:
    """Encode ``inputs`` into ``sink``; failed inputs are recorded in the summary (and the metadata) and skipped.

    ``metadata`` (see :func:`run_metadata`) is written into every output file, with ``inputs`` (the names
    encoded, in order) and ``failed`` (name -> reason) added as JSON. If this raises, neither the single file
    nor an index is written; a :class:`DirSink` keeps the per-input files it completed. Without a single
    input encoded, a run of one rank writes nothing.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    summary = Summary()
    start = time.perf_counter()
    device = model.device
    on_cuda = device.type == "cuda"
    if isinstance(sink, DirSink):
        sink.metadata = dict(metadata)
    stop = threading.Event()
    ready: queue.Queue = queue.Queue(maxsize=2)

    def fn(inp: Input) -> Prepared:
        return prepare(inp, processor, merge_size, clip_merge_size)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def packer(pool: cf.Executor) -> None:
        try:
            window = max(32, 4 * workers)
            for item in _batches(_prepared_in_order(inputs, fn, pool, window, stop), batch_tokens, on_cuda):
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 (handed to the main thread, which raises it)
            put(e)

    def finish(batch: _Batch, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        t0 = time.perf_counter()
        if event is not None:
            event.synchronize()
        summary.encode += time.perf_counter() - t0
        t0 = time.perf_counter()
        sizes = [p.out_tokens for p in batch.items]
        for p, feats in zip(batch.items, host.split(sizes), strict=True):
            sink.add(p.name, feats.clone(), p.grid_sizes, p.merge_sizes)
            summary.encoded.append(p.name)
            summary.out_tokens += feats.shape[0]
        summary.write += time.perf_counter() - t0
        summary.items += len(batch.items)
        summary.tokens += batch.tokens
        summary.batches += 1
        summary.preprocess += sum(p.seconds for p in batch.items)
        if progress is not None:
            progress.update(len(batch.items), batch.tokens)

    pool = torch_worker_pool(workers, "penguin-preprocess")
    thread = threading.Thread(target=packer, args=(pool,), name="penguin-packer", daemon=True)
    thread.start()
    inflight: tuple[_Batch, torch.Tensor, torch.cuda.Event | None] | None = None
    try:
        while True:
            t0 = time.perf_counter()
            item = ready.get()
            summary.input_wait += time.perf_counter() - t0
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Failure):
                summary.failed[item.name] = item.reason
                if progress is not None:
                    progress.update(1, 0, failed=1)
                continue
            t0 = time.perf_counter()
            pixel_values = item.pixel_values.to(device, non_blocking=True)
            with torch.inference_mode():
                feats = model(pixel_values, item.grid_sizes, item.merge_sizes, project=project)
            host, event = feats, None
            if on_cuda:
                host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
                host.copy_(feats, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            summary.encode += time.perf_counter() - t0
            if inflight is not None:
                finish(*inflight)
            inflight = (item, host, event)
        if inflight is not None:
            finish(*inflight)
            inflight = None
        final = dict(metadata)
        final["inputs"] = json.dumps(summary.encoded)
        final["failed"] = json.dumps(summary.failed)
        t0 = time.perf_counter()
        if summary.encoded or sink.sharded:
            sink.commit(final)
        summary.write += time.perf_counter() - t0
    finally:
        if progress is not None:
            progress.close()
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        thread.join(timeout=5)
        restore_default_torch_threads()
    summary.total = time.perf_counter() - start
    return summary
