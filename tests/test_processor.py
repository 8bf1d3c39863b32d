"""The preprocessor: golden parity, bit-exact resize against Pillow, the fast path against the slow
reference pipeline, TRA sizing, the batch API, settings and bad input.

Every comparison is ``torch.equal`` / ``np.array_equal``: the contract is the reference's bits.
Pillow 13 chooses the order of its two resize passes (:func:`vertical_first`); comparisons with its
one-shot ``resize`` (and with :func:`reference_preprocess`, which calls it) need Pillow >= 13, while
the resize tests compose two single-axis Pillow resizes, which every version computes alike.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from penguin_vl._resize import Normalisation, bicubic_coefficients, resize_bicubic, resize_to_patches, vertical_first
from penguin_vl.processor import (
    ImageProcessor,
    ImageWarning,
    ProcessorOutput,
    ProcessorSettings,
    reference_preprocess,
    resize_backend,
    target_sizes,
)

GOLDEN = Path(os.environ.get("PENGUIN_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))
requires_golden = pytest.mark.skipif(
    not (GOLDEN / "proc_shared_golden.safetensors").is_file(),
    reason=f"preprocessor goldens not found in {GOLDEN} (set PENGUIN_GOLDEN_DIR)",
)
requires_pillow13 = pytest.mark.skipif(
    int(PIL.__version__.split(".")[0]) < 13,
    reason=f"Pillow {PIL.__version__} orders its resize passes differently from Pillow 13, the reference's",
)
GOLDEN_IMAGES = ("gray_50x900", "pal_320x240", "rgba_333x217")
# PIL warns when it converts the golden palette image, whose transparency it drops as the reference does
palette_warning = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
# PIL modes that convert("RGB") accepts, each made from a random RGB image
MODES = ("RGB", "RGBA", "P", "L", "LA", "PA", "CMYK", "YCbCr", "I;16", "I", "F", "1")


@pytest.fixture(autouse=True, params=["compiled", "pillow"])
def resize_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both resizes: the compiled one (where a C compiler is found) and Pillow's."""
    if request.param == "pillow":
        monkeypatch.setenv("PENGUIN_VL_NATIVE", "0")
    else:
        monkeypatch.delenv("PENGUIN_VL_NATIVE", raising=False)
    backend = resize_backend()
    if backend.name != request.param:
        pytest.skip(f"{request.param} resize not in use: {backend.reason}")
    return request.param


def random_image(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus noise, like a photo; sharp noise alone hides nothing either."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    ramps = [xx * 255 / max(width, 1), yy * 255 / max(height, 1), (xx + yy) * 127 / max(height + width, 1)]
    base = np.stack([ramps[c % 3] for c in range(channels)], axis=-1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def pillow_two_pass(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow 13's BICUBIC resize as two single-axis Pillow resizes in its pass order (any Pillow version)."""
    im = Image.fromarray(image)
    h0, w0 = image.shape[:2]
    bicubic = Image.Resampling.BICUBIC
    if vertical_first(h0, w0, height, width):
        im = im.resize((w0, height), bicubic).resize((width, height), bicubic)
    else:
        im = im.resize((width, h0), bicubic).resize((width, height), bicubic)
    return np.asarray(im)


def with_mode(image: np.ndarray, mode: str) -> Image.Image:
    rgb = Image.fromarray(image)
    if mode == "I;16":
        return rgb.convert("L").convert("I").convert("I;16")
    if mode == "I":
        return rgb.convert("L").convert("I")
    if mode == "F":
        return rgb.convert("L").convert("F")
    if mode == "PA":
        return rgb.convert("P").convert("PA")
    return rgb.convert(mode)


def assert_same(out: ProcessorOutput, ref: ProcessorOutput) -> None:
    assert out.pixel_values.dtype == torch.float32
    assert out.grid_sizes.dtype == torch.int64 and out.merge_sizes.dtype == torch.int64
    assert torch.equal(out.grid_sizes, ref.grid_sizes), (out.grid_sizes.tolist(), ref.grid_sizes.tolist())
    assert torch.equal(out.merge_sizes, ref.merge_sizes)
    assert torch.equal(out.pixel_values, ref.pixel_values)


# ---------------------------------------------------------------------------------------------- goldens


@requires_golden
@palette_warning
@pytest.mark.parametrize("merge", [1, 2], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("name", GOLDEN_IMAGES, ids=str)
def test_golden_images(name, merge):
    gold = load_file(GOLDEN / "proc_shared_golden.safetensors")
    image = Image.open(GOLDEN / f"proc_shared_{name}.png")
    out = ImageProcessor()(image, merge_size=merge)
    assert torch.equal(out.grid_sizes, gold[f"{name}_m{merge}.grid_sizes"])
    assert torch.equal(out.pixel_values, gold[f"{name}_m{merge}.pixel_values"])
    assert out.merge_sizes.tolist() == [merge]


@requires_golden
def test_golden_video_tra():
    gold = load_file(GOLDEN / "proc_shared_golden.safetensors")
    params = json.loads((GOLDEN / "proc_shared_params.json").read_text())["video8"]
    frames = np.load(GOLDEN / "proc_shared_video8_frames.npy")
    proc = ImageProcessor(min_tokens=params["min_tokens"], max_tokens=params["max_tokens"])
    out = proc(list(frames), merge_size=params["merge_size"], frame_types=params["frame_types"])
    assert torch.equal(out.grid_sizes, gold["video8_m2.grid_sizes"])
    assert torch.equal(out.pixel_values, gold["video8_m2.pixel_values"])
    assert out.merge_sizes.tolist() == [params["merge_size"]] * len(frames)


@requires_golden
@requires_pillow13
@palette_warning
def test_reference_pipeline_matches_goldens():
    gold = load_file(GOLDEN / "proc_shared_golden.safetensors")
    for name in GOLDEN_IMAGES:
        image = Image.open(GOLDEN / f"proc_shared_{name}.png")
        for merge in (1, 2):
            ref = reference_preprocess(image, merge_size=merge)
            assert torch.equal(ref.pixel_values, gold[f"{name}_m{merge}.pixel_values"]), (name, merge)


# ----------------------------------------------------------------------------------------------- resize

RESIZE_CASES = [
    (37, 53, 100, 20),  # up one axis, down the other
    (300, 1, 28, 14),  # a column
    (1, 50, 14, 700),  # a row
    (5, 700, 14, 140),
    (1000, 800, 392, 322),  # down ~2.5x: transposed horizontal pass
    (120, 160, 120, 156),  # horizontal only
    (120, 160, 112, 160),  # vertical only
    (99, 77, 99, 77),  # no pass at all
    (1, 1, 14, 14),
    (2000, 3, 980, 14),  # tall: vertical first
    (160, 120, 158, 122),  # height shrinks, width grows: vertical first
    (640, 480, 644, 476),
    (300, 2000, 28, 40),  # ~50x down: a narrower float32 split
    (2, 20000, 2, 20),  # 1000x down, horizontal: float64 bags
    (20000, 2, 20, 2),  # 1000x down, vertical: float64 bags
]


@pytest.mark.parametrize("case", RESIZE_CASES, ids=lambda c: "{}x{}->{}x{}".format(*c))
def test_resize_matches_pillow(case):
    h, w, oh, ow = case
    image = random_image(h, w, seed=h * w)
    expected = pillow_two_pass(image, oh, ow)
    assert np.array_equal(resize_bicubic(image, oh, ow).numpy(), expected)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    h=st.integers(1, 160), w=st.integers(1, 160), oh=st.integers(1, 200), ow=st.integers(1, 200), seed=st.integers(0, 9)
)
def test_resize_matches_pillow_random(h, w, oh, ow, seed):
    image = random_image(h, w, seed=seed)
    ours = resize_bicubic(image, oh, ow).numpy()
    assert np.array_equal(ours, pillow_two_pass(image, oh, ow))
    if int(PIL.__version__.split(".")[0]) >= 13:  # and the pass order is the installed Pillow's own
        assert np.array_equal(ours, np.asarray(Image.fromarray(image).resize((ow, oh), Image.Resampling.BICUBIC)))


def test_resize_saturated_images():
    """All-255 and all-0 inputs drive the accumulators to their extremes (overshoot is clamped)."""
    for value in (0, 255):
        image = np.full((61, 83, 3), value, dtype=np.uint8)
        image[::7, ::5] = 255 - value  # isolated spikes ring through the negative lobes
        for oh, ow in ((200, 300), (20, 30), (61, 40), (90, 83)):
            assert np.array_equal(resize_bicubic(image, oh, ow).numpy(), pillow_two_pass(image, oh, ow))


@requires_pillow13
@pytest.mark.parametrize("case", RESIZE_CASES, ids=lambda c: "{}x{}->{}x{}".format(*c))
def test_pass_order_is_pillows(case):
    h, w, oh, ow = case
    image = random_image(h, w, seed=3)
    expected = np.asarray(Image.fromarray(image).resize((ow, oh), Image.Resampling.BICUBIC))
    assert np.array_equal(resize_bicubic(image, oh, ow).numpy(), expected)


def test_weight_bounds():
    """The int32 and table-offset invariants of the module docstring, over many scales."""
    rng = np.random.default_rng(0)
    sizes = [(n, m) for n, m in rng.integers(1, 3000, (300, 2))] + [(1, 1), (2, 1), (1, 3000), (3000, 1)]
    for n, m in sizes:
        _, count, w = bicubic_coefficients(int(n), int(m))
        w = w.astype(np.int64)
        assert (w.sum(1) - (1 << 22) <= count).all() and (w.sum(1) - (1 << 22) >= -count).all()
        assert np.maximum(w, 0).sum(1).max() < 1.2 * (1 << 22)
        assert np.minimum(w, 0).sum(1).min() > -0.2 * (1 << 22)


def test_resize_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        resize_bicubic(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(ValueError, match="non-empty"):
        resize_bicubic(np.zeros((0, 4, 3), np.uint8), 2, 2)
    with pytest.raises(ValueError, match="positive"):
        resize_bicubic(np.zeros((4, 4, 3), np.uint8), 0, 2)


# --------------------------------------------------------------------------------------- normalisation


def test_normalisation_table_is_the_reference_formula():
    norm = Normalisation(1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    u8 = np.arange(256, dtype=np.uint8)
    expected = ((u8.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    for c in range(3):
        assert np.array_equal(norm.table[c].numpy(), expected)
    assert norm.arithmetic, "the released settings normalise with float32 ops"


@pytest.mark.parametrize(
    "settings",
    [
        (1 / 255, (0.5,) * 3, (0.5,) * 3),
        (1 / 255, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        (0.0039, (0.1, 0.2, 0.3), (0.7, 0.8, 0.9)),
        (1.0, (0.0,) * 3, (1.0,) * 3),
    ],
    ids=["released", "clip", "odd", "identity"],
)
@pytest.mark.parametrize("merge", [1, 2], ids=lambda m: f"m{m}")
def test_patch_writers_agree(settings, merge):
    """The float32-op writer (where exact) and the table writer both give the reference's bits."""
    norm = Normalisation(*settings)
    p, block = 14, 14 * merge
    image = random_image(3 * block, 4 * block + 5, seed=merge)
    oh, ow = 2 * block, 5 * block
    # the reference keeps an image whose sides are already multiples of the factor
    ref = reference_preprocess(
        Image.fromarray(pillow_two_pass(image, oh, ow)), merge, patch_size=p, min_tokens=0, max_tokens=10**6,
        image_mean=settings[1], image_std=settings[2], rescale_factor=settings[0],
    )  # fmt: skip
    assert ref.grid_sizes.tolist() == [[1, oh // p, ow // p]]
    for arithmetic in sorted({False, norm.arithmetic}):
        out = torch.full(((oh // p) * (ow // p), 3 * p * p), float("nan"))
        norm.arithmetic = arithmetic  # the Pillow path's float32 ops where exact, else its table
        resize_to_patches(image, oh, ow, p, merge, norm, out)
        assert torch.equal(out, ref.pixel_values), f"arithmetic={arithmetic}"


def test_normalisation_switches():
    """do_rescale / do_normalize off: the same pipeline with rescale 1 or mean 0 and std 1."""
    image = Image.fromarray(random_image(40, 50))
    out = ImageProcessor(do_rescale=False)(image)
    ref = reference_preprocess(image, rescale_factor=1.0)
    assert torch.equal(out.pixel_values, ref.pixel_values)
    out = ImageProcessor(do_normalize=False)(image)
    ref = reference_preprocess(image, image_mean=(0.0,) * 3, image_std=(1.0,) * 3)
    assert torch.equal(out.pixel_values, ref.pixel_values)


# ------------------------------------------------------------------------------- fast path vs reference


@requires_pillow13
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_modes_match_reference(mode):
    image = with_mode(random_image(45, 61, seed=len(mode)), mode)
    proc = ImageProcessor(min_tokens=4, max_tokens=24)  # forces a downscale
    deep = mode in ("I;16", "I", "F")  # clipped to 8 bits as the reference clips them, with a warning
    for merge in (1, 2):
        with pytest.warns(ImageWarning, match=f"mode {mode}") if deep else contextlib.nullcontext():
            out = proc(image, merge_size=merge)
        assert_same(out, reference_preprocess(image, merge, min_tokens=4, max_tokens=24))


@requires_pillow13
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    h=st.integers(1, 260),
    w=st.integers(1, 260),
    merge=st.sampled_from([1, 2]),
    budget=st.sampled_from([(16, 16384), (4, 40), (64, 120), (1, 2)]),
    seed=st.integers(0, 99),
)
def test_fast_matches_reference_random(h, w, merge, budget, seed):
    image = Image.fromarray(random_image(h, w, seed=seed))
    out = ImageProcessor(min_tokens=budget[0], max_tokens=budget[1])(image, merge_size=merge)
    ref = reference_preprocess(image, merge, min_tokens=budget[0], max_tokens=budget[1])
    assert_same(out, ref)


@requires_pillow13
@pytest.mark.parametrize("shape", [(1, 2000), (2000, 1), (7, 900), (900, 7)], ids=str)
def test_extreme_aspect_ratios(shape):
    image = Image.fromarray(random_image(*shape, seed=5))
    for merge in (1, 2):
        assert_same(ImageProcessor()(image, merge_size=merge), reference_preprocess(image, merge))


@requires_pillow13
def test_list_is_one_clip_sized_by_its_first_image():
    """(sic) unrelated images in one list all take the first one's size, each as its own grid row."""
    images = [Image.fromarray(random_image(h, w, seed=h)) for h, w in ((60, 80), (200, 50), (33, 33))]
    out = ImageProcessor()(images)
    assert out.grid_sizes.tolist() == [[1, 4, 6]] * 3
    assert_same(out, reference_preprocess(images))


@requires_pillow13
def test_tra_frame_types_match_reference():
    frames = [random_image(150, 200, seed=s) for s in range(8)]
    types = [0, 1, 1, 1, 0, 1, 1, 1]
    proc = ImageProcessor(min_tokens=16, max_tokens=300)
    out = proc(frames, merge_size=2, frame_types=np.array(types))
    assert_same(out, reference_preprocess(frames, 2, types, min_tokens=16, max_tokens=300))
    assert out.grid_sizes[:, 1:].tolist() == [[14, 20], [8, 12], [8, 12], [8, 12], [14, 20], [8, 12], [8, 12], [8, 12]]


@requires_pillow13
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_clip_array_is_one_item(kind):
    clip = np.stack([random_image(150, 200, seed=s) for s in range(5)])
    value = clip if kind == "numpy" else torch.from_numpy(clip)
    out = ImageProcessor(max_tokens=200)(value, merge_size=2)
    ref = reference_preprocess(clip, 2, max_tokens=200)
    assert_same(out, ref)
    t, h, w = out.grid_sizes[0].tolist()
    assert t == 5 and out.pixel_values.shape == (t * h * w, 588)


def test_frames_of_a_clip_are_resized_alike():
    """Frame f of a clip equals the same frame processed alone at the clip's size."""
    clip = np.stack([random_image(90, 120, seed=s) for s in range(3)])
    proc = ImageProcessor(max_tokens=30)
    out = proc(clip)
    per_frame = torch.cat([proc(frame).pixel_values for frame in clip])
    assert torch.equal(out.pixel_values, per_frame)


# ------------------------------------------------------------------------------------------------ sizing


def test_target_sizes_released_examples():
    assert target_sizes(900, 50, [0], 14, 16, 16384) == [(896, 56)]
    assert target_sizes(240, 320, [0], 28, 16, 16384) == [(252, 308)]
    assert target_sizes(1080, 1920, [0], 14, 16, 16384) == [(1078, 1918)]
    # over budget: scaled to about max_tokens * 0.95 patches
    (h, w) = target_sizes(4000, 3000, [0], 14, 16, 16384)[0]
    assert h % 14 == 0 and w % 14 == 0 and (h // 14) * (w // 14) <= 16384
    # tiny: lifted to min_tokens * 1.5 by rounding up
    (h, w) = target_sizes(3, 3, [0], 14, 16, 16384)[0]
    assert (h // 14) * (w // 14) >= 24


def test_target_sizes_tra():
    sizes = target_sizes(150, 200, [0, 1, 1, 1, 0, 1, 1, 1], 28, 16, 300)
    key, inter = (196, 280), (112, 168)
    assert sizes == [key, inter, inter, inter, key, inter, inter, inter]
    with pytest.raises(ValueError, match="no key frame"):
        target_sizes(1500, 2000, [1] * 40, 28, 16, 300)


# ------------------------------------------------------------------------------------------------- batch


@requires_pillow13
def test_batch_sizes_each_item_on_its_own(tmp_path):
    arrays = [random_image(h, w, seed=h + w) for h, w in ((60, 80), (200, 50), (33, 33), (31, 700))]
    path = tmp_path / "img.png"
    Image.fromarray(arrays[1]).save(path)
    items = [Image.fromarray(arrays[0]), str(path), arrays[2], torch.from_numpy(arrays[3])]
    proc = ImageProcessor()
    for merge in (1, 2):
        out = proc.batch(items, merge_size=merge)
        singles = [reference_preprocess(Image.fromarray(a), merge) for a in arrays]
        assert out.grid_sizes.tolist() == [s.grid_sizes[0].tolist() for s in singles]
        assert torch.equal(out.pixel_values, torch.cat([s.pixel_values for s in singles]))
        assert out.merge_sizes.tolist() == [merge] * 4


def test_thread_pool_matches_serial(tmp_path):
    arrays = [random_image(40 + 9 * i, 70 - 5 * i, seed=i) for i in range(6)]
    items = [Image.fromarray(a) for a in arrays[:3]] + arrays[3:]
    serial = ImageProcessor().batch(items, merge_size=2)
    pooled = ImageProcessor(num_threads=3).batch(items, merge_size=2)
    assert_same(pooled, serial)
    clip = np.stack(arrays[:1] * 4)
    assert_same(ImageProcessor(num_threads=4)(list(clip)), ImageProcessor()(list(clip)))


def test_thread_pool_leaves_torch_thread_counts_alone():
    """The caller's count, and the default that threads started later pick up, are unchanged."""
    before = torch.get_num_threads()
    ImageProcessor(num_threads=2).batch([random_image(30, 40, seed=s) for s in range(3)])
    assert torch.get_num_threads() == before
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_thread_pool_shares_one_lazily_loaded_image(tmp_path, fmt):
    """The same file-backed PIL image, not yet decoded, several times in one pooled batch."""
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(random_image(300, 400, seed=5)).convert("P" if fmt == "png" else "RGB").save(path)
    serial = ImageProcessor().batch([Image.open(path)] * 8)
    for _ in range(3):
        assert_same(ImageProcessor(num_threads=8).batch([Image.open(path)] * 8), serial)


def test_output_is_a_mapping():
    out = ImageProcessor()(random_image(30, 30))
    assert dict(**out).keys() == {"pixel_values", "grid_sizes", "merge_sizes"}
    assert out["grid_sizes"] is out.grid_sizes
    with pytest.raises(KeyError):
        out["features"]


def test_pin_memory():
    proc = ImageProcessor()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            proc(random_image(30, 30), pin_memory=True)
        return
    out = proc(random_image(30, 30), pin_memory=True)
    assert out.pixel_values.is_pinned()
    assert torch.equal(out.pixel_values, proc(random_image(30, 30)).pixel_values)


# --------------------------------------------------------------------------------------------- settings


def test_from_pretrained_reads_upstream_keys(tmp_path):
    config = {
        "image_processor_type": "PenguinVLImageProcessor",
        "processor_class": "PenguinVLProcessor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 0.00392156862745098,
        "resample": 3,
        "patch_size": 14,
        "min_tokens": 8,
        "max_tokens": 64,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "merge_size": 1,
        "min_pixels": 3136,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    proc = ImageProcessor.from_pretrained(tmp_path)
    assert (proc.min_tokens, proc.max_tokens, proc.patch_size) == (8, 64, 14)
    assert ImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json").max_tokens == 64
    (tmp_path / "preprocessor_config.json").write_text("{}")
    assert ImageProcessor.from_pretrained(tmp_path).max_tokens == 16384


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"resample": 2}, "BICUBIC"),
        ({"resample": "bilinear"}, "BICUBIC"),
        ({"do_resize": False}, "do_resize"),
        ({"do_convert_rgb": False}, "do_convert_rgb"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "nonzero"),
        ({"rescale_factor": -1}, "rescale_factor"),
        ({"patch_size": 0}, "patch_size"),
        ({"min_tokens": 64, "max_tokens": 16}, "min_tokens"),
        ({"max_tokens": 10.5}, "max_tokens"),
        ({"do_rescale": "yes"}, "do_rescale"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_settings(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessor(**bad)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=match):
        ImageProcessor.from_pretrained(tmp_path)


def test_from_pretrained_missing_or_broken(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        ImageProcessor.from_pretrained(tmp_path)


def test_settings_round_trip_through_the_checkpoint_file(tmp_path):
    proc = ImageProcessor(min_tokens=8, max_tokens=99, image_mean=0.25, do_normalize=False)
    path = proc.save_pretrained(tmp_path)
    assert path == tmp_path / "preprocessor_config.json"
    assert json.loads(path.read_text())["resample"] == int(Image.Resampling.BICUBIC)
    again = ImageProcessor.from_pretrained(tmp_path)
    assert again.settings == proc.settings
    assert again.settings.image_mean == (0.25, 0.25, 0.25) and not again.do_normalize
    image = random_image(50, 70)
    assert torch.equal(again(image).pixel_values, proc(image).pixel_values)


def test_from_pretrained_replaces_the_token_budget(tmp_path):
    ImageProcessor(min_tokens=8, max_tokens=99).save_pretrained(tmp_path)
    proc = ImageProcessor.from_pretrained(tmp_path, max_tokens=40, num_threads=2)
    assert (proc.min_tokens, proc.max_tokens, proc.num_threads) == (8, 40, 2)
    with pytest.raises(ValueError, match="min_tokens"):
        ImageProcessor.from_pretrained(tmp_path, min_tokens=50, max_tokens=40)


def test_settings_are_checked_and_frozen():
    settings = ProcessorSettings(image_std=2)
    assert settings.image_std == (2.0, 2.0, 2.0) and settings == ProcessorSettings(image_std=(2, 2, 2))
    assert settings.with_budget(max_tokens=64) == ProcessorSettings(image_std=2, max_tokens=64)
    assert ImageProcessor.from_settings(settings).settings == settings
    with pytest.raises(AttributeError):
        settings.patch_size = 16
    with pytest.raises(ValueError, match="nonzero"):
        ProcessorSettings(image_std=(1, 0, 1))
    assert ProcessorSettings(do_rescale=False).metadata()["rescale_factor"] is None


# -------------------------------------------------------------------------------------------- bad input


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_unreadable_and_truncated_files(tmp_path):
    proc = ImageProcessor()
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png_bytes(random_image(64, 64))[:300])
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=r"items\[1\].*garbage\.png"):
        proc.batch([random_image(20, 20), garbage])
    with pytest.raises(ValueError, match=r"items\[0\].*truncated\.png"):
        proc.batch([truncated])
    with pytest.raises(FileNotFoundError, match=r"items\[0\].*missing\.png"):
        proc.batch([missing])
    with pytest.raises(ValueError, match=r"images\[0\].*truncated\.png"):
        proc(str(truncated))
    with pytest.raises(ValueError, match=r"images\[2\]"):
        proc([random_image(20, 20), random_image(20, 20), Image.open(truncated)])


@pytest.mark.parametrize(
    "value, error, match",
    [
        (np.zeros((20, 20, 3), np.float32), TypeError, "uint8"),
        (np.zeros((20, 20, 3), np.int16), TypeError, "uint8"),
        (torch.zeros(20, 20, 3), TypeError, "uint8"),
        (np.zeros((20, 20, 4), np.uint8), ValueError, "channels"),
        (np.zeros((20, 20), np.uint8), ValueError, "shape"),
        (np.zeros((2, 2, 20, 20, 3), np.uint8), ValueError, "shape"),
        (np.zeros((0, 20, 3), np.uint8), ValueError, "empty"),
        (np.zeros((3, 20, 3), np.uint8), ValueError, "ambiguous"),
        (Image.new("RGB", (0, 5)), ValueError, "empty"),
        (42, TypeError, "int"),
    ],
    ids=["float32", "int16", "torch-float", "rgba", "gray", "5d", "no-rows", "height-3", "pil-0", "int"],
)
def test_bad_images(value, error, match):
    with pytest.raises(error, match=rf"images\[1\].*{match}"):
        ImageProcessor()([random_image(20, 20), value])


def test_batch_accepts_what_the_call_finds_ambiguous():
    image = random_image(3, 40)
    out = ImageProcessor().batch([image])
    ref = ImageProcessor()(Image.fromarray(image))
    assert_same(out, ref)


@pytest.mark.parametrize("merge", [0, -1, 1.5, True, "2"], ids=repr)
def test_bad_merge_size(merge):
    with pytest.raises(ValueError, match="merge_size"):
        ImageProcessor()(random_image(20, 20), merge_size=merge)
    with pytest.raises(ValueError, match="merge_size"):
        ImageProcessor().batch([random_image(20, 20)], merge_size=merge)


@pytest.mark.parametrize("types", [[0], [0, 1, 2], [0, 1, True], [0, -1, 1]], ids=str)
def test_bad_frame_types(types):
    with pytest.raises(ValueError, match="frame_types"):
        ImageProcessor()([random_image(20, 20)] * 3, frame_types=types)


def test_empty_inputs():
    with pytest.raises(ValueError, match="empty"):
        ImageProcessor()([])
    with pytest.raises(ValueError, match="non-empty sequence"):
        ImageProcessor().batch([])
    with pytest.raises(ValueError, match="non-empty sequence"):
        ImageProcessor().batch(random_image(20, 20))
