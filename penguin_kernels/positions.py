"""Where each token sits: the ``(row, col)`` positions the 2D rotary reads, and the per-frame segments.

:func:`rope_positions` builds the ``(row, col)`` of every token and the per-frame ``cu_seqlens`` on the
device with a fixed number of vectorised torch ops (no loop over items or frames);
:func:`check_grid_sizes` is the one check of a batch's ``grid_sizes`` and ``merge_sizes`` metadata.
"""

from __future__ import annotations

import torch

__all__ = ["check_grid_sizes", "rope_positions"]


def check_grid_sizes(grid_sizes: object, merge_sizes: object) -> None:
    """``grid_sizes`` ``[B, 3]`` and ``merge_sizes`` ``[B]`` are integer tensors on one device.

    Metadata only (no host read); :func:`rope_positions` also checks the values.
    """
    for t, name in ((grid_sizes, "grid_sizes"), (merge_sizes, "merge_sizes")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype; got {t.dtype}")
    if grid_sizes.dim() != 2 or grid_sizes.shape[1] != 3:
        raise ValueError(f"grid_sizes must be [B, 3] (t, h, w) per item; got shape {tuple(grid_sizes.shape)}")
    if merge_sizes.shape != (grid_sizes.shape[0],):
        raise ValueError(
            f"merge_sizes must be [B] = [{grid_sizes.shape[0]}], one per item; got {tuple(merge_sizes.shape)}"
        )
    if merge_sizes.device != grid_sizes.device:
        raise ValueError(
            f"merge_sizes is on {merge_sizes.device}, grid_sizes on {grid_sizes.device}; they must match",
        )


def _bad_items(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    m_safe = torch.where(m > 0, m, 1)
    return (t <= 0) | (h <= 0) | (w <= 0) | (m <= 0) | (h % m_safe != 0) | (w % m_safe != 0)


def _raise_bad_item(grid_sizes: torch.Tensor, merge_sizes: torch.Tensor, bad: torch.Tensor) -> None:
    i = int(bad.nonzero()[0, 0])
    (t, h, w), m = grid_sizes[i].tolist(), int(merge_sizes[i])
    raise ValueError(
        f"item {i}: grid_sizes (t, h, w) = ({t}, {h}, {w}) with merge_sizes {m}: t, h, w and the merge "
        "size must be positive, and h and w multiples of the merge size"
    )


def rope_positions(
    grid_sizes: torch.Tensor,
    merge_sizes: torch.Tensor,
    *,
    total_tokens: int | None = None,
    num_frames: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(row, col)`` positions and per-frame ``cu_seqlens`` of a packed batch, on the device.

    Same result as :func:`penguin_kernels.reference.rope_positions`, built with a fixed number of
    vectorised torch ops on the device of ``grid_sizes`` whatever the number of items and frames.

    Args:
        grid_sizes: ``[B, 3]`` integer ``(t, h, w)`` per item, in patches.
        merge_sizes: ``[B]`` integer, same device; ``h`` and ``w`` must be multiples of it.
        total_tokens: ``sum t*h*w``, if the caller knows it (e.g. from ``pixel_values.shape[0]``).
        num_frames: ``sum t``, if the caller knows it.

    Without the two hints, the values of the inputs are validated and ``N`` and the frame count read
    back in one device-to-host copy (a sync when the inputs are on a GPU). With both hints there is no
    sync (CUDA-graph capturable); the values are then validated only for CPU inputs, where reading them
    is free, and on a GPU the hints and inputs are trusted: wrong ones give wrong positions, never an
    out-of-bounds access.

    Returns:
        ``positions`` int32 ``[N, 2]`` in merge-block order (each frame of a clip repeats its first
        frame's), ``cu_seqlens`` int32 ``[frames + 1]``.
    """
    check_grid_sizes(grid_sizes, merge_sizes)
    if (total_tokens is None) != (num_frames is None):
        raise ValueError("pass both total_tokens and num_frames, or neither")
    device = grid_sizes.device
    g = grid_sizes.to(torch.int64)
    m = merge_sizes.to(torch.int64)
    t, h, w = g.unbind(1)
    if total_tokens is None or device.type == "cpu":
        bad = _bad_items(t, h, w, m)
        n, frames, any_bad = torch.stack([(t * h * w).sum(), t.sum(), bad.any().long()]).tolist()
        if any_bad:
            _raise_bad_item(grid_sizes, merge_sizes, bad)
        if total_tokens is not None and (total_tokens, num_frames) != (n, frames):
            raise ValueError(
                f"total_tokens={total_tokens}, num_frames={num_frames} disagree with grid_sizes "
                f"({n} tokens in {frames} frames)"
            )
    else:
        n, frames = int(total_tokens), int(num_frames)
        if n < 0 or frames < 0:
            raise ValueError(f"total_tokens and num_frames must be non-negative; got {n}, {frames}")
    if n >= 2**31:
        raise ValueError(f"{n} tokens do not fit the int32 cu_seqlens")
    cu_seqlens = torch.zeros(frames + 1, dtype=torch.int32, device=device)
    if n == 0 or frames == 0 or g.shape[0] == 0:
        return torch.zeros(0, 2, dtype=torch.int32, device=device), cu_seqlens

    # Every frame -> its item, by searching the running frame count; indices are clamped so that
    # untrusted hints cannot index out of range.
    last = g.shape[0] - 1
    frame = torch.arange(frames, device=device)
    item_of_frame = torch.searchsorted(t.cumsum(0), frame, right=True).clamp_(max=last)
    frame_ends = (h * w)[item_of_frame].cumsum(0)
    cu_seqlens[1:] = frame_ends

    token = torch.arange(n, device=device)
    frame_of_token = torch.searchsorted(frame_ends, token, right=True).clamp_(max=frames - 1)
    local = token - (frame_ends - (h * w)[item_of_frame])[frame_of_token]
    item = item_of_frame[frame_of_token]
    mt = m[item]
    cols_merged = (w // m)[item]
    # SPEC section 3: local = block * m^2 + (row % m) * m + col % m, block = (row // m) * (w // m) + col // m
    block, r = local // (mt * mt), local % (mt * mt)
    row = (block // cols_merged) * mt + r // mt
    col = (block % cols_merged) * mt + r % mt
    return torch.stack([row, col], dim=1).to(torch.int32), cu_seqlens
