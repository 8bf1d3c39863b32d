"""Plain-PyTorch references for every op in ``penguin_kernels``.

This module is the numerical truth: the kernels are tested against it, the benchmarks use it as the
baseline chain, and ``penguin_vl``'s ``backend="torch"`` path is built from it. It runs on any device
and dtype and imports nothing from Triton.

Rounding follows the upstream encoder (Qwen3 layers):

* RMSNorm computes its statistics in float32 and casts the normalised value back to the input dtype
  *before* the weight multiply.
* The 2D rotary computes cos/sin in float32 and casts them to the activation dtype before the
  multiply-adds, which then run in the activation dtype.

The 2D rotary with the half-split (``d`` rotates with the row angle, ``d + hd/2`` with the column
angle, for ``d < hd/2``)::

    out[d]        = x[d]        * cos(row * f[d]) - x[d + hd/2] * sin(row * f[d])
    out[d + hd/2] = x[d + hd/2] * cos(col * f[d]) + x[d]        * sin(col * f[d])
    f[d] = theta ** (-2 d / hd)

The pair ``(d, d + hd/2)`` is not a true rotation when ``row != col``; upstream computes exactly
this, so we do too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "rms_norm_residual",
    "rope_inv_freq",
    "rope_positions",
    "rope_2d",
    "qk_norm_rope_2d",
    "varlen_attention",
    "varlen_attention_op",
    "linear",
    "swiglu",
    "swiglu_mlp",
    "projector_mlp",
]


def _tensor(t: object, name: str, dims: int | None = None, *, integer: bool = False) -> torch.Tensor:
    """``t`` is a floating-point (or ``integer``) tensor with ``dims`` dimensions: checked like the kernels'
    arguments, so that a bad one is named here rather than surfacing as an indexing error or a wrong result."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {str(t.dtype).removeprefix('torch.')}")
    if not integer and not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {str(t.dtype).removeprefix('torch.')}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def _shape(t: torch.Tensor, name: str, expected: tuple[int, ...], why: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected} ({why})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim, statistics in float32.

    float64 inputs keep float64 statistics, so float64 runs (gradient checks) are exact.
    """
    _tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    _shape(_tensor(weight, "weight"), "weight", (x.shape[-1],), "the last dim of x")
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in the input dtype), returns ``(rms_norm(s), s)``."""
    _shape(_tensor(residual, "residual"), "residual", tuple(_tensor(x, "x").shape), "the shape of x")
    s = x + residual
    return rms_norm(s, weight, eps), s


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``theta ** (-2 j / head_dim)`` for ``j < head_dim / 2``, float32, as upstream builds it."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_positions(
    grid_sizes: torch.Tensor,
    merge_sizes: torch.Tensor,
    *,
    total_tokens: int | None = None,
    num_frames: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(row, col)`` positions and per-frame ``cu_seqlens`` for a packed batch.

    grid_sizes: ``[B, 3]`` integer ``(t, h, w)`` per item; merge_sizes: ``[B]``.
    Tokens of a frame are in merge-block order (``SPEC`` section 3); every frame of a clip repeats
    the positions of its first frame. Returns ``positions`` int32 ``[N, 2]`` and ``cu_seqlens`` int32
    ``[frames + 1]``, on the device of ``grid_sizes``. ``total_tokens`` and ``num_frames`` (``sum t*h*w``
    and ``sum t``), when given, are checked against the grid (the kernel twin trusts them on a GPU).
    """
    _tensor(grid_sizes, "grid_sizes", 2, integer=True)
    _tensor(merge_sizes, "merge_sizes", 1, integer=True)
    if grid_sizes.shape[1] != 3:
        raise ValueError(f"grid_sizes must be [B, 3] (t, h, w), got shape {tuple(grid_sizes.shape)}")
    _shape(merge_sizes, "merge_sizes", (grid_sizes.shape[0],), "one per row of grid_sizes")
    items = list(zip(grid_sizes.tolist(), merge_sizes.tolist(), strict=True))
    for i, ((t, h, w), m) in enumerate(items):
        if min(t, h, w, m) < 1 or h % m or w % m:
            raise ValueError(
                f"item {i}: grid_sizes (t, h, w) = {(t, h, w)} with merge_sizes {m}: t, h, w and the merge size "
                "must be positive, and h and w multiples of the merge size"
            )
    device = grid_sizes.device
    positions = []
    seqlens = []
    for (t, h, w), m in items:
        rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
        cols = torch.arange(w, device=device).view(1, w).expand(h, w)
        pos = torch.stack([rows, cols], dim=-1)  # [h, w, 2] raster order
        pos = pos.view(h // m, m, w // m, m, 2).permute(0, 2, 1, 3, 4).reshape(h * w, 2)
        positions.append(pos.repeat(t, 1))
        seqlens += [h * w] * t
    if total_tokens is not None or num_frames is not None:
        hints, actual = (total_tokens, num_frames), (sum(seqlens), len(seqlens))
        if hints != actual:
            raise ValueError(
                f"total_tokens={total_tokens}, num_frames={num_frames} disagree with grid_sizes "
                f"({actual[0]} tokens in {actual[1]} frames)"
            )
    cu_seqlens = torch.zeros(len(seqlens) + 1, dtype=torch.int32, device=device)
    if seqlens:
        cu_seqlens[1:] = torch.tensor(seqlens, device=device).cumsum(0)
    if positions:
        return torch.cat(positions).to(torch.int32), cu_seqlens
    return torch.zeros(0, 2, dtype=torch.int32, device=device), cu_seqlens


def rope_2d(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Apply the half-split 2D rotary to ``x`` ``[N, H, hd]`` at ``positions`` ``[N, 2]`` (row, col)."""
    _tensor(x, "x", 3)
    _shape(_tensor(positions, "positions", 2, integer=True), "positions", (x.shape[0], 2), "(row, col) per row of x")
    hd = x.shape[-1]
    if hd % 2:
        raise ValueError(f"the head dim of x must be even (half rotates with the row, half with the column), got {hd}")
    inv_freq = rope_inv_freq(hd, theta, x.device)
    pos = positions.to(device=x.device, dtype=torch.float32)
    ang_row = pos[:, 0:1] * inv_freq  # [N, hd/2]
    ang_col = pos[:, 1:2] * inv_freq
    ang = torch.cat([ang_row, ang_col], dim=-1)  # [N, hd]
    cos = ang.cos().to(x.dtype)[:, None, :]
    sin = ang.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def qk_norm_rope_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    *,
    theta: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm over ``hd`` then the 2D rotary, for q ``[N, H, hd]`` and k ``[N, KV, hd]``."""
    _tensor(q, "q", 3)
    _tensor(k, "k", 3)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} must be [N, KV, head_dim] with q's N and head_dim {tuple(q.shape)}")
    _shape(_tensor(q_norm_weight, "q_norm_weight"), "q_norm_weight", (q.shape[2],), "the head dim")
    _shape(_tensor(k_norm_weight, "k_norm_weight"), "k_norm_weight", (q.shape[2],), "the head dim")
    q = rope_2d(rms_norm(q, q_norm_weight, eps), positions, theta)
    k = rope_2d(rms_norm(k, k_norm_weight, eps), positions, theta)
    return q, k


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional attention inside each segment of a packed batch.

    q ``[N, H, hd]``, k and v ``[N, KV, hd]`` with ``H % KV == 0`` (query head ``i`` reads KV head
    ``i // (H // KV)``), cu_seqlens ``[S + 1]``. Computes in the dtype of the inputs (pass float32
    copies for a float32 truth). Runs of consecutive equal-length segments are batched into one
    ``scaled_dot_product_attention`` call, so a clip of equal frames costs one call, not one per frame.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(t, name, 3)
    n, h, hd = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != hd:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [N, KV, head_dim] with q's N={n}, hd={hd}")
    kv = k.shape[1]
    if kv == 0 or h % kv:
        raise ValueError(f"q's heads ({h}) must be a positive multiple of k/v's heads ({kv})")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    bounds = _tensor(cu_seqlens, "cu_seqlens", 1, integer=True).tolist()
    decreasing = any(b > e for b, e in zip(bounds[:-1], bounds[1:], strict=True))
    if not bounds or bounds[0] != 0 or bounds[-1] != n or decreasing:
        # rows outside the segments would be returned unwritten
        raise ValueError(f"cu_seqlens must run from 0 to N={n} without decreasing, got {bounds}")
    scale = hd**-0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q)
    lengths = [e - b for b, e in zip(bounds[:-1], bounds[1:], strict=True)]
    i = 0
    while i < len(lengths):
        j = i
        while j + 1 < len(lengths) and lengths[j + 1] == lengths[i]:
            j += 1
        length, count, start = lengths[i], j - i + 1, bounds[i]
        i = j + 1
        if length == 0:
            continue
        end = start + length * count
        qs = q[start:end].reshape(count, length, h, hd).transpose(1, 2)
        ks = k[start:end].reshape(count, length, kv, hd).transpose(1, 2).repeat_interleave(h // kv, dim=1)
        vs = v[start:end].reshape(count, length, kv, hd).transpose(1, 2).repeat_interleave(h // kv, dim=1)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[start:end] = o.transpose(1, 2).reshape(length * count, h, hd)
    return out


def varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """:func:`varlen_attention` with the kernel twin's signature; ``max_seqlen`` is not needed here."""
    return varlen_attention(q, k, v, cu_seqlens, softmax_scale)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias) + residual`` with weight ``[out, in]``, ``act`` the erf GELU when ``gelu``."""
    _check_linear(x, weight, "weight", bias, "bias")
    y = F.linear(x, weight, bias)
    if residual is not None:
        _shape(_tensor(residual, "residual"), "residual", tuple(y.shape), "the shape of the output")
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y


def _check_linear(
    x: object, weight: object, weight_name: str, bias: object = None, bias_name: str = "", source: str = "x"
) -> None:
    """``weight`` ``[out, in]`` maps ``x`` ``[..., in]``; ``bias``, if any, is ``[out]``."""
    _tensor(x, source)
    _tensor(weight, weight_name, 2)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{weight_name} {tuple(weight.shape)} does not take {source} of shape {tuple(x.shape)}")
    if bias is not None:
        _shape(_tensor(bias, bias_name), bias_name, (weight.shape[0],), f"the rows of {weight_name}")


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last dim."""
    if _tensor(gate_up, "gate_up").dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must end in an even dim [..., 2I], got shape {tuple(gate_up.shape)}")
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``down(silu(x Wg^T) * (x Wu^T)) (+ residual)`` with ``w_gate_up = cat([Wg, Wu])`` ``[2I, D]``."""
    _check_linear(x, w_gate_up, "w_gate_up")
    h = swiglu(F.linear(x, w_gate_up))
    _check_linear(h, w_down, "w_down", source="the gated hidden state (w_gate_up's rows / 2)")
    y = F.linear(h, w_down)
    if residual is not None:
        _shape(_tensor(residual, "residual"), "residual", tuple(y.shape), "the shape of the output")
    return y if residual is None else residual + y


def projector_mlp(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """Penguin-VL's projector: ``W2 gelu(W1 x + b1) + b2`` with the exact (erf) GELU."""
    _check_linear(x, w1, "w1", b1, "b1")
    h = F.gelu(F.linear(x, w1, b1))
    _check_linear(h, w2, "w2", b2, "b2", source="the hidden state (w1's rows)")
    return F.linear(h, w2, b2)
