"""The encoding loop of one process on one device::

    inputs -> thread pool: read + preprocess each input
           -> packer thread: pack, in input order, into varlen batches of at most ``batch_tokens``
              patches (an input larger than that is a batch of its own)
           -> main thread: encoder forward -> split per input -> sink

The pool runs a bounded window of inputs ahead and the packer keeps two packed batches ready, so the
device does not wait for image decoding or resizing. On CUDA the host copy of batch k's features is
queued behind its forward and collected only after batch k+1 has been launched, so the device also
does not wait for the split and the write. On a CPU, where one batch can take minutes and packing saves
no launches, a batch runs one input at a time and a clip one frame at a time (the encoder attends and
merges within a frame, so the features are the same up to summation order): each input is written as
soon as it is done and the progress moves with every frame.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from penguin_vl.encode.inputs import RELEASED_SAMPLING, Input, VideoOptions, read
from penguin_vl.encode.progress import Progress
from penguin_vl.encode.sinks import Sink, source_stamp
from penguin_vl.model import PenguinEncoder
from penguin_vl.processor import ImageProcessor, restore_default_torch_threads, torch_worker_pool
from penguin_vl.video import Video

__all__ = ["Prepared", "Summary", "encode", "prepare"]


@dataclass
class Prepared:
    """One preprocessed input: its rows of the packed batch and its grid; for a video, its frames'
    timestamps (seconds, float64) and types (0 key, 1 intermediate, int32)."""

    name: str
    pixel_values: torch.Tensor  # [n, C*p*p] float32
    grid_sizes: torch.Tensor  # [rows, 3] int64
    merge_sizes: torch.Tensor  # [rows] int64
    seconds: float
    source: str = ""  # source_stamp of the files read
    timestamps: torch.Tensor | None = None  # a video's: [frames] float64 seconds
    frame_types: torch.Tensor | None = None  # a video's: [frames] int32, 0 key, 1 intermediate

    @property
    def frames(self) -> list[tuple[int, int, int]]:
        """``(h, w, m)`` of every frame, in row order."""
        rows = zip(self.grid_sizes.tolist(), self.merge_sizes.tolist(), strict=True)
        return [(h, w, m) for (t, h, w), m in rows for _ in range(t)]

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


def prepare(
    inp: Input,
    processor: ImageProcessor,
    merge_size: int,
    clip_merge_size: int,
    video: VideoOptions = RELEASED_SAMPLING,
) -> Prepared:
    """Read and preprocess one input. An image is a list of one, so it is sized on its own; a clip is the
    list of its frames, sized together from the first with the token budget shared (the reference's video
    path), one grid row per frame; a video file is decoded and sampled here (in the pool), then is a clip
    whose frame types split the budget between key and intermediate frames."""
    start = time.perf_counter()
    source = source_stamp(inp)  # before reading: a file changed meanwhile is never taken for the one read
    pixels = read(inp, video)
    timestamps = types = None
    if isinstance(pixels, Video):
        out = processor(list(pixels.frames), merge_size=clip_merge_size, frame_types=pixels.frame_types)
        timestamps, types = torch.from_numpy(pixels.timestamps), torch.from_numpy(pixels.frame_types)
    else:
        out = processor(pixels, merge_size=clip_merge_size if inp.is_clip else merge_size)
    seconds = time.perf_counter() - start
    return Prepared(inp.name, out.pixel_values, out.grid_sizes, out.merge_sizes, seconds, source, timestamps, types)


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


@dataclass
class Summary:
    """What a run did. Times in seconds; ``preprocess`` is summed over the pool's workers and overlaps the
    encoder, ``input_wait`` is the time the encoder loop waited for a packed batch."""

    items: int = 0
    frames: int = 0
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


def encode(
    model: PenguinEncoder,
    processor: ImageProcessor,
    inputs: Sequence[Input],
    sink: Sink,
    *,
    metadata: dict[str, str],
    batch_tokens: int = 16384,
    merge_size: int = 1,
    clip_merge_size: int = 2,
    video: VideoOptions = RELEASED_SAMPLING,
    project: bool = False,
    workers: int = 4,
    progress: Progress | None = None,
) -> Summary:
    """Encode ``inputs`` into ``sink``; failed inputs are recorded in the summary (and the metadata) and skipped.

    ``metadata`` (see :func:`run_metadata`) is written into every output file, with ``inputs`` (the names
    encoded, in order) and ``failed`` (name -> reason) added as JSON. If this raises, neither the single file
    nor an index is written; a :class:`DirSink` keeps the per-input files it completed. Without a single
    input encoded, a run of one rank writes nothing. ``video``: how video files are sampled; their frames'
    timestamps and types go to the sink beside the features.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    summary = Summary()
    start = time.perf_counter()
    device = model.device
    on_cuda = device.type == "cuda"
    sink.begin(metadata)
    stop = threading.Event()
    ready: queue.Queue = queue.Queue(maxsize=2)

    def fn(inp: Input) -> Prepared:
        return prepare(inp, processor, merge_size, clip_merge_size, video)

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

    def write(p: Prepared, feats: torch.Tensor) -> None:
        t0 = time.perf_counter()
        extra = {} if p.timestamps is None else {"timestamps": p.timestamps, "frame_types": p.frame_types}
        sink.add(p.name, feats.clone(), p.grid_sizes, p.merge_sizes, source=p.source, **extra)
        summary.encoded.append(p.name)
        summary.out_tokens += feats.shape[0]
        summary.write += time.perf_counter() - t0

    def account(batch: _Batch) -> None:
        summary.items += len(batch.items)
        summary.frames += sum(len(p.frames) for p in batch.items)
        summary.tokens += batch.tokens
        summary.batches += 1
        summary.preprocess += sum(p.seconds for p in batch.items)

    def finish(batch: _Batch, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        t0 = time.perf_counter()
        if event is not None:
            event.synchronize()
        summary.encode += time.perf_counter() - t0
        for p, feats in zip(batch.items, host.split([p.out_tokens for p in batch.items]), strict=True):
            write(p, feats)
        account(batch)
        if progress is not None:
            progress.update(len(batch.items), batch.tokens, frames=sum(len(p.frames) for p in batch.items))

    def run_by_frame(batch: _Batch) -> None:
        row = 0
        for p in batch.items:
            frames = p.frames
            parts = []
            for k, (h, w, m) in enumerate(frames):
                t0 = time.perf_counter()
                grid = torch.tensor([[1, h, w]], dtype=p.grid_sizes.dtype)
                merge = torch.tensor([m], dtype=p.merge_sizes.dtype)
                with torch.inference_mode():
                    parts.append(model(batch.pixel_values[row : row + h * w], grid, merge, project=project))
                summary.encode += time.perf_counter() - t0
                row += h * w
                if progress is not None:  # k + 1 of the input's frames done, as an exact fraction of it
                    progress.update((k + 1) / len(frames) - k / len(frames), h * w, frames=1)
            write(p, torch.cat(parts) if len(parts) > 1 else parts[0])
        account(batch)

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
            if not on_cuda:
                run_by_frame(item)
                continue
            t0 = time.perf_counter()
            pixel_values = item.pixel_values.to(device, non_blocking=True)
            with torch.inference_mode():
                feats = model(pixel_values, item.grid_sizes, item.merge_sizes, project=project)
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
        if summary.encoded or sink.kept or sink.sharded:
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
