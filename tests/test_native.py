"""The compiled resize (``penguin_vl/csrc/resize.c``): its bits against Pillow and the Pillow path, its
checks on the output it writes through raw pointers, and how it is built, cached and given up on.

The preprocessor's own tests (``test_processor.py``) run on both paths as well.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from penguin_vl import _native
from penguin_vl._resize import Normalisation, _resize_native, resize_bicubic, resize_to_patches, vertical_first
from penguin_vl.processor import resize_backend


@pytest.fixture()
def lib(monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.delenv("PENGUIN_VL_NATIVE", raising=False)
    library = _native.library()
    if library is None:
        pytest.skip(f"compiled resize: {_native.status()}")
    return library


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A process that has not built or loaded the library yet, with an empty cache."""
    monkeypatch.delenv("PENGUIN_VL_NATIVE", raising=False)
    monkeypatch.setenv("PENGUIN_VL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_reason", "not built yet")


def pillow_path(fn, *args):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PENGUIN_VL_NATIVE", "0")
        return fn(*args)


def pillow(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's one-pass-at-a-time BICUBIC resize in Pillow 13's order, 1 or 3 channels."""
    squeeze = image.shape[2] == 1
    im = Image.fromarray(image[..., 0] if squeeze else image)
    h0, w0 = image.shape[:2]
    steps = [(w0, height), (width, height)] if vertical_first(h0, w0, height, width) else [(width, h0), (width, height)]
    for size in steps:
        if size != im.size:
            im = im.resize(size, Image.Resampling.BICUBIC)
    out = np.asarray(im)
    return out[..., None] if squeeze else out


def random_sizes(rng: np.random.Generator) -> tuple[int, int, int, int]:
    h, w = (int(v) for v in rng.integers(1, 160, 2))
    kind = rng.integers(4)
    if kind == 0:  # a few pixels off, the processor's usual case
        return h, w, max(1, h + int(rng.integers(-5, 3))), max(1, w + int(rng.integers(-5, 3)))
    if kind == 1:  # a large downscale: many taps per output
        return h * 4 + 3, w * 4 + 1, max(1, h // 3), max(1, w // 2)
    return h, w, int(rng.integers(1, 200)), int(rng.integers(1, 200))


@pytest.mark.parametrize("channels", [1, 3])
def test_matches_pillow(lib, channels):
    rng = np.random.default_rng(channels)
    for _ in range(150):
        h, w, oh, ow = random_sizes(rng)
        image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        out = resize_bicubic(image, oh, ow).numpy()
        assert np.array_equal(out, pillow(image, oh, ow)), (h, w, oh, ow)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_matches_pillow_path(lib, channels):
    """Any channel count (the Pillow path resizes 2 or 4 channels band by band, as Pillow premultiplies alpha)."""
    rng = np.random.default_rng(10 + channels)
    for _ in range(60):
        h, w, oh, ow = random_sizes(rng)
        image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        expected = pillow_path(resize_bicubic, image, oh, ow)
        assert torch.equal(resize_bicubic(image, oh, ow), expected), (h, w, oh, ow)


def test_saturating_values(lib):
    """Black and white stripes drive the cubic's lobes below 0 and above 255: both clamps are taken."""
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, ::2] = 255
    image[::3] = 255 - image[::3]
    for oh, ow in ((61, 90), (100, 150), (64, 95), (30, 96)):
        assert np.array_equal(resize_bicubic(image, oh, ow).numpy(), pillow(image, oh, ow))


def test_strided_and_flipped_sources(lib):
    rng = np.random.default_rng(3)
    full = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for view in (full[7:80, 11:101], full[::-1], full[:, ::-1], full[::2, ::3], full.transpose(1, 0, 2)):
        copy = np.ascontiguousarray(view)
        assert np.array_equal(resize_bicubic(view, 41, 57).numpy(), pillow(copy, 41, 57))


@pytest.mark.parametrize("merge", [1, 2])
@pytest.mark.parametrize("size", [(56, 56, 56, 56), (100, 130, 56, 112), (50, 61, 84, 56), (300, 29, 112, 28)])
def test_patches_fill_a_poisoned_output(lib, merge, size):
    """Every patch value is written, and equals the Pillow path's."""
    h, w, oh, ow = size
    image = np.random.default_rng(4).integers(0, 256, (h, w, 3), dtype=np.uint8)
    norm = Normalisation(1 / 255, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    rows = (oh // 14) * (ow // 14)
    out = torch.full((rows, 3 * 14 * 14), float("nan"))
    resize_to_patches(image, oh, ow, 14, merge, norm, out)
    expected = torch.full_like(out, float("nan"))
    pillow_path(resize_to_patches, image, oh, ow, 14, merge, norm, expected)
    assert not out.isnan().any()
    assert torch.equal(out, expected)


def test_output_is_checked_before_the_call(lib):
    image = np.zeros((30, 30, 3), np.uint8)
    table = Normalisation(1 / 255, (0.5,) * 3, (0.5,) * 3).table
    bad = [
        (torch.empty(28, 28, 3, dtype=torch.int16), None),  # dtype
        (torch.empty(28, 27, 3, dtype=torch.uint8), None),  # shape
        (torch.empty(28, 3, 28, dtype=torch.uint8).transpose(1, 2), None),  # strides
        (torch.empty(5, 588), table),  # rows
        (torch.empty(4, 588, dtype=torch.float64), table),
        (torch.empty(4, 588), table[:2]),  # channels of the table
    ]
    for out, tab in bad:
        with pytest.raises(ValueError):
            _resize_native(lib, image, 28, 28, out, tab, 14, 1)
    for args in [(np.zeros((30, 30), np.uint8), 28, 28), (image.astype(np.int16), 28, 28), (image, 0, 28)]:
        with pytest.raises(ValueError):
            _resize_native(lib, *args, torch.empty(28, 28, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="positive"):
        _resize_native(lib, image, 28, 28, torch.empty(4, 588), table, 0, 1)
    with pytest.raises(ValueError, match="multiple of patch"):
        _resize_native(lib, image, 42, 42, torch.empty(9, 588), table, 14, 2)


def test_builds_once_into_its_cache(fresh, tmp_path, monkeypatch):
    if _native.library() is None:
        pytest.skip(f"compiled resize: {_native.status()}")
    built = list((tmp_path / "cache").glob("resize-*.so"))
    assert len(built) == 1 and _native.status().startswith("compiled")
    # a new process finds it there and compiles nothing
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_tried", False)

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert _native.library() is not None
    assert list((tmp_path / "cache").glob("*")) == built


def test_portable_build_matches(fresh, monkeypatch):
    """Built without AVX2 (as on other CPUs), the generic vector code gives the same bits."""
    monkeypatch.setattr(_native, "_flags", lambda: ["-O2", "-std=c99", "-shared", "-fPIC"])
    if _native.library() is None:
        pytest.skip(f"compiled resize: {_native.status()}")
    rng = np.random.default_rng(6)
    for _ in range(40):
        h, w, oh, ow = random_sizes(rng)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(resize_bicubic(image, oh, ow).numpy(), pillow(image, oh, ow)), (h, w, oh, ow)


def test_cc_may_carry_words(fresh, monkeypatch, tmp_path):
    """``CC="wrapper gcc"``, as ccache users set it: the first word is the program."""
    wrapper = tmp_path / "wrapper"
    wrapper.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/called"\nexec "$@"\n')
    wrapper.chmod(0o755)
    compiler = _native._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", f"{wrapper} {compiler[0]}")
    assert _native.library() is not None, _native.status()
    assert (tmp_path / "called").read_text().startswith(compiler[0])


@pytest.mark.parametrize(
    "cc, reason",
    [("/nonexistent/cc", "no C compiler found"), ("false", "failed on resize.c")],
    ids=["missing", "broken"],
)
def test_falls_back_to_pillow(fresh, monkeypatch, cc, reason):
    monkeypatch.setenv("CC", cc)
    assert _native.library() is None
    backend = resize_backend()
    assert backend.name == "pillow" and reason in backend.reason and "Pillow's resize" in backend.reason
    image = np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert np.array_equal(resize_bicubic(image, 33, 47).numpy(), pillow(image, 33, 47))


def test_unwritable_cache_falls_back_with_a_reason(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PENGUIN_VL_CACHE_DIR", str(blocker / "cache"))
    assert _native.library() is None
    assert "PENGUIN_VL_CACHE_DIR" in _native.status()


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("PENGUIN_VL_NATIVE", "0")
    assert _native.library() is None
    assert resize_backend().name == "pillow" and "disabled" in resize_backend().reason


def test_backend_names_the_compiled_library(lib):
    backend = resize_backend()
    assert backend.name == "compiled" and backend.reason.startswith("compiled (") and ".so" in backend.reason
