"""Key and intermediate frames (TRA) as the reference types them, each frame processed once.

The reference (``extract_ki_frames``, SPEC section 8.4) resizes the kept frames with torch's
antialiased bilinear interpolation to a multiple of 14 pixels, truncates them to uint8, converts
them to HSV as OpenCV does for uint8 RGB, and cuts them into 14 x 14 patches of 588 values. Walking
forward from frame 0 (a key frame), a frame whose share of similar patches with the last key frame
is below 0.95 is the next key frame; a patch pair is similar when its cosine exceeds 0.7, and pairs
where both patches are near black are left out.

The reference converts and cuts the last key frame again at every comparison and holds every
frame resized at once. Here each frame is resized, converted and cut once, as it arrives, and only
the last key frame's normalised patches are kept: bounded memory, and the frames stream from the
decoder. The float32 steps of the comparison (norm, the two divisions, the sum over the patch, the
mean) are the reference's torch calls on tensors of the reference's shapes, so the float results,
and with them the decisions, are the reference's. OpenCV's fixed-point RGB to HSV is reproduced in
numpy (exact for all 2^24 colours; the tests check every one against OpenCV).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from penguin_vl.video import _compiled

__all__ = ["KeyFrameTyper", "key_frame_size", "rgb_to_hsv"]

PATCH = 14
MIN_PIXELS = 10 * PATCH * PATCH
MAX_PIXELS = 10240 * PATCH * PATCH
MAX_ASPECT = 200
PATCH_SIMILAR = 0.7  # cosine above which two patches count as similar
FRAME_SIMILAR = 0.95  # share of similar patches below which a frame starts a new key frame
_EPS = 1e-8
_NEAR_BLACK = 0.01
# how far the reference's float32 cosine can be from the exact one: 588 units in the last place
# (2^-24 each) for its norms' sums, the same for its cosine's sum, a few for the divisions; twice that
_DECIDED = 2 * 3 * 588 * 2.0**-24

_HSV_SHIFT = 12
_HALF = 1 << (_HSV_SHIFT - 1)


def _hsv_tables() -> tuple[np.ndarray, np.ndarray]:
    # OpenCV's fixed-point reciprocals (saturate_cast rounds to nearest; no entry is a tie), and the
    # same arithmetic folded into lookups for numpy: S by (V, max - min), H by (hue numerator + 255,
    # max - min), wrapped to 0..179
    i = np.arange(1, 256)
    sdiv = np.concatenate([[0], np.round((255 << _HSV_SHIFT) / i)]).astype(np.int64)
    hdiv = np.concatenate([[0], np.round((180 << _HSV_SHIFT) / (6 * i))]).astype(np.int64)
    diff = np.arange(256)
    s = (diff[None, :] * sdiv[:, None] + _HALF) >> _HSV_SHIFT
    h = (np.arange(-255, 5 * 255 + 1)[:, None] * hdiv[None, :] + _HALF) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return s.astype(np.uint8).ravel(), h.astype(np.uint8).ravel()


_S_TABLE, _H_TABLE = _hsv_tables()


def key_frame_size(height: int, width: int) -> tuple[int, int]:
    """The reference's ``smart_resize(height, width, 14, 10 * 14**2, 10240 * 14**2)`` for key-frame typing."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"a {width}x{height} frame has an aspect ratio over {MAX_ASPECT}, which the reference refuses")
    h = max(PATCH, round(height / PATCH) * PATCH)
    w = max(PATCH, round(width / PATCH) * PATCH)
    if h * w > MAX_PIXELS:
        scale = math.sqrt(height * width / MAX_PIXELS)
        h = math.floor(height / scale / PATCH) * PATCH
        w = math.floor(width / scale / PATCH) * PATCH
    elif h * w < MIN_PIXELS:
        scale = math.sqrt(MIN_PIXELS / (height * width))
        h = math.ceil(height * scale / PATCH) * PATCH
        w = math.ceil(width * scale / PATCH) * PATCH
    return max(h, PATCH), max(w, PATCH)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's ``cvtColor(rgb, COLOR_RGB2HSV)`` for uint8 ``[..., 3]``: H in 0..179, S and V in 0..255."""
    return np.stack(_hsv_planes(rgb[..., 0], rgb[..., 1], rgb[..., 2]), axis=-1)


def _hsv_planes(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.maximum(np.maximum(r, g), b)
    diff = (v - np.minimum(np.minimum(r, g), b)).astype(np.int32)
    s = _S_TABLE.take((v.astype(np.int32) << 8) | diff)
    r, g, b = r.astype(np.int32), g.astype(np.int32), b.astype(np.int32)
    # OpenCV's hue numerator by the channel holding the maximum (red wins ties, then green)
    numerator = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = _H_TABLE.take(((numerator + 255) << 8) | diff)
    return h, s, v


@functools.lru_cache(maxsize=64)
def _resize_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's antialiased bilinear weights for one axis, read off torch itself: first tap, tap count,
    zero-padded weights per output (kept per size pair, read-only: the videos of a batch mostly share one).

    The input is a set of combs, one per phase, each with a 1 every ``period`` samples; ``period``
    exceeds any output's span of taps, so each output of a comb is one weight times one plus zeros
    (exact), and the phase says which tap it is. ``period`` rows of ``size_in`` values cost far less
    than resizing the identity (``size_in`` rows)."""
    scale = size_in / size_out
    support = max(scale, 1.0)  # the bilinear filter's half-width in input samples
    period = int(2 * support) + 4
    samples = np.arange(size_in)
    combs = torch.zeros(period, size_in)
    combs[torch.from_numpy(samples % period), torch.from_numpy(samples)] = 1.0
    out = F.interpolate(combs[None, :, None], (1, size_out), mode="bilinear", antialias=True)[0, :, 0].numpy()
    # each output's taps lie in [low, low + period): low is at or below torch's first tap
    centre = scale * (np.arange(size_out) + 0.5)
    low = np.maximum(np.floor(centre - support + 0.5).astype(np.int64) - 1, 0)
    index = low[:, None] + (np.arange(period)[None, :] - low[:, None]) % period
    order = np.argsort(index, axis=1)
    index = np.take_along_axis(index, order, axis=1)
    weights = np.take_along_axis(out.T, order, axis=1)
    nonzero = weights != 0
    start = nonzero.argmax(axis=1)
    count = period - nonzero[:, ::-1].argmax(axis=1) - start
    taps = np.arange(int(count.max()))
    picked = np.take_along_axis(weights, np.minimum(start[:, None] + taps, period - 1), axis=1)
    padded = np.where(taps < count[:, None], picked, 0).astype(np.float32)
    first = index[np.arange(size_out), start]
    taps_of_axis = (first.astype(np.int32), count.astype(np.int32), padded)
    for array in taps_of_axis:
        array.flags.writeable = False
    return taps_of_axis


# how torch's compiled loop sums an output's taps (on the torch builds checked): with fused
# multiply-adds up to four taps, with a rounded product and a rounded sum each at five; past five, in
# orders the kernel does not reproduce (such frames, 4x downscales and beyond, are resized by torch)
_FUSED_TAPS = 4
_KERNEL_TAPS = 5


@functools.cache
def _torch_sums_taps_as_kernel() -> bool:
    """Whether this torch's float32 antialiased resize sums taps as the kernel does (a build of its
    CPU kernels without FMA instructions, for one, does not), checked on outputs of two to five taps."""
    row = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 1, 1, 97)).astype(np.float32))
    for size in (89, 60, 50, 40):  # outputs of two to five taps
        first, count, weights = _resize_taps(97, size)
        got = F.interpolate(row, (1, size), mode="bilinear", antialias=True)[0, 0, 0].numpy()
        x = row[0, 0, 0].numpy()
        for j in range(size):
            acc = np.float32(x[first[j]] * weights[j, 0])
            for k in range(1, int(count[j])):
                if count[j] <= _FUSED_TAPS:  # one rounding: the float64 product of two float32 is exact
                    acc = np.float32(np.float64(x[first[j] + k]) * np.float64(weights[j, k]) + np.float64(acc))
                else:
                    acc = np.float32(acc + np.float32(x[first[j] + k] * weights[j, k]))
            if acc != got[j]:
                return False
    return True


def _pointer(array: np.ndarray) -> int:
    return array.ctypes.data


def _share_below(count: int, total: int) -> bool:
    """Whether the reference's share of similar patches, the float32 mean of ``count`` ones and
    ``total - count`` zeros, is below 0.95 (for no patches it is nan, which is not)."""
    if total == 0:
        return False
    if abs(count / total - FRAME_SIMILAR) > 1e-6:  # float32's rounding of the mean is far smaller
        return count / total < FRAME_SIMILAR
    share = torch.zeros(total)
    share[:count] = 1.0
    return share.mean().item() < FRAME_SIMILAR


class KeyFrameTyper:
    """Types frames of one size as they arrive: :meth:`add` returns 0 (key) or 1 (intermediate).

    With the compiled kernel, similarities are decided from exact integer dot products of the HSV
    patches: the reference's float32 cosine is within ``_DECIDED`` of the exact one (each of its ~four
    roundings per term and its sums of 588 terms costs at most 588 units in the last place, 3.5e-5), so
    a patch whose exact cosine is further than that from 0.7 is decided the same way; the few closer
    ones are computed with the reference's torch ops on their rows (a row's norm and sum do not depend
    on the rows beside it). Without the kernel, every patch takes the reference's torch ops.
    """

    def __init__(self, height: int, width: int):
        self.size = key_frame_size(height, width)
        rh, rw = self.size
        self._grid = (rh // PATCH, rw // PATCH)
        self._key: torch.Tensor | np.ndarray | None = None  # last key frame: unit patches (torch) or uint8 patches
        self._key_dark: torch.Tensor | None = None  # its all-black patches (torch path)
        self._product: torch.Tensor | None = None
        self._lib = _compiled.library()
        if self._lib is not None:
            self._h = _resize_taps(width, rw)
            self._v = _resize_taps(height, rh)
            (hf, hc, hw), (vf, vc, vw) = self._h, self._v
            # a frame the kernel cannot resize as torch does is resized by torch, then given to the kernel
            # at its new size (both passes skipped)
            self._torch_resize = max(hw.shape[1], vw.shape[1]) > _KERNEL_TAPS or not _torch_sums_taps_as_kernel()
            in_h, in_w = (rh, rw) if self._torch_resize else (height, width)
            self._frame_size = (in_h, in_w)
            size = self._lib.penguin_keyframe_work_bytes(in_w, rw, hw.shape[1], vw.shape[1])
            self._work = np.empty(size + 64, dtype=np.uint8)
            aligned = -self._work.ctypes.data % 64
            patches = self._grid[0] * self._grid[1]
            # two patch buffers and two norm buffers: one holds the key frame's, the next frame's go in the other
            self._buffers = [np.empty((*self._grid, 3 * PATCH * PATCH), dtype=np.uint8) for _ in range(2)]
            self._norms = [np.empty(patches, dtype=np.int32) for _ in range(2)]
            self._slot = 0
            self._counts = np.empty(2, dtype=np.int64)
            self._close = np.empty(patches, dtype=np.int64)
            # the kernel's fixed arguments, once: each `.ctypes` look-up makes Python objects, and
            # enough of them per frame wake the garbage collector, whose passes over torch's many
            # objects cost more than the kernel
            work = self._work.ctypes.data + aligned
            h_args = (_pointer(hf), _pointer(hc), _pointer(hw), hw.shape[1])
            permute = self._lib.penguin_keyframe_prepare(in_w, rw, *h_args, work)
            self._resize_args = (rh, rw, *h_args, _pointer(vf), _pointer(vc), _pointer(vw), vw.shape[1], work, permute)
            self._pointers = [(_pointer(b), _pointer(n)) for b, n in zip(self._buffers, self._norms, strict=True)]
            self._outputs = (_pointer(self._counts), _pointer(self._close))

    def add(self, frame: np.ndarray) -> int:
        """Type the next frame (uint8 ``[H, W, 3]``)."""
        if self._lib is not None:
            return self._add_exact_integers(frame)
        patches = self._patches(frame)
        norm = torch.norm(patches, p=2, dim=-1, keepdim=True) + _EPS
        dark = norm.squeeze(-1) < _NEAR_BLACK
        if self._key is None:
            # the full-size products live in buffers kept across frames (no page faults per frame)
            self._key, self._product = torch.empty_like(patches), torch.empty_like(patches)
        else:
            # (key / |key| * patch) / |patch|, the reference's order, op for op
            cos = torch.mul(self._key, patches, out=self._product).div_(norm).sum(dim=-1)
            kept = ~(self._key_dark & dark)
            similar = (cos[kept] > PATCH_SIMILAR).float().mean().item()
            if not similar < FRAME_SIMILAR:
                return 1
        torch.div(patches, norm, out=self._key)
        self._key_dark = dark
        return 0

    def _add_exact_integers(self, frame: np.ndarray) -> int:
        slot = self._slot
        key = (None, None) if self._key is None else self._pointers[1 - slot]
        compare = (*key, self._pointers[slot][1], PATCH_SIMILAR, _DECIDED, *self._outputs)
        close_count = self._kernel(frame, self._buffers[slot], compare)
        cut = self._buffers[slot]
        if self._key is None:
            return self._keep_key(cut)
        total, count = self._counts.tolist()
        # the patches near the threshold need the reference's float ops only where they can tip the frame
        if close_count and _share_below(count, total) != _share_below(count + close_count, total):
            close = self._close[:close_count]
            a = torch.from_numpy(self._key.reshape(-1, cut.shape[-1])[close].astype(np.float32))
            b = torch.from_numpy(cut.reshape(-1, cut.shape[-1])[close].astype(np.float32))
            a_norm = torch.norm(a, p=2, dim=-1, keepdim=True) + _EPS
            b_norm = torch.norm(b, p=2, dim=-1, keepdim=True) + _EPS
            count += int(((a / a_norm * b / b_norm).sum(dim=-1) > PATCH_SIMILAR).sum())
        if not _share_below(count, total):
            return 1
        return self._keep_key(cut)

    def _keep_key(self, cut: np.ndarray) -> int:
        self._key = cut
        self._slot = 1 - self._slot
        return 0

    def _hsv_patches(self, frame: np.ndarray) -> np.ndarray:
        """The frame resized, in HSV, as uint8 ``[h / 14, w / 14, 588]`` patches in (c, y, x) order."""
        out = self._buffers[self._slot]
        self._kernel(frame, out, (None, None, None, 0.0, 0.0, None, None))  # no comparison
        return out

    def _kernel(self, frame: np.ndarray, out: np.ndarray, compare: tuple) -> int:
        if self._torch_resize:
            frame = self._torch_resized(frame).transpose(1, 2, 0)
        frame = frame if frame.strides[1:] == (3, 1) else np.ascontiguousarray(frame)
        return self._lib.penguin_keyframe_patches(
            _pointer(frame), frame.strides[0], *self._frame_size, *self._resize_args, _pointer(out), *compare
        )

    def _torch_resized(self, frame: np.ndarray) -> np.ndarray:
        """The reference's resize of one frame, truncated to uint8 ``[3, h, w]``."""
        # the reference resizes float32 NCHW frames; a contiguous single-frame batch gives the same values
        chw = torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1)))[None].float()
        return F.interpolate(chw, self.size, mode="bilinear", antialias=True)[0].numpy().astype(np.uint8)

    def _patches(self, frame: np.ndarray) -> torch.Tensor:
        """The frame resized, in HSV, as float32 ``[h / 14, w / 14, 588]`` patches in (c, y, x) order."""
        gh, gw = self._grid
        if self._lib is not None:
            return torch.from_numpy(self._hsv_patches(frame).astype(np.float32))
        hsv = np.stack(_hsv_planes(*self._torch_resized(frame)))
        cut = hsv.reshape(3, gh, PATCH, gw, PATCH).transpose(1, 3, 0, 2, 4)
        return torch.from_numpy(np.ascontiguousarray(cut, dtype=np.float32).reshape(gh, gw, 3 * PATCH * PATCH))
