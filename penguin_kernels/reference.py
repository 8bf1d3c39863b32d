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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim, statistics in float32.

    float64 inputs keep float64 statistics, so float64 runs (gradient checks) are exact.
    """
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in the input dtype), returns ``(rms_norm(s), s)``."""
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
    device = grid_sizes.device
    positions = []
    seqlens = []
    for (t, h, w), m in zip(grid_sizes.tolist(), merge_sizes.tolist(), strict=True):
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
    hd = x.shape[-1]
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
    n, h, hd = q.shape
    kv = k.shape[1]
    scale = hd**-0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
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
    y = F.linear(x, weight, bias)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``down(silu(x Wg^T) * (x Wu^T)) (+ residual)`` with ``w_gate_up = cat([Wg, Wu])`` ``[2I, D]``."""
    y = F.linear(swiglu(F.linear(x, w_gate_up)), w_down)
    return y if residual is None else residual + y


def projector_mlp(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """Penguin-VL's projector: ``W2 gelu(W1 x + b1) + b2`` with the exact (erf) GELU."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
