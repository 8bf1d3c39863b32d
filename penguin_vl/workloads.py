"""Benchmark workloads of SPEC section 7, so that every benchmark and profile measures the same shapes.

A :class:`Workload` is a packed batch as the encoder sees it: one ``(t, h, w)`` grid in patches and
one merge size per item. Attention runs over one segment per frame (``h * w`` tokens), so the
segment lengths, the token count and the FLOP counts follow from the grids alone.

=============  =========================================================  ===========
name           items                                                      tokens
=============  =========================================================  ===========
``latency``    1 image, grid (1, 32, 32)                                  1,024
``image_mix``  8 images sized by the released processor (see below)     52,051
``batch64k``   64 images, grid (1, 32, 32)                                65,536
``long``       1 image, grid (1, 128, 128)                                16,384
``video``      180 frames, grid (1, 16, 24), merge 2                      69,120
=============  =========================================================  ===========

``image_mix`` uses the grids the released preprocessor gives each picture on its own (merge 1:
factor 14, min 16 and max 16384 tokens), from :func:`released_image_grid`. Sizes are read as
height x width in pixels; the token count does not depend on that choice::

    1080x1920 -> (77, 137)   1024x768 -> (73, 55)   768x1024 -> (55, 73)    720x1280 -> (51, 91)
    1200x1600 -> (86, 114)   448x448 -> (32, 32)    1536x2048 -> (108, 144) 600x800 -> (43, 57)

:func:`uniform` builds synthetic workloads of equal segments for kernel sweeps, and
:func:`make_inputs` builds the packed encoder inputs (``pixel_values``, ``grid_sizes``,
``merge_sizes``) of a workload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "WORKLOADS",
    "EncoderInputs",
    "Workload",
    "get",
    "make_inputs",
    "released_image_grid",
    "uniform",
]

PATCH_SIZE = 14
# Released preprocessor settings (SPEC section 5): 16 to 16384 tokens of 14 x 14 pixels per image.
_MIN_TOKENS = 16
_MAX_TOKENS = 16384


@dataclass(frozen=True)
class Workload:
    """A packed batch of items: ``grid_sizes[i] = (t, h, w)`` in patches, ``merge_sizes[i] = m``."""

    name: str
    grid_sizes: tuple[tuple[int, int, int], ...]
    merge_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        grids = tuple(tuple(int(v) for v in g) for g in self.grid_sizes)
        merges = tuple(int(m) for m in self.merge_sizes)
        object.__setattr__(self, "grid_sizes", grids)
        object.__setattr__(self, "merge_sizes", merges)
        if not grids:
            raise ValueError(f"workload {self.name!r}: grid_sizes is empty")
        if len(grids) != len(merges):
            raise ValueError(f"workload {self.name!r}: {len(grids)} grid_sizes but {len(merges)} merge_sizes")
        for g, m in zip(grids, merges, strict=True):
            if len(g) != 3 or min(g) < 1 or m < 1:
                raise ValueError(f"workload {self.name!r}: bad grid {g} or merge size {m}")
            if g[1] % m or g[2] % m:
                raise ValueError(f"workload {self.name!r}: grid {g} is not divisible by merge size {m}")

    @property
    def items(self) -> int:
        return len(self.grid_sizes)

    @property
    def frames(self) -> int:
        """Number of frames, which is the number of attention segments."""
        return sum(t for t, _, _ in self.grid_sizes)

    @property
    def seqlens(self) -> tuple[int, ...]:
        """Attention segment lengths, one per frame, in packing order."""
        return tuple(h * w for t, h, w in self.grid_sizes for _ in range(t))

    @property
    def tokens(self) -> int:
        """Encoder input tokens ``N`` (rows of ``pixel_values``)."""
        return sum(self.seqlens)

    @property
    def output_tokens(self) -> int:
        """Tokens after the per-frame merge: ``sum t * (h / m) * (w / m)``."""
        return sum(t * (h // m) * (w // m) for (t, h, w), m in zip(self.grid_sizes, self.merge_sizes, strict=True))

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    def cu_seqlens(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int32 ``[frames + 1]`` cumulative segment lengths, as the attention kernels take them."""
        lens = torch.tensor((0, *self.seqlens), dtype=torch.int64)
        return lens.cumsum(0).to(dtype=torch.int32, device=device)

    def attention_flops(self, heads: int, head_dim: int) -> int:
        """FLOPs of one bidirectional attention layer: ``4 * sum(L_i^2) * heads * head_dim``."""
        return 4 * sum(L * L for L in self.seqlens) * heads * head_dim

    def gemm_flops(
        self, hidden: int = 1024, heads: int = 16, kv_heads: int = 8, head_dim: int = 128, inter: int = 3072
    ) -> int:
        """Projection and MLP FLOPs of one layer (q/k/v, o, gate/up/down), SPEC section 7."""
        per_token = 2 * hidden * (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim * hidden + 6 * hidden * inter
        return per_token * self.tokens

    def encoder_flops(
        self,
        layers: int = 28,
        hidden: int = 1024,
        heads: int = 16,
        kv_heads: int = 8,
        head_dim: int = 128,
        inter: int = 3072,
        patch_dim: int = 3 * PATCH_SIZE**2,
    ) -> int:
        """Matmul FLOPs of a full encoder forward: patch embedding + ``layers`` x (GEMMs + attention).

        Norms, rotary and the merge are memory-bound and left out; defaults are the released dims.
        """
        per_layer = self.gemm_flops(hidden, heads, kv_heads, head_dim, inter) + self.attention_flops(heads, head_dim)
        return 2 * patch_dim * hidden * self.tokens + layers * per_layer

    def describe(self) -> str:
        return (
            f"{self.name}: {self.items} items, {self.frames} frames, {self.tokens} tokens "
            f"(max segment {self.max_seqlen}), {self.output_tokens} after merge"
        )


def released_image_grid(height: int, width: int) -> tuple[int, int, int]:
    """Patch grid ``(1, h, w)`` the released preprocessor gives one image of ``height x width`` pixels.

    SPEC section 5 step 1 for a single frame at merge size 1 (factor 14). ``penguin_vl.processor``
    holds the full rule (merge sizes, frame types); this is the one case the workloads need.
    """
    factor = PATCH_SIZE
    min_pixels = _MIN_TOKENS * factor**2 * 1.5
    max_pixels = _MAX_TOKENS * factor**2 * 0.95
    area = height * width
    if area > max_pixels:
        area = max(max_pixels, min_pixels)
    ratio = height / width
    w = math.sqrt(area / ratio)
    h = w * ratio
    rows = max(round(h / factor), 1)
    cols = max(round(w / factor), 1)
    if rows * cols * factor**2 < min_pixels:
        w = math.sqrt(min_pixels / ratio)
        h = w * ratio
        rows = math.ceil(h / factor)
        cols = math.ceil(w / factor)
    return (1, rows, cols)


def _grid_for_length(seqlen: int) -> tuple[int, int, int]:
    # The most square h x w = seqlen keeps rotary positions image-like.
    h = max(d for d in range(1, math.isqrt(seqlen) + 1) if seqlen % d == 0)
    return (1, h, seqlen // h)


def uniform(seqlen: int, total_tokens: int, *, name: str | None = None) -> Workload:
    """``total_tokens // seqlen`` single-frame items of ``seqlen`` tokens each (at least one item)."""
    if seqlen < 1 or total_tokens < 1:
        raise ValueError(f"uniform: seqlen and total_tokens must be positive, got {seqlen}, {total_tokens}")
    count = max(1, total_tokens // seqlen)
    grid = _grid_for_length(seqlen)
    return Workload(name or f"uniform_{seqlen}x{count}", (grid,) * count, (1,) * count)


_IMAGE_MIX_PIXELS = (
    (1080, 1920),
    (1024, 768),
    (768, 1024),
    (720, 1280),
    (1200, 1600),
    (448, 448),
    (1536, 2048),
    (600, 800),
)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("latency", ((1, 32, 32),), (1,)),
        Workload(
            "image_mix",
            tuple(released_image_grid(h, w) for h, w in _IMAGE_MIX_PIXELS),
            (1,) * len(_IMAGE_MIX_PIXELS),
        ),
        Workload("batch64k", ((1, 32, 32),) * 64, (1,) * 64),
        Workload("long", ((1, 128, 128),), (1,)),
        Workload("video", ((1, 16, 24),) * 180, (2,) * 180),
    )
}


def get(name: str) -> Workload:
    """A registered workload by name, with the known names in the error."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


@dataclass(frozen=True)
class EncoderInputs:
    """Packed encoder inputs: ``pixel_values [N, C*p*p]``, ``grid_sizes [B, 3]``, ``merge_sizes [B]``."""

    pixel_values: torch.Tensor
    grid_sizes: torch.Tensor
    merge_sizes: torch.Tensor


def make_inputs(
    workload: Workload,
    *,
    patch_dim: int = 3 * PATCH_SIZE**2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> EncoderInputs:
    """Random ``pixel_values`` in [-1, 1] (the normalised pixel range) and the grids of ``workload``.

    ``grid_sizes``/``merge_sizes`` are int64 like the preprocessor's; the values come from a seeded
    CPU generator so every device sees the same inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(workload.tokens, patch_dim, generator=gen, dtype=torch.float32).mul_(2).sub_(1)
    return EncoderInputs(
        pixel_values=pixels.to(device=device, dtype=dtype),
        grid_sizes=torch.tensor(workload.grid_sizes, dtype=torch.int64, device=device),
        merge_sizes=torch.tensor(workload.merge_sizes, dtype=torch.int64, device=device),
    )
