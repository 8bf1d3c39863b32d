"""Image and video preprocessor of Penguin-VL (SPEC section 5), bit-exact with the reference and fast.

The reference (``PenguinVLImageProcessor``) converts each image to RGB with PIL, resizes it with
Pillow's BICUBIC to a size that fits the token budget, rescales it through float64, normalises it
in float32 and cuts it into ``(C, p, p)`` patch rows in merge-block order (SPEC section 3). This
module gives the same float32 bits. PIL still does the mode conversion (cheap next to the resize);
the resize, rescale, normalisation and patch layout run as one fused pass of a C function compiled on
first use, or, where no C compiler is found, Pillow's own resize followed by one normalise-and-patch
step (:mod:`penguin_vl._resize`; :func:`resize_backend` says which runs), with no float64 pass and no
full-size float copy besides the output.

- :class:`ProcessorSettings` holds what determines the output (the upstream ``preprocessor_config.json``
  keys, checked); :meth:`ImageProcessor.from_pretrained` reads them from a checkpoint and
  :meth:`ImageProcessor.save_pretrained` writes them.

- :meth:`ImageProcessor.__call__` is the reference's ``preprocess`` call: a list is sized as one
  clip, from its first image **(sic)**, with the TRA budget split between key and intermediate frames.
- :meth:`ImageProcessor.batch` sizes every item on its own and packs them into one output.
- :func:`reference_preprocess` is the slow reference pipeline, step by step in numpy and PIL, for tests
  and benchmarks.

Inputs (checked in :mod:`penguin_vl.processor_inputs`): PIL images of any mode PIL converts to RGB,
paths to image files, and uint8 arrays (numpy or torch) laid out ``[H, W, 3]``, or ``[T, H, W, 3]`` for
a clip given as one item; and videos: a :class:`~penguin_vl.video.Video` from
:func:`~penguin_vl.video.load_video`, or a video file's path (read with the released sampling, fps 1 and
at most 180 frames), each frame its own grid row, key and intermediate frames sized by the TRA budget
split, as the reference's video path does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from penguin_vl._resize import Normalisation, ResizeBackend, backend, resize_to_patches
from penguin_vl.processor_inputs import ImageInput, ImageWarning, _array_item, _Item, _item, _video
from penguin_vl.processor_settings import (
    CHANNELS,
    CONFIG_NAME,
    RELEASED_MEAN,
    RELEASED_STD,
    ProcessorSettings,
    _check_bicubic,
    _check_fixed,
    _positive_int,
)
from penguin_vl.video import Video

__all__ = [
    "CONFIG_NAME",
    "VIDEO_MERGE_SIZE",
    "ImageProcessor",
    "ImageWarning",
    "ProcessorOutput",
    "ProcessorSettings",
    "ResizeBackend",
    "reference_preprocess",
    "resize_backend",
    "target_sizes",
]

VIDEO_MERGE_SIZE = 2  # the released processor's merge size for video frames (SPEC section 8)


@dataclass(frozen=True)
class ProcessorOutput:
    """Packed encoder inputs; also a mapping, so ``model(**out)`` and ``out["pixel_values"]`` work.

    ``pixel_values`` float32 ``[N, C * p * p]``, ``grid_sizes`` int64 ``[B, 3]`` (t, h, w in
    patches), ``merge_sizes`` int64 ``[B]``.
    """

    pixel_values: torch.Tensor
    grid_sizes: torch.Tensor
    merge_sizes: torch.Tensor

    def keys(self) -> tuple[str, ...]:
        return ("pixel_values", "grid_sizes", "merge_sizes")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)


def target_sizes(
    height: int,
    width: int,
    frame_types: Sequence[int],
    factor: int,
    min_tokens: int,
    max_tokens: int,
) -> list[tuple[int, int]]:
    """Pixel size ``(H, W)`` of every item of a list whose first image is ``height x width`` (SPEC 5.1).

    ``frame_types[i]`` is 0 for a key frame, 1 for an intermediate one; both sides are multiples of
    ``factor`` (patch size times merge size). Follows the reference's float arithmetic step by step.
    """
    min_pixels = min_tokens * factor * factor * 1.5
    max_pixels = max_tokens * factor * factor * 0.95
    ratio = height / width
    raw_area = height * width
    n_inter = sum(1 for f in frame_types if f == 1)
    n_key = len(frame_types) - n_inter
    key_area: float = raw_area
    inter_area: float = raw_area
    if len(frame_types) * raw_area > max_pixels:
        key_area = max_pixels / (n_key + n_inter / 16.0)
        inter_area = key_area / 16.0
        if not inter_area >= min_pixels:
            if n_key == 0:
                raise ValueError(
                    f"frame_types has no key frame and {n_inter} intermediate frames at the minimum of "
                    f"{min_tokens} tokens already exceed max_tokens={max_tokens}: the budget cannot be split"
                )
            inter_area = min_pixels
            key_area = (max_pixels - n_inter * min_pixels) / n_key
        if key_area < min_pixels:
            key_area = min_pixels

    def fit(area: float) -> tuple[int, int]:
        w = math.sqrt(area / ratio)
        h = w * ratio
        h_bar = max(round(h / factor) * factor, factor)
        w_bar = max(round(w / factor) * factor, factor)
        if h_bar * w_bar < min_pixels:
            w = math.sqrt(min_pixels / ratio)
            h = w * ratio
            h_bar = math.ceil(h / factor) * factor
            w_bar = math.ceil(w / factor) * factor
        return h_bar, w_bar

    key = fit(key_area)
    inter = fit(inter_area) if n_inter else key
    return [inter if f == 1 else key for f in frame_types]


def resize_backend() -> ResizeBackend:
    """Which resize the preprocessor runs (``.name``: ``"compiled"`` or ``"pillow"``) and why (``.reason``).

    The compiled one is built on the first call where a C compiler is found; ``PENGUIN_VL_NATIVE=0``
    switches it off. Both give the same bits."""
    return backend()


def torch_worker_pool(workers: int, name: str = "") -> ThreadPoolExecutor:
    """A thread pool whose threads run torch ops on one thread each.

    The pool is the parallelism: nested OpenMP teams, one per pool thread, would oversubscribe the
    cores (~20% slower preprocessing on 2 cores). ``torch.set_num_threads`` changes the calling
    thread's team and also the default of threads started later; call
    :func:`restore_default_torch_threads` from the owner once the pool is done.
    """
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))


def restore_default_torch_threads() -> None:
    """Make threads started from now on use the calling thread's torch thread count again."""
    torch.set_num_threads(torch.get_num_threads())


def _frames(pixels: np.ndarray) -> Iterator[np.ndarray]:
    if pixels.ndim == 3:
        yield pixels
    else:
        yield from pixels


class ImageProcessor:
    """Penguin-VL's image and video preprocessor (SPEC section 5), bit-exact with the reference.

    The keyword settings are those of :class:`ProcessorSettings` (upstream names, released defaults),
    plus the upstream ``resample``, ``do_resize`` and ``do_convert_rgb``, which must stay BICUBIC and on;
    :attr:`settings` holds them. ``num_threads`` > 1 processes items (and frames) on a thread pool of
    that size, each pool thread running torch ops on one thread; the caller's torch thread settings
    are left as they were.
    """

    # read through the settings, which are the one place they are kept and checked
    patch_size = property(attrgetter("settings.patch_size"))
    min_tokens = property(attrgetter("settings.min_tokens"))
    max_tokens = property(attrgetter("settings.max_tokens"))
    image_mean = property(attrgetter("settings.image_mean"))
    image_std = property(attrgetter("settings.image_std"))
    rescale_factor = property(attrgetter("settings.rescale_factor"))
    do_rescale = property(attrgetter("settings.do_rescale"))
    do_normalize = property(attrgetter("settings.do_normalize"))

    def __init__(
        self,
        *,
        patch_size: int = 14,
        min_tokens: int = 16,
        max_tokens: int = 16384,
        image_mean: float | Sequence[float] = RELEASED_MEAN,
        image_std: float | Sequence[float] = RELEASED_STD,
        rescale_factor: float = 1 / 255,
        resample: int | str = "bicubic",
        do_resize: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
        num_threads: int = 1,
    ):
        _check_bicubic(resample)
        _check_fixed("do_resize", do_resize)
        _check_fixed("do_convert_rgb", do_convert_rgb)
        self.settings = ProcessorSettings(
            patch_size, min_tokens, max_tokens, image_mean, image_std, rescale_factor, do_rescale, do_normalize
        )
        self.num_threads = _positive_int(num_threads, "num_threads")
        self._norm = Normalisation(
            self.rescale_factor if do_rescale else 1.0,
            self.image_mean if do_normalize else (0.0,) * CHANNELS,
            self.image_std if do_normalize else (1.0,) * CHANNELS,
        )

    @classmethod
    def from_settings(cls, settings: ProcessorSettings, *, num_threads: int = 1) -> ImageProcessor:
        """A processor with these settings."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}, num_threads=num_threads)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        num_threads: int = 1,
    ) -> ImageProcessor:
        """Read ``preprocessor_config.json`` (upstream keys) from a checkpoint directory, that file itself, or a
        hub id in the local Hugging Face cache (nothing is downloaded); see :meth:`ProcessorSettings.from_config`.

        ``min_tokens`` / ``max_tokens``, where given, replace the file's token budget.
        """
        settings = ProcessorSettings.from_pretrained(path).with_budget(min_tokens, max_tokens)
        return cls.from_settings(settings, num_threads=num_threads)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the settings as ``preprocessor_config.json`` (upstream keys) into ``directory``; returns its path."""
        file = Path(directory) / CONFIG_NAME
        file.write_text(json.dumps(self.settings.to_config(), indent=2) + "\n")
        return file

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.settings, f.name)}" for f in dataclasses.fields(self.settings))
        return f"ImageProcessor({fields}, num_threads={self.num_threads})"

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        merge_size: int | None = None,
        frame_types: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        *,
        pin_memory: bool = False,
    ) -> ProcessorOutput:
        """The reference's ``preprocess(images, merge_size=..., frame_types=...)``.

        ``images`` is one image, one clip (a ``[T, H, W, 3]`` array, ``t = T``), or a list of them
        treated as the frames of one video: every item is sized from the first one's size **(sic)**
        and becomes its own grid row. ``frame_types`` (0 key, 1 intermediate, one per item) applies
        the TRA budget split. ``pin_memory`` returns ``pixel_values`` in page-locked memory.

        ``images`` may also be one video (a :class:`~penguin_vl.video.Video` or a video file's path):
        its frames as that list with its frame types, which is the reference's video path.
        ``merge_size`` defaults to 1 for images and :data:`VIDEO_MERGE_SIZE` for a video.

        One departure: the upstream code guesses the channel axis from the array shape and takes an
        image 1 or 3 pixels high for a channels-first one. Such arrays are refused here (their result
        would be the upstream's accident); PIL images and files of that height are processed as SPEC
        section 5 describes.
        """
        video = None if isinstance(images, (list, tuple)) else _video(images)
        if video is not None:
            if frame_types is not None:
                raise ValueError("frame_types come with the video; to give others, pass list(video.frames)")
            images, frame_types = list(video.frames), video.frame_types
        default = 1 if video is None else VIDEO_MERGE_SIZE
        merge = _positive_int(default if merge_size is None else merge_size, "merge_size")
        values = list(images) if isinstance(images, (list, tuple)) else [images]
        if not values:
            raise ValueError("images is empty")
        items = [_item(v, f"images[{i}]", allow_clip=True, parity=True) for i, v in enumerate(values)]
        types = self._frame_types(frame_types, len(items))
        first = items[0]
        factor = self.patch_size * merge
        sizes = target_sizes(first.height, first.width, types, factor, self.min_tokens, self.max_tokens)
        return self._pack(items, sizes, [merge] * len(items), pin_memory)

    def batch(
        self,
        items: Sequence[ImageInput],
        merge_size: int = 1,
        *,
        video_merge_size: int = VIDEO_MERGE_SIZE,
        pin_memory: bool = False,
    ) -> ProcessorOutput:
        """Preprocess unrelated images, clips and videos in one packed output, each sized on its own.

        Items are PIL images, paths, or uint8 ``[H, W, 3]`` (``[T, H, W, 3]`` for a clip) numpy arrays
        or torch tensors, each one grid row at ``merge_size``; and videos (a :class:`~penguin_vl.video.Video`
        or a video file's path), each as the reference's video path makes it: one grid row per frame,
        sized from its first frame with the TRA budget split of its frame types, at ``video_merge_size``.
        """
        merge = _positive_int(merge_size, "merge_size")
        video_merge = _positive_int(video_merge_size, "video_merge_size")
        if isinstance(items, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor, Video)) or not items:
            raise ValueError("items must be a non-empty sequence of images or videos")
        loaded: list[_Item] = []
        sizes: list[tuple[int, int]] = []
        merges: list[int] = []
        for i, value in enumerate(items):
            video = _video(value)
            if video is None:
                item = _item(value, f"items[{i}]", allow_clip=True, parity=False)
                factor = self.patch_size * merge
                sizes.append(target_sizes(item.height, item.width, [0], factor, self.min_tokens, self.max_tokens)[0])
                loaded.append(item)
                merges.append(merge)
                continue
            frames = [_array_item(f, f"items[{i}] frame {t}", False, False) for t, f in enumerate(video.frames)]
            types = self._frame_types(video.frame_types, len(frames))
            factor = self.patch_size * video_merge
            sizes += target_sizes(frames[0].height, frames[0].width, types, factor, self.min_tokens, self.max_tokens)
            loaded += frames
            merges += [video_merge] * len(frames)
        return self._pack(loaded, sizes, merges, pin_memory)

    @staticmethod
    def _frame_types(frame_types: Any, count: int) -> list[int]:
        if frame_types is None:
            return [0] * count
        values = frame_types.tolist() if hasattr(frame_types, "tolist") else list(frame_types)
        if len(values) != count or any(isinstance(v, bool) or v not in (0, 1) for v in values):
            raise ValueError(f"frame_types must hold one 0 (key) or 1 (intermediate) per item ({count}), got {values}")
        return values

    def _pack(
        self, items: list[_Item], sizes: list[tuple[int, int]], merges: list[int], pin_memory: bool
    ) -> ProcessorOutput:
        p = self.patch_size
        grids = [(it.frames, h // p, w // p) for it, (h, w) in zip(items, sizes, strict=True)]
        rows = [t * gh * gw for t, gh, gw in grids]
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (page-locked memory is for host-to-device copies)")
        shape = (sum(rows), CHANNELS * p * p)
        if pin_memory:
            pixel_values = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        else:
            # numpy asks the kernel for transparent huge pages on large buffers, torch's CPU allocator does not.
            # Outputs over glibc's 32 MB mmap ceiling (a 3 MP image, any large batch) are fresh pages on every
            # call, and with 4 KiB pages their first-touch faults cost ~25 ms per 36 MB on the development VM.
            pixel_values = torch.from_numpy(np.empty(shape, dtype=np.float32))
        starts = np.cumsum([0, *rows]).tolist()
        jobs = [(it, size, starts[i], m) for i, (it, size, m) in enumerate(zip(items, sizes, merges, strict=True))]

        def write(job: tuple[_Item, tuple[int, int], int, int]) -> None:
            self._write(*job, pixel_values)

        if self.num_threads > 1 and len(jobs) > 1:
            try:
                with torch_worker_pool(min(self.num_threads, len(jobs)), "penguin-preprocess") as pool:
                    list(pool.map(write, jobs))
            finally:
                restore_default_torch_threads()
        else:
            for job in jobs:
                write(job)
        return ProcessorOutput(
            pixel_values,
            torch.tensor(grids, dtype=torch.int64).view(-1, 3),
            torch.tensor(merges, dtype=torch.int64),
        )

    def _write(self, item: _Item, size: tuple[int, int], start: int, merge: int, out: torch.Tensor) -> None:
        height, width = size
        per_frame = (height // self.patch_size) * (width // self.patch_size)
        for f, frame in enumerate(_frames(item.read())):
            rows = out[start + f * per_frame : start + (f + 1) * per_frame]
            resize_to_patches(frame, height, width, self.patch_size, merge, self._norm, rows)


def reference_preprocess(
    images: ImageInput | Sequence[ImageInput],
    merge_size: int = 1,
    frame_types: Sequence[int] | None = None,
    *,
    patch_size: int = 14,
    min_tokens: int = 16,
    max_tokens: int = 16384,
    image_mean: Sequence[float] = RELEASED_MEAN,
    image_std: Sequence[float] = RELEASED_STD,
    rescale_factor: float = 1 / 255,
) -> ProcessorOutput:
    """The slow reference pipeline, the upstream steps one by one: for tests and benchmarks only.

    PIL ``convert("RGB")``, a numpy array, back to PIL and ``resize((W, H), BICUBIC)`` (as
    ``transformers``' resize does), ``float32(float64(x) * rescale_factor)``, ``(x - mean) / std``
    in float32, channels first, stacked per item and cut into patch rows by an 8-D transpose.
    """
    values = list(images) if isinstance(images, (list, tuple)) else [images]
    types = [0] * len(values) if frame_types is None else list(frame_types)
    first = values[0]
    height, width = (first.height, first.width) if isinstance(first, Image.Image) else np.asarray(first).shape[-3:-1]
    factor = patch_size * merge_size
    sizes = target_sizes(height, width, types, factor, min_tokens, max_tokens)
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    pixel_values, grids = [], []
    for value, (th, tw) in zip(values, sizes, strict=True):
        frames = [value] if isinstance(value, Image.Image) or np.asarray(value).ndim == 3 else list(value)
        processed = []
        for frame in frames:
            if isinstance(frame, Image.Image):
                frame = np.array(frame if frame.mode == "RGB" else frame.convert("RGB"))
            frame = np.asarray(frame)
            resized = np.array(Image.fromarray(frame).resize((tw, th), Image.Resampling.BICUBIC))
            x = (resized.astype(np.float64) * rescale_factor).astype(np.float32)
            x = (x - mean) / std
            processed.append(x.transpose(2, 0, 1))
        patches = np.array(processed)
        t, c = patches.shape[:2]
        gh, gw, m, p = th // patch_size, tw // patch_size, merge_size, patch_size
        patches = patches.reshape(t, c, gh // m, m, p, gw // m, m, p).transpose(0, 2, 5, 3, 6, 1, 4, 7)
        pixel_values.append(patches.reshape(t * gh * gw, c * p * p))
        grids.append((t, gh, gw))
    return ProcessorOutput(
        torch.from_numpy(np.concatenate(pixel_values)),
        torch.tensor(grids, dtype=torch.int64),
        torch.full((len(values),), merge_size, dtype=torch.int64),
    )
