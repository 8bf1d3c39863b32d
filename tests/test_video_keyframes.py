"""Key-frame typing against the reference's extract_ki_frames (all frames resized at once, both frames
converted to HSV again at every comparison; with OpenCV's HSV where it is installed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from penguin_vl import _native
from penguin_vl.video import KeyFrameTyper, _compiled, rgb_to_hsv
from penguin_vl.video.keyframes import _resize_taps, _torch_sums_taps_as_kernel, key_frame_size
from penguin_vl.video.reference import reference_frame_types, reference_smart_resize
from tests.video_samples import picture


def test_hsv_equals_opencv_for_every_colour() -> None:
    cv2 = pytest.importorskip("cv2")
    code = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([code >> 16, (code >> 8) & 255, code & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    assert np.array_equal(rgb_to_hsv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))


@pytest.mark.parametrize(
    ("height", "width"),
    [(240, 320), (342, 608), (1080, 1920), (2160, 3840), (7, 5), (13, 1000), (1, 150), (55, 97), (14, 14), (3, 600)],
)
def test_key_frame_size_is_smart_resize(height: int, width: int) -> None:
    assert key_frame_size(height, width) == reference_smart_resize(height, width, 14, 1960, 10240 * 196)


def test_absurd_aspect_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        key_frame_size(2, 401)
    with pytest.raises(ValueError, match="Aspect ratio"):
        reference_smart_resize(2, 401, 14, 1960, 10240 * 196)


def typed(frames: np.ndarray) -> np.ndarray:
    typer = KeyFrameTyper(*frames.shape[1:3])
    return np.array([typer.add(f) for f in frames], dtype=np.int32)


def clip(n: int, height: int, width: int) -> np.ndarray:
    return np.stack([picture(i, n, height, width) for i in range(n)])


@pytest.mark.parametrize(("n", "height", "width"), [(24, 72, 96), (18, 55, 97), (12, 150, 200), (9, 31, 400)])
def test_scene_cuts_and_fades_match_reference(n: int, height: int, width: int) -> None:
    frames = clip(n, height, width)
    types = typed(frames)
    assert np.array_equal(types, reference_frame_types(frames))
    assert types[0] == 0 and 0 < types.sum() < n - 1  # cuts make key frames, still stretches do not


def test_noise_dark_and_black_frames_match_reference() -> None:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (60, 84, 3), dtype=np.uint8)
    frames = [base]
    for step in range(1, 16):
        noisy = base.astype(np.int64) + rng.integers(-4 * step, 4 * step + 1, base.shape)
        frames.append(noisy.clip(0, 255).astype(np.uint8))
    frames += [np.zeros_like(base)] * 3  # black: every patch pair is left out, the mean is nan
    dim = np.zeros_like(base)
    dim[:14] = 3
    frames += [dim, base]
    frames = np.stack(frames)
    assert np.array_equal(typed(frames), reference_frame_types(frames))


def test_similarity_threshold_edges_match_reference() -> None:
    # grey replacing saturated blue block by block: the share of similar patches falls through 0.95
    rng = np.random.default_rng(3)
    texture = rng.integers(0, 40, (84, 112, 1))
    a = (np.array([0, 20, 215]) + texture).astype(np.uint8)
    b = (np.array([160, 160, 160]) + texture).astype(np.uint8)
    mask = np.kron(rng.random((6, 8)), np.ones((14, 14)))[..., None]
    frames = np.stack([np.where(mask < t, b, a) for t in np.linspace(0, 1, 40)])
    types = typed(frames)
    assert np.array_equal(types, reference_frame_types(frames))
    assert 0 < types.sum() < len(frames) - 1


@pytest.mark.parametrize(
    ("height", "width"),
    [(342, 608), (480, 854), (72, 96), (70, 98), (70, 100), (72, 98), (55, 97), (1080, 1920), (13, 300), (9, 17)]
    + [(2160, 3840), (150, 7), (40, 1000), (1000, 40)],
)
def test_compiled_patches_equal_torch_path(monkeypatch: pytest.MonkeyPatch, height: int, width: int) -> None:
    # 2160x3840 halves both sides (five taps: the horizontal pass leaves its permutes for the lanes);
    # a frame seven pixels wide has too few values a row for the permutes
    compiled = KeyFrameTyper(height, width)
    if compiled._lib is None:
        pytest.skip("no C compiler: only the torch path runs here")
    with monkeypatch.context() as env:
        env.setenv("PENGUIN_VL_NATIVE", "0")
        fallback = KeyFrameTyper(height, width)
    assert fallback._lib is None
    rng = np.random.default_rng(height * width)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8), picture(5, 9, height, width)]
    frames.append(np.asarray(frames[1][:, ::-1]))  # a strided view
    for frame in frames:
        assert torch.equal(compiled._patches(frame), fallback._patches(frame))


def identity_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weights read off by resizing the identity (every input an impulse of its own)."""
    eye = torch.eye(size_in)[None, None]
    weights = F.interpolate(eye, (size_in, size_out), mode="bilinear", antialias=True)[0, 0].T.numpy()
    nonzero = weights != 0
    first = nonzero.argmax(axis=1)
    count = size_in - nonzero[:, ::-1].argmax(axis=1) - first
    padded = np.zeros((size_out, int(count.max())), dtype=np.float32)
    for j, (f, c) in enumerate(zip(first.tolist(), count.tolist(), strict=True)):
        padded[j, :c] = weights[j, f : f + c]
    return first, count, padded


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [(608, 602), (342, 336), (480, 476), (854, 854), (17, 56), (9, 42), (3840, 1890), (2160, 1064), (1000, 14)]
    + [(5, 700), (1, 14), (300, 294), (97, 98), (1920, 1918), (29, 14)],
)
def test_comb_taps_equal_identity_taps(size_in: int, size_out: int) -> None:
    for got, want in zip(_resize_taps(size_in, size_out), identity_taps(size_in, size_out), strict=True):
        assert np.array_equal(got, want)


def test_this_torch_sums_taps_as_the_kernel() -> None:
    # the premise of the compiled resize on this machine (else every frame would take torch's resize)
    assert _torch_sums_taps_as_kernel()
    assert not KeyFrameTyper(342, 608)._torch_resize and not KeyFrameTyper(2160, 3840)._torch_resize
    assert KeyFrameTyper(4320, 7680)._torch_resize  # an 8K frame: seven to nine taps an output


@pytest.mark.parametrize("level", ["plain C", "AVX2", "AVX-512"])
def test_every_vector_level_gives_the_same_patches(monkeypatch: pytest.MonkeyPatch, tmp_path, level: str) -> None:
    # the kernel has a plain path, an AVX2 path and an AVX-512 one; the default build runs only the
    # widest this CPU has, so each is built here on its own and checked against the torch path
    flags = {"plain C": [], "AVX2": ["-mavx2", "-mfma"]}
    flags["AVX-512"] = flags["AVX2"] + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    needs = {"plain C": (), "AVX2": ("AVX2", "AVX512"), "AVX-512": ("AVX512",)}[level]
    if _compiled.library() is None:
        pytest.skip("no C compiler: only the torch path runs here")
    if needs and torch.backends.cpu.get_cpu_capability() not in needs:
        pytest.skip(f"this CPU does not run {level}")
    monkeypatch.setenv("PENGUIN_VL_CACHE_DIR", str(tmp_path))
    base = ["-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off"]
    monkeypatch.setattr(_native, "_flags", lambda: [*base, *flags[level]])
    monkeypatch.setattr(_compiled, "_library", _compiled._build())
    rng = np.random.default_rng(11)
    # 1440x2560 is scaled by 1.36: windows too wide for the permutes, so its rows go through the lanes
    for height, width in [(342, 608), (480, 854), (1440, 2560), (9, 17), (150, 7), (14, 14), (2160, 3840)]:
        compiled = KeyFrameTyper(height, width)
        with monkeypatch.context() as env:
            env.setenv("PENGUIN_VL_NATIVE", "0")
            fallback = KeyFrameTyper(height, width)
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        assert torch.equal(compiled._patches(frame), fallback._patches(frame))


def test_compiled_hsv_equals_numpy_for_every_colour() -> None:
    # 1400 x 1400 frames keep their size (no resize), so the patches are the HSV of the pixels themselves
    typer = KeyFrameTyper(1400, 1400)
    if typer._lib is None:
        pytest.skip("no C compiler: only the torch path runs here")
    code = np.arange(9 * 1400 * 1400, dtype=np.uint32) % 2**24
    frames = np.stack([code >> 16, (code >> 8) & 255, code & 255], axis=-1).astype(np.uint8).reshape(9, 1400, 1400, 3)
    for frame in frames:
        cut = typer._hsv_patches(frame).reshape(100, 100, 3, 14, 14)
        planes = cut.transpose(2, 0, 3, 1, 4).reshape(3, 1400, 1400)
        assert np.array_equal(planes, rgb_to_hsv(frame).transpose(2, 0, 1))


def drifting_frames(n: int, height: int, width: int, seed: int) -> np.ndarray:
    # grey replacing saturated blue block by block: patch cosines on both sides of 0.7
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 40, (height, width, 1))
    a = (np.array([0, 20, 215]) + texture).astype(np.uint8)
    b = (np.array([160, 160, 160]) + texture).astype(np.uint8)
    mask = np.kron(rng.random((height // 14 + 1, width // 14 + 1)), np.ones((14, 14)))[:height, :width, None]
    return np.stack([np.where(mask < t, b, a) for t in np.linspace(0, 1, n)])


@pytest.mark.parametrize("decided", [None, 1.0], ids=["integers", "every-patch-by-torch"])
def test_integer_decisions_equal_torch_ops(monkeypatch: pytest.MonkeyPatch, decided: float | None) -> None:
    if decided is not None:  # every patch counted as close to the threshold: all take the torch rows
        monkeypatch.setattr("penguin_vl.video.keyframes._DECIDED", decided)
    frames = np.concatenate([drifting_frames(40, 84, 112, 3), drifting_frames(25, 84, 112, 8)[::-1]])
    compiled = typed(frames)
    with monkeypatch.context() as env:
        env.setenv("PENGUIN_VL_NATIVE", "0")
        fallback = typed(frames)
    assert np.array_equal(compiled, fallback)
    assert np.array_equal(compiled, reference_frame_types(frames))
    assert 0 < compiled.sum() < len(frames) - 1
