"""Properties of the preprocessor and of ``penguin-vl encode`` over damaged and unusual images: truncated
files, wrong extensions, every Pillow mode a file can hold, arrays of any dtype and layout. Each input gives
the reference's bits or a documented error naming it; a 16-bit image warns, an animated one is refused; on
the command line a bad input is skipped and named, and the outputs already written stay."""

from __future__ import annotations

import io
import json
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from penguin_vl import ImageProcessor
from penguin_vl.cli import main
from penguin_vl.processor import ImageWarning, reference_preprocess

# (mode, format) pairs a file can hold, with how the pixels are drawn
MODES = {
    "1": ("PNG", 1, np.bool_),
    "L": ("PNG", 1, np.uint8),
    "LA": ("PNG", 2, np.uint8),
    "P": ("GIF", 1, np.uint8),
    "RGB": ("JPEG", 3, np.uint8),
    "RGBA": ("WEBP", 4, np.uint8),
    "CMYK": ("JPEG", 4, np.uint8),
    "I;16": ("PNG", 1, np.uint16),
    "I": ("TIFF", 1, np.int32),
    "F": ("TIFF", 1, np.float32),
}
SUFFIX = {"PNG": ".png", "GIF": ".gif", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
DAMAGE = ("none", "truncated", "wrong-extension", "empty", "text", "flipped-byte", "animated")


def _image_bytes(mode: str, width: int, height: int, seed: int) -> tuple[bytes, str]:
    fmt, channels, dtype = MODES[mode]
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        pixels = rng.integers(0, 2, (height, width)).astype(bool)
    elif dtype == np.float32:
        pixels = rng.random((height, width), dtype=np.float32) * 300
    else:
        pixels = rng.integers(0, np.iinfo(dtype).max, (height, width, channels), dtype=dtype, endpoint=True)
        pixels = pixels[..., 0] if channels == 1 else pixels
    image = Image.fromarray(pixels, mode) if mode in ("LA", "CMYK") else Image.fromarray(pixels)
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue(), fmt


def _animated(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        first = image.convert("RGB")
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[first.rotate(180)], duration=40)
    return buffer.getvalue()


def _damaged(draw, data: bytes, fmt: str) -> tuple[bytes, str]:
    damage = draw(st.sampled_from(DAMAGE))
    suffix = SUFFIX[fmt]
    if damage == "animated":
        data, suffix = _animated(data), ".gif"
    elif damage == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "wrong-extension":
        suffix = draw(st.sampled_from(sorted(set(SUFFIX.values()) - {suffix})))
    elif damage == "empty":
        data = b""
    elif damage == "text":
        data = b"this is not an image\n"
    elif damage == "flipped-byte":
        at = draw(st.integers(0, min(len(data), 64) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data, suffix


def _reference(path: Path) -> torch.Tensor | None:
    """The reference's result for a file, or None where it cannot read it."""
    try:
        with Image.open(path) as image:
            image.load()
            return reference_preprocess([image]).pixel_values
    except Exception:  # noqa: BLE001 (whatever the reference fails with, it has no result)
        return None


images = st.tuples(st.sampled_from(sorted(MODES)), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**16))


@given(data=st.data(), spec=images)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_files(tmp_path, data, spec):
    mode, width, height, seed = spec
    content, fmt = _image_bytes(mode, width, height, seed)
    content, suffix = _damaged(data.draw, content, fmt)
    path = tmp_path / f"input{suffix}"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own words on damaged metadata
        expected = _reference(path)
        try:
            with Image.open(io.BytesIO(content)) as image:
                animated = getattr(image, "n_frames", 1) > 1
        except Exception:  # noqa: BLE001 (not an image Pillow can count frames of)
            animated = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = ImageProcessor()([str(path)])
        except (ValueError, FileNotFoundError) as e:
            assert re.search(re.escape(str(path)), str(e)), f"the error does not name the file: {e}"
            return
    assert not animated, "an animated image was encoded as its first frame"
    assert expected is not None, "an image the reference cannot read was encoded"
    assert torch.equal(out.pixel_values, expected)
    deep = [w for w in caught if issubclass(w.category, ImageWarning)]
    with Image.open(path) as image:
        assert bool(deep) == (image.mode in ("I;16", "I", "F")), [str(w.message) for w in caught]


@given(data=st.data(), spec=images)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_files_through_the_python_api_keep_the_reference_parity_for_images(tmp_path, data, spec):
    """An undamaged image, opened by the caller: the reference's bits whatever its mode."""
    mode, width, height, seed = spec
    content, _ = _image_bytes(mode, width, height, seed)
    with Image.open(io.BytesIO(content)) as image, warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageWarning)
        image.load()
        assert torch.equal(ImageProcessor().batch([image]).pixel_values, reference_preprocess([image]).pixel_values)


arrays = st.tuples(
    st.sampled_from([np.uint8, np.uint16, np.int64, np.float32, np.bool_]),
    st.lists(st.integers(0, 20), min_size=1, max_size=5),
    st.booleans(),  # a strided view instead of a fresh array
)


@given(spec=arrays)
def test_arrays(spec):
    dtype, shape, strided = spec
    array = np.random.default_rng(len(shape)).integers(0, 255, [2 * s if strided else s for s in shape]).astype(dtype)
    if strided:
        array = array[tuple(slice(None, None, 2) for _ in shape)]
    valid = dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3 and min(array.shape) > 0
    try:
        out = ImageProcessor().batch([array])
    except (TypeError, ValueError) as e:
        assert not valid, f"a valid array refused: {e}"
        assert "items[0]" in str(e), str(e)
        return
    assert valid, f"a {dtype.__name__} array of shape {array.shape} was accepted"
    assert torch.equal(out.pixel_values, reference_preprocess([array]).pixel_values)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init-checkpoint", str(path), "--tiny", "--dtype", "float32"]) == 0
    return path


@given(data=st.data(), spec=images)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_command_line_skips_a_bad_image_and_keeps_what_was_written(tmp_path, ckpt, capsys, data, spec):
    """A damaged image beside a good one, into a directory holding an earlier run's output: the good output
    stays, the bad input is named (exit 1) or encoded (exit 0); never a traceback."""
    run = Path(tempfile.mkdtemp(dir=tmp_path))
    inputs = run / "in"
    inputs.mkdir()
    Image.fromarray(np.full((20, 30, 3), 120, dtype=np.uint8)).save(inputs / "good.png")
    out = run / "out"
    assert main(["encode", str(inputs), "--model", str(ckpt), "--out-dir", str(out), "-q"]) == 0
    before = (out / next(f for f in json.loads((out / "index.json").read_text())["inputs"].values())).read_bytes()
    mode, width, height, seed = spec
    content, suffix = _damaged(data.draw, *_image_bytes(mode, width, height, seed))
    (inputs / f"bad{suffix}").write_bytes(content)
    capsys.readouterr()
    rc = main(["encode", str(inputs), "--model", str(ckpt), "--out-dir", str(out), "--resume", "-q"])
    err = capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    good = next(n for n in index["inputs"] if n.endswith("good.png"))
    assert (out / index["inputs"][good]).read_bytes() == before
    if rc == 1:
        (bad,) = index["failed"]
        assert bad.endswith(f"bad{suffix}") and f"skipped {bad}: " in err
    else:
        assert rc == 0 and len(index["inputs"]) == 2
        for file in index["inputs"].values():
            load_file(out / file)
