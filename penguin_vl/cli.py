"""The ``penguin-vl`` command: ``encode`` (feature extraction), ``init-checkpoint``, ``merge-index``.

Exit status: 0 when everything was encoded; 1 when the run finished but some inputs could not be read
(they are listed on stderr and in the output's ``failed`` metadata; the rest is written), or on an
unexpected error (a bug: the only case with a traceback); 2 when the arguments, the inputs, the model or
the output are at fault, with a message naming the culprit (nothing was done, or, for an output that
cannot be written, what was written stays whole); 130 on Ctrl-C. Under torchrun a rank exits 0 when it
skipped inputs, so that torchrun does not stop the other ranks; the index lists every failed input and
``penguin-vl merge-index`` exits 1 when there are any.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from penguin_vl import encode as enc
from penguin_vl.model import PenguinEncoder
from penguin_vl.processor import ImageProcessor, ImageWarning, resize_backend

__all__ = ["main", "build_parser"]

PROG = "penguin-vl"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Arguments, inputs, model or output that make the command impossible to run; nothing was done."""


@contextlib.contextmanager
def _refusing() -> Iterator[None]:
    """Errors of the setup (arguments, inputs, checkpoint, existing output) become a :class:`UsageError`;
    errors while encoding keep their traceback."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise UsageError(str(e)) from e


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Penguin-VL vision encoder: feature extraction.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {enc.package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "encode",
        help="encode images, videos and clips into a safetensors file",
        description=(
            "Encode images, videos and clips with the Penguin-VL vision encoder. INPUT: image files, video "
            "files (.mp4, .mkv, .webm, .mov, .avi, ...: whatever the bundled FFmpeg decodes), .npy clips "
            "(uint8 [T, H, W, C]), directories (searched recursively for all three) or quoted glob patterns "
            "('**' recurses). A directory of frames is one clip with --clip. Videos are sampled as the "
            "reference samples them (--fps, --max-frames, --start/--end) and typed into key and intermediate "
            "frames; their frames' timestamps and types are stored beside the features. Features are keyed "
            "by input name: the path as given, normalised."
        ),
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image file, video file, .npy clip, directory or glob")
    p.add_argument(
        "--clip", action="append", default=[], metavar="DIR", help="a directory of frames encoded as one clip"
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="checkpoint directory (standalone encoder or full Penguin-VL), a hub id in the local Hugging Face "
        "cache (org/name[@revision]), or 'random' (released dimensions, seeded random weights)",
    )
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, metavar="FILE", help="one .safetensors file with every input")
    out.add_argument("--out-dir", type=Path, metavar="DIR", help="one .safetensors file per input, and index.json")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --out-dir: keep the files already complete from the same inputs, model and settings, encode "
        "the rest and rewrite index.json",
    )
    p.add_argument("--project", action="store_true", help="run the projector too (full Penguin-VL checkpoints)")
    p.add_argument(
        "--dtype",
        choices=["auto", *_DTYPES],
        default="auto",
        help="compute and output dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda:LOCAL_RANK when CUDA is there)"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="triton: Triton kernels (CUDA); torch: plain PyTorch; auto: triton on CUDA",
    )
    p.add_argument("--merge-size", type=_positive, default=1, help="merge size for images (default 1)")
    p.add_argument(
        "--clip-merge-size", type=_positive, default=2, help="merge size for clip and video frames (default 2)"
    )
    p.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second (default 1)")
    p.add_argument(
        "--max-frames", type=_positive, default=180, help="most frames per video, evenly thinned (default 180)"
    )
    p.add_argument("--start", type=float, metavar="SECONDS", help="video start time (default: the beginning)")
    p.add_argument("--end", type=float, metavar="SECONDS", help="video end time (default: the end)")
    p.add_argument(
        "--min-tokens",
        type=_positive,
        help="fewest tokens per image or frame, counted after merging (patches / merge size^2; default: the "
        "checkpoint's preprocessor_config.json, else 16)",
    )
    p.add_argument(
        "--max-tokens",
        type=_positive,
        help="most tokens per image or clip, counted after merging (patches / merge size^2, so about the number of "
        "features; default: the checkpoint's preprocessor_config.json, else 16384)",
    )
    p.add_argument(
        "--batch-tokens",
        type=_positive,
        default=16384,
        help="patches per packed encoder batch (default 16384; a larger input runs alone)",
    )
    p.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1), help="preprocessing threads")
    p.add_argument("--seed", type=int, default=0, help="seed of --model random (default 0)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal, on rank 0)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no summary; errors and skipped inputs only")
    p.set_defaults(run=_encode)

    p = sub.add_parser(
        "init-checkpoint",
        help="write a random-weight checkpoint in the released layout",
        description=(
            "Write a checkpoint with random weights in the released layout and dimensions (marked "
            '"penguin_random_init": true in its config), for tests and benchmarks without real weights.'
        ),
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--full", action="store_true", help="a Penguin-VL-style checkpoint: prefixed encoder + projector")
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (2 layers, hidden 64) for tests")
    p.add_argument("--dtype", choices=list(_DTYPES), default="bfloat16", help="stored dtype (default bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DIR")
    p.set_defaults(run=_init_checkpoint)

    p = sub.add_parser(
        "merge-index",
        help="write the index of a sharded (torchrun) run from its per-rank parts",
        description="Rebuild OUT's index from the per-rank parts (OUT: the --out file or the --out-dir).",
    )
    p.add_argument("out", type=Path, metavar="OUT")
    p.add_argument("--world-size", type=_positive, default=None, help="needed only if parts of several runs exist")
    p.set_defaults(run=_merge_index)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _warnings_as_lines():
            return args.run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; no --out file was written and an existing one is unchanged. In --out-dir, "
            "every file is complete (this run's or the previous one's) and index.json still describes the "
            "previous finished run; run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Warnings about inputs (16-bit images) on their own ``penguin-vl: warning:`` line, whatever filters the
    caller set: they describe the data, not the code."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ImageWarning)
        warnings.showwarning = show
        yield


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def _distributed() -> tuple[int, int, int]:
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world_size} do not describe a rank of the run")
    return rank, world_size, local_rank


def _device(arg: str, local_rank: int) -> torch.device:
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise UsageError(f"--device {arg!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {arg}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def _encode(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with _refusing():
        setup = _setup_encode(args)
    try:
        summary = enc.encode(setup.model, setup.processor, setup.inputs, setup.sink, **setup.options)
    except (enc.OutputError, FileExistsError) as e:
        kept = " (the files already in --out-dir are complete: rerun with --resume)" if args.out_dir else ""
        raise UsageError(f"{e}{kept}") from e
    index = None
    if setup.world_size > 1:
        out, directory = (args.out, False) if args.out is not None else (args.out_dir, True)
        index = enc.merge_index(out, directory=directory, world_size=setup.world_size, require=False)
    summary.total = time.perf_counter() - start
    for name, reason in summary.failed.items():
        print(f"{PROG}: {setup.tag}skipped {name}: {reason}", file=sys.stderr)
    if not args.quiet:
        _print_summary(summary, setup, args, index)
    if not summary.encoded and not setup.kept and setup.world_size == 1:
        print(f"{PROG}: error: no input could be encoded; nothing was written", file=sys.stderr)
        return 1
    return 1 if summary.failed and setup.world_size == 1 else 0


@dataclass
class _EncodeSetup:
    model: PenguinEncoder
    processor: ImageProcessor
    inputs: list[enc.Input]
    sink: enc.FileSink | enc.DirSink
    options: dict[str, Any]
    info: enc.RunInfo
    load_time: float
    world_size: int
    tag: str
    kept: int


def _setup_encode(args: argparse.Namespace) -> _EncodeSetup:
    if not args.inputs and not args.clip:
        raise UsageError("nothing to encode: give image or video files, directories, globs, .npy clips or --clip DIR")
    try:
        video = enc.VideoOptions(args.fps, args.max_frames, args.start, args.end)
    except ValueError as e:
        raise UsageError(f"video sampling: {e} (--fps, --max-frames, --start, --end)") from None
    if args.min_tokens is not None and args.max_tokens is not None and args.min_tokens > args.max_tokens:
        raise UsageError(f"--min-tokens {args.min_tokens} is larger than --max-tokens {args.max_tokens}")
    rank, world_size, local_rank = _distributed()
    tag = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    all_inputs = enc.collect_inputs(args.inputs, args.clip)
    inputs = enc.shard(all_inputs, rank, world_size)
    all_names = [i.name for i in all_inputs]
    if args.out is not None:
        if args.out.suffix != ".safetensors":
            raise UsageError(f"--out {args.out}: the file name must end in .safetensors (or use --out-dir)")
        if args.out.is_dir():
            raise UsageError(f"--out {args.out} is a directory (for a file per input, use --out-dir)")
        sink: enc.FileSink | enc.DirSink = enc.FileSink(args.out, rank, world_size, overwrite=args.overwrite)
    else:
        if args.out_dir.exists() and not args.out_dir.is_dir():
            raise UsageError(f"--out-dir {args.out_dir} exists and is not a directory")
        names = [i.name for i in inputs]
        sink = enc.DirSink(args.out_dir, all_names, names, rank, world_size, overwrite=args.overwrite)
    if args.resume and args.out is not None:
        raise UsageError("--resume needs --out-dir: a single --out file is written whole at the end")
    conflicts = [] if args.resume else sink.conflicts()
    if conflicts and not args.overwrite:
        shown = ", ".join(str(p) for p in conflicts[:3]) + (" ..." if len(conflicts) > 3 else "")
        raise FileExistsError(f"output exists: {shown}; pass --overwrite to replace it")

    device = _device(args.device, local_rank)
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    model, model_path, random_init = enc.load_model(
        args.model, dtype=dtype, device=device, backend=args.backend, project=args.project, seed=args.seed
    )
    load_time = time.perf_counter() - t0
    processor = enc.make_processor(
        model_path or None,
        model.config.patch_size,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        num_threads=1,  # the pool of --workers runs one input per thread
    )
    settings = {
        "merge_size": args.merge_size,
        "clip_merge_size": args.clip_merge_size,
        "video_sampling": dataclasses.asdict(video),
        "batch_tokens": args.batch_tokens,
        **processor.settings.metadata(),
    }
    if args.model == enc.RANDOM:
        settings["seed"] = args.seed
    info = enc.RunInfo(
        model=args.model,
        model_path=model_path,
        random_init=random_init,
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(device),
        backend=model.backend,
        projected=args.project,
        feature_dim=model.projector.config.out_dim if args.project else model.config.hidden_size,
        settings=settings,
    )
    metadata = enc.run_metadata(info, all_inputs, rank, world_size)
    kept = sink.resume(metadata, inputs) if args.resume else []
    if kept:
        inputs = [i for i in inputs if i.name not in sink.kept]
    show = args.progress if args.progress is not None else (sys.stderr.isatty() and rank == 0)
    options = {
        "metadata": metadata,
        "batch_tokens": args.batch_tokens,
        "merge_size": args.merge_size,
        "clip_merge_size": args.clip_merge_size,
        "video": video,
        "project": args.project,
        "workers": args.workers,
        "progress": enc.Progress(
            len(inputs) + len(kept), sys.stderr if show and not args.quiet else None, tag, len(kept)
        ),
    }
    return _EncodeSetup(model, processor, inputs, sink, options, info, load_time, world_size, tag, len(kept))


def _size(path: Path) -> str:
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def _print_summary(s: enc.Summary, setup: _EncodeSetup, args: argparse.Namespace, index: Path | None) -> None:
    info, sink, tag = setup.info, setup.sink, setup.tag
    model = info.model
    if info.model == enc.RANDOM:
        model = f"random (released dimensions, random weights, seed {args.seed})"
    elif info.random_init:
        model = f"{info.model_path} (random weights)"
    elif info.model_path != info.model:
        model = f"{info.model} ({info.model_path})"
    enc_rate = f"{s.items / s.encode:.2f} items/s, {s.tokens / s.encode:,.0f} tokens/s" if s.encode > 0 else "-"
    output = sink.path if isinstance(sink, enc.FileSink) else sink.dir
    frames = f" ({s.frames:,} frames)" if s.frames > s.items else ""
    lines = [
        f"{tag}encoded {s.items} of {s.items + len(s.failed)} inputs{frames} in {s.total:.1f} s: "
        f"{s.tokens:,} patches -> {s.out_tokens:,} features of dim {info.feature_dim}"
        + (" (projected)" if info.projected else ""),
        f"  model   {model}",
        f"  run     {info.dtype} on {info.device}, backend {info.backend}, {s.batches} "
        f"batch{'es' if s.batches != 1 else ''} of <= {args.batch_tokens:,} patches, "
        f"{args.workers} preprocessing threads ({resize_backend().name} resize)",
        f"  stages  load {setup.load_time:.2f} s | preprocess {s.preprocess:.2f} s (in threads; encoder waited "
        f"{s.input_wait:.2f} s) | encode {s.encode:.2f} s | write {s.write:.2f} s",
        f"  speed   {enc_rate} (encode stage)",
    ]
    if setup.kept:
        lines.insert(1, f"  kept    {setup.kept} complete outputs of an earlier run with the same inputs and settings")
    if s.encoded or setup.kept or index is not None:
        lines.append(f"  output  {output} ({_size(output)})" if output.exists() else f"  output  {output}")
    if index is not None:
        lines.append(f"  index   {index} (all {setup.world_size} ranks done)")
    print("\n".join(f"{PROG}: {line}" if i == 0 else line for i, line in enumerate(lines)), file=sys.stderr)


def _init_checkpoint(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    with _refusing():
        path = enc.init_checkpoint(
            args.dir,
            full=args.full,
            tiny=args.tiny,
            dtype=_DTYPES[args.dtype],
            seed=args.seed,
            overwrite=args.overwrite,
        )
    kind = "Penguin-VL-style (encoder + projector)" if args.full else "standalone encoder"
    dims = "tiny" if args.tiny else "released"
    print(
        f"{PROG}: wrote a random-weight {kind} checkpoint, {dims} dimensions, {args.dtype}, seed {args.seed}, "
        f"to {path} in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


def _merge_index(args: argparse.Namespace) -> int:
    with _refusing():
        path = enc.merge_index(args.out, directory=args.out.is_dir(), world_size=args.world_size)
        index = json.loads(path.read_text())
    failed = index["failed"]
    print(
        f"{PROG}: wrote {path}: {len(index['inputs'])} inputs from {index['world_size']} ranks, {len(failed)} failed",
        file=sys.stderr,
    )
    for name, reason in failed.items():
        print(f"{PROG}: failed {name}: {reason}", file=sys.stderr)
    return 1 if failed else 0
