"""Where features go: one safetensors file for the run (:class:`FileSink`) or one per input in a directory
(:class:`DirSink`), each written atomically, with the metadata of what produced them (:class:`RunInfo`)
and, for a directory or a sharded run, the run index.

A sink is driven through :class:`Sink`: ``conflicts`` (and, resuming, ``resume``) before the run, ``begin``
and ``add`` per encoded input by :func:`penguin_vl.encode.encode`, ``commit`` at the end. Nothing is
removed before the run: an interrupted one leaves every earlier output whole.

Index: a directory's ``index.json`` (or ``out.index.json`` beside a sharded file) maps input names to the
files holding them and lists the failed inputs; it is written last and describes the last finished run. Under
``torchrun`` every rank writes its own part, recorded with a digest of the run (input list, settings,
model, and the files they name); the last rank to find all the parts of its run writes the index, and
:func:`merge_index` rebuilds it from the parts.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from penguin_vl.encode.files import atomic_write, write_text
from penguin_vl.encode.inputs import Input

__all__ = [
    "FORMAT",
    "INDEX_FORMAT",
    "SAME_OUTPUT",
    "DirSink",
    "FileSink",
    "RunInfo",
    "Sink",
    "files_fingerprint",
    "index_path",
    "merge_index",
    "package_version",
    "part_path",
    "run_digest",
    "run_metadata",
    "source_stamp",
]

FORMAT = "penguin-vl-features/1"
INDEX_FORMAT = "penguin-vl-features-index/1"
# longest stem of a per-input file name in bytes: room for "~N" and ".safetensors" within 255
_MAX_STEM_BYTES = 200


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


class Sink(Protocol):
    """What the encoding loop writes to."""

    sharded: bool
    kept: dict[str, str]

    def conflicts(self) -> list[Path]:
        """Outputs of this run that exist already."""
        ...

    def begin(self, metadata: dict[str, str]) -> None:
        """The run's metadata (see :func:`run_metadata`), before the first input."""
        ...

    def resume(self, metadata: dict[str, str], inputs: Sequence[Input]) -> list[str]:
        """Before the run: keep the outputs already complete for this run; returns the names of their inputs."""
        ...

    def add(
        self,
        name: str,
        features: torch.Tensor,
        grid: torch.Tensor,
        merge: torch.Tensor,
        source: str = "",
        *,
        timestamps: torch.Tensor | None = None,
        frame_types: torch.Tensor | None = None,
    ) -> None:
        """One encoded input; ``source``: the :func:`source_stamp` of the files it was read from; a video's
        frames also have ``timestamps`` (seconds) and ``frame_types`` (0 key, 1 intermediate)."""
        ...

    def commit(self, metadata: dict[str, str]) -> Path:
        """The end of the run: write what is left and return the path written."""
        ...


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
    model's dtype, ``<name>.grid`` [rows, 3] int64 (t, h, w in patches), ``<name>.merge`` [rows] int64; for
    a video also ``<name>.timestamps`` [frames] float64 (seconds) and ``<name>.frame_types`` [frames] int32
    (0 key, 1 intermediate)."""

    def __init__(self, path: Path, rank: int = 0, world_size: int = 1, *, overwrite: bool = True) -> None:
        self.overwrite = overwrite
        self.path = part_path(path, rank, world_size)
        self.index = index_path(path, directory=False) if world_size > 1 else None
        self.sharded = world_size > 1
        self.tensors: dict[str, torch.Tensor] = {}
        self.kept: dict[str, str] = {}

    def conflicts(self) -> list[Path]:
        return [p for p in (self.path, self.index) if p is not None and p.exists()]

    def resume(self, metadata: dict[str, str], inputs: Sequence[Input]) -> list[str]:
        """A single file is written whole at the end: there is nothing to resume from."""
        raise ValueError(f"{self.path}: a run into one file cannot be resumed; write one file per input (--out-dir)")

    def begin(self, metadata: dict[str, str]) -> None:
        """Nothing to do: the one file is written at the end, with the final metadata."""

    def add(
        self,
        name: str,
        features: torch.Tensor,
        grid: torch.Tensor,
        merge: torch.Tensor,
        source: str = "",
        *,
        timestamps: torch.Tensor | None = None,
        frame_types: torch.Tensor | None = None,
    ) -> None:
        self.tensors.update(_stored(f"{name}.", features, grid, merge, timestamps, frame_types))

    def commit(self, metadata: dict[str, str]) -> Path:
        atomic_write(self.path, lambda tmp: save_file(self.tensors, tmp, metadata=metadata), replace=self.overwrite)
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
    """One safetensors file per input in a directory (tensors ``features``, ``grid``, ``merge``, and for a
    video ``timestamps`` and ``frame_types``), each written
    atomically as soon as its input is encoded, and at the end ``index.json`` mapping input names to files
    (a rank's ``index.rankRRRRR-of-WWWWW.json`` under torchrun). File names are derived from all the inputs
    of the run, so ranks never collide.

    Nothing is removed before the run: an interrupted run leaves, per input, the old complete file or the
    new complete one, and the old index until the new one replaces it. :meth:`resume` keeps the files that
    already hold what this run would write."""

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
        self.kept: dict[str, str] = {}
        self.resumed = False

    def conflicts(self) -> list[Path]:
        paths = [self.index, self.part, *(self.dir / f for f in self.files.values())]
        return [p for p in paths if p is not None and p.exists()]

    def resume(self, metadata: dict[str, str], inputs: Sequence[Input]) -> list[str]:
        """Keep the files of ``inputs`` that are complete and were made from the same input files, model and
        settings (:data:`SAME_OUTPUT` in ``metadata``); returns their names. Another file in the way is
        replaced with ``overwrite`` and raises :class:`FileExistsError` without."""
        self.resumed = True
        in_the_way = []
        for inp in inputs:
            path = self.dir / self.files[inp.name]
            if not path.exists():
                continue
            if _holds(path, inp, metadata):
                self.kept[inp.name] = self.files[inp.name]
            else:
                in_the_way.append(path)
        if in_the_way and not self.overwrite:
            shown = ", ".join(str(p) for p in in_the_way[:3]) + (" ..." if len(in_the_way) > 3 else "")
            raise FileExistsError(
                f"output exists from another model, other settings or changed inputs: {shown}; "
                "pass --overwrite to replace it"
            )
        return list(self.kept)

    def begin(self, metadata: dict[str, str]) -> None:
        """Every per-input file carries the run's metadata."""
        self.metadata = dict(metadata)

    def add(
        self,
        name: str,
        features: torch.Tensor,
        grid: torch.Tensor,
        merge: torch.Tensor,
        source: str = "",
        *,
        timestamps: torch.Tensor | None = None,
        frame_types: torch.Tensor | None = None,
    ) -> None:
        file = self.files[name]
        tensors = _stored("", features, grid, merge, timestamps, frame_types)
        metadata = {**self.metadata, "name": name, "source": source}
        atomic_write(self.dir / file, lambda tmp: save_file(tensors, tmp, metadata=metadata), replace=self.overwrite)
        self.written[name] = file

    def commit(self, metadata: dict[str, str]) -> Path:
        done = {**self.kept, **self.written}
        record = _part_record(metadata, {n: f for n, f in self.files.items() if n in done})
        target = self.part or self.index
        # a resumed run rewrites the index: the files it names were checked against this run already
        atomic_write(target, write_text(json.dumps(record, indent=1) + "\n"), replace=self.overwrite or self.resumed)
        return target


# what makes two outputs of one input the same: the model (and its files), the dtype, the projection and
# the preprocessing and merge settings; the device and the backend only change rounding
SAME_OUTPUT = (
    "format",
    "model",
    "model_path",
    "model_files",
    "random_init",
    "dtype",
    "projected",
    "feature_dim",
    "settings",
)


def _stored(
    prefix: str,
    features: torch.Tensor,
    grid: torch.Tensor,
    merge: torch.Tensor,
    timestamps: torch.Tensor | None = None,
    frame_types: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    # safetensors stores dense row-major tensors only; a strided view (e.g. a merge-size-3 interpolation's
    # output) is copied here rather than failing after the whole run
    tensors = {"features": features, "grid": grid, "merge": merge}
    if timestamps is not None and frame_types is not None:
        tensors |= {"timestamps": timestamps, "frame_types": frame_types}
    return {f"{prefix}{key}": tensor.contiguous() for key, tensor in tensors.items()}


def source_stamp(inp: Input) -> str:
    """Size and modification time of the files an input is read from, hashed: a kept output must come
    from the same bytes."""
    return _stamp(inp.files)


def _stamp(files: Sequence[Path]) -> str:
    stamps = []
    for f in files:
        try:
            st = f.stat()
            stamps.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((str(f), -1, -1))
    return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]


def _holds(path: Path, inp: Input, metadata: dict[str, str]) -> bool:
    """Whether ``path`` is a complete output of ``inp`` made as ``metadata`` describes."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if sorted(f.keys()) != ["features", "grid", "merge"]:
                return False
            grid, merge = f.get_tensor("grid"), f.get_tensor("merge")
            shape = tuple(f.get_slice("features").get_shape())
    except Exception:  # noqa: BLE001 (an unreadable file, whatever safetensors says about it, is not complete)
        return False
    if meta.get("name") != inp.name or meta.get("source") != source_stamp(inp):
        return False
    if any(meta.get(k) != metadata.get(k) for k in SAME_OUTPUT):
        return False
    if grid.dim() != 2 or grid.shape[1] != 3 or merge.shape != grid.shape[:1] or (merge < 1).any():
        return False
    tokens = int((grid[:, 0] * (grid[:, 1] // merge) * (grid[:, 2] // merge)).sum())
    return shape == (tokens, int(metadata["feature_dim"]))


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
    meta["package_version"] = package_version()
    meta["model_files"] = _stamp(_checkpoint_files(info.model_path))
    meta["rank"], meta["world_size"] = str(rank), str(world_size)
    # the fingerprint stats every input file; only parts of a sharded run are ever matched against each other
    fingerprint = files_fingerprint(all_inputs, info) if world_size > 1 else ""
    meta["run"] = run_digest([i.name for i in all_inputs], world_size, meta, fingerprint)
    return meta


def files_fingerprint(inputs: Sequence[Input], info: RunInfo) -> str:
    """Size and modification time of every input file and checkpoint file: a part left by an earlier run
    over the same names joins a new run's index only if none of the files it was computed from changed."""
    return _stamp([f for i in inputs for f in i.files] + _checkpoint_files(info.model_path))


def _checkpoint_files(model_path: str) -> list[Path]:
    if not model_path:
        return []
    return sorted(p for p in Path(model_path).iterdir() if p.suffix in (".json", ".safetensors"))


def package_version() -> str:
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


_PART_KEYS = ("run", "rank", "world_size", "inputs", "failed", "metadata")


def _read_dir_part(path: Path) -> dict[str, Any]:
    try:
        part = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not a part of a run's index ({e})") from None
    missing = [k for k in _PART_KEYS if not isinstance(part, dict) or k not in part]
    if missing:
        raise ValueError(f"{path}: not a part of a run's index (no {', '.join(missing)})")
    return part


def _read_file_part(path: Path) -> dict[str, Any]:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        names = json.loads(metadata["inputs"])
        return _part_record(metadata, dict.fromkeys(names, path.name))
    except Exception as e:  # noqa: BLE001 (safetensors' own error type is not a public class everywhere)
        raise ValueError(f"{path}: not a part written by penguin-vl encode ({type(e).__name__}: {e})") from None


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
    atomic_write(path, write_text(json.dumps(index, indent=1) + "\n"))
    return path
