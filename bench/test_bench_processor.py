"""CPU throughput of the preprocessor against the slow reference pipeline on 1-4 MP photos.

The baseline is :func:`penguin_vl.processor.reference_preprocess`, the reference's steps one by
one (PIL resize, float64 rescale, normalise, 8-D transpose). Both produce the same bits, checked
before timing. Throughput is input megapixels per second; ``speedup_vs_reference`` is the baseline's
median time over ours. The one-thread cases also time the Pillow path, the fallback where no C
compiler is found (Pillow's resize plus one normalise-and-patch step, ``speedup_vs_pillow_path``), and
``extra_info["resize"]`` says which path "ours" is. Runs on any machine (no GPU); the device entry
names the CPU's thread count.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from bench.harness import cpu_bench
from penguin_vl.processor import ImageProcessor, reference_preprocess, resize_backend

# (height, width): landscape sizes take the horizontal pass first, portrait ones the vertical
# (Pillow 13's order); 2304 x 1728 is over the merge-1 budget and is scaled down by ~1.14.
PHOTOS = {
    "1mp_1024x1024": (1024, 1024),
    "2mp_1080x1920": (1080, 1920),
    "2mp_1600x1200": (1600, 1200),
    "3mp_1536x2048": (1536, 2048),
    "4mp_1728x2304": (1728, 2304),
}


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """A deterministic photo-like RGB image: smooth gradients, a few soft blobs, sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xx * (255 / width), yy * (255 / height), (xx + yy) * (127 / (height + width))], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.05, 0.3) * min(height, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        image += blob[..., None] * rng.uniform(-120, 120, 3).astype(np.float32)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _on_the_pillow_path(fn):
    """``fn`` run with the compiled resize switched off."""

    def run(*args):
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PENGUIN_VL_NATIVE", "0")
            return fn(*args)

    return run


def _record_throughput(benchmark, result, megapixels: float) -> None:
    if result is None:
        return
    info = benchmark.extra_info
    info["megapixels"] = megapixels
    info["mpix_per_s"] = megapixels / result.seconds
    info["baseline_reference_mpix_per_s"] = megapixels / (info["baseline_reference_ms"] / 1e3)
    info["threads"] = torch.get_num_threads()
    info["resize"] = resize_backend().reason


@pytest.mark.parametrize("merge", [1, 2], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("name", list(PHOTOS), ids=str)
def test_processor_one_thread(benchmark, one_thread, name, merge):
    """One photo on one thread: the fused resize-normalise-patchify against the reference pipeline."""
    image = photo(*PHOTOS[name])
    proc = ImageProcessor()
    out = proc(image, merge_size=merge)
    ref = reference_preprocess(image, merge_size=merge)
    assert torch.equal(out.pixel_values, ref.pixel_values) and torch.equal(out.grid_sizes, ref.grid_sizes)
    pillow_path = _on_the_pillow_path(lambda img: proc(img, merge_size=merge))
    assert torch.equal(pillow_path(image).pixel_values, ref.pixel_values)
    result = cpu_bench(
        benchmark,
        lambda img: proc(img, merge_size=merge),
        [(image,)],
        baselines={"reference": lambda img: reference_preprocess(img, merge_size=merge), "pillow_path": pillow_path},
        info={"image": name, "merge_size": merge, "grid": out.grid_sizes[0].tolist()},
    )
    _record_throughput(benchmark, result, image.width * image.height / 1e6)


def test_processor_batch_all_cores(benchmark):
    """16 photos of 1-4 MP in one packed batch on every core, against the reference one by one."""
    cores = os.cpu_count() or 1
    sizes = list(PHOTOS.values())
    images = [photo(*sizes[i % len(sizes)], seed=i) for i in range(16)]
    proc = ImageProcessor(num_threads=cores)
    out = proc.batch(images)
    ref = [reference_preprocess(img) for img in images]
    assert torch.equal(out.pixel_values, torch.cat([r.pixel_values for r in ref]))
    result = cpu_bench(
        benchmark,
        proc.batch,
        [(images,)],
        baselines={"reference": lambda imgs: [reference_preprocess(img) for img in imgs]},
        rounds=5,
        info={"images": len(images), "pool_threads": cores},
    )
    _record_throughput(benchmark, result, sum(img.width * img.height for img in images) / 1e6)
