"""The Penguin-VL vision encoder (and projector), read top to bottom.

A Qwen3 transformer made bidirectional: patch embedding -> L x (RMSNorm, GQA attention with per-head
q/k RMSNorm and a 2D rotary, RMSNorm, SwiGLU MLP) -> RMSNorm -> per-frame merge of m x m patches.
A batch is packed: ``pixel_values`` holds every patch of every item, frame after frame, and attention
runs within each frame only (``cu_seqlens``).

There is one forward. Its layers call one ops interface, chosen by the backend: ``penguin_kernels``
(``backend="triton"``) or its plain-PyTorch twin ``penguin_kernels.reference`` (``backend="torch"``,
the numerical truth), with identical signatures. Per layer, on ``x [N, D]``::

    h    = rms_norm(x)
    qkv  = h Wqkv^T                              one GEMM: q/k/v are one fused linear
    q, k = qk_norm_rope_2d(qkv views)            the kernel reads the strided views in place
    a    = varlen_attention_op(q, k, v)          every frame of every item at once, no host sync
    x    = x + a Wo^T                            residual added in the GEMM epilogue
    h2   = rms_norm(x)
    x    = x + (silu(h2 Wg^T) * (h2 Wu^T)) Wd^T  SwiGLU epilogue, then residual epilogue

Adding the residual in the GEMM epilogues moves four [N, D] passes per residual (GEMM read of x and
write of the sum, norm read and write) where a separate output + fused add-and-norm would move five.

q/k/v and gate/up are held fused (``qkv_proj``, ``gate_up_proj``); ``state_dict`` and
``load_state_dict`` speak the released tensor names (:data:`penguin_vl.loading.FUSED_LINEARS`), so
checkpoints keep them. ``forward`` builds the autograd graph whenever grad is enabled; wrap inference in
``torch.inference_mode()``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import penguin_kernels
from penguin_kernels import reference
from penguin_kernels.attention import SUPPORTED_HEAD_DIMS
from penguin_kernels.device import interpreter_active
from penguin_kernels.positions import check_grid_sizes
from penguin_vl.config import PenguinEncoderConfig, ProjectorConfig
from penguin_vl.hub import resolve
from penguin_vl.loading import fuse_linears, load_encoder, split_linears

__all__ = ["PenguinEncoder", "PenguinProjector", "merge_tokens", "check_grid", "packing", "resolve_backend", "ops_for"]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """``"torch"`` or ``"triton"`` for a model on ``device`` with attention heads of ``head_dim``.

    ``"auto"`` is Triton on CUDA when the kernels take ``head_dim`` (64 or 128; the released encoder's is
    128), else torch; ``"triton"`` with a head_dim the kernels do not take is an error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    supported = head_dim is None or head_dim in SUPPORTED_HEAD_DIMS
    if backend == "auto":
        return "triton" if device.type == "cuda" and supported else "torch"
    if backend == "triton" and not supported:
        raise ValueError(
            f"backend='triton' runs attention heads of {SUPPORTED_HEAD_DIMS} dims; this model's are {head_dim} "
            "(backend='torch' or 'auto' run it)"
        )
    if backend == "triton" and device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"backend='triton' needs a CUDA model (this one is on {device}); set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's CPU interpreter"
        )
    return backend


def ops_for(backend: str) -> ModuleType:
    """The ops interface a backend calls: the kernels, or their plain-PyTorch twins."""
    return penguin_kernels if backend == "triton" else reference


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: PenguinEncoderConfig) -> None:
        super().__init__()
        c = config
        self.head_dim, self.q_dim = c.head_dim, c.q_dim
        self.head_split = (c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads)
        self.qkv_heads = sum(self.head_split)
        self.theta, self.eps = c.rope_theta, c.rms_norm_eps
        self.qkv_proj = nn.Linear(c.hidden_size, c.q_dim + 2 * c.kv_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.q_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        ops: ModuleType,
    ) -> torch.Tensor:
        """``residual + attention(h)``."""
        n = h.shape[0]
        qkv_proj, o_proj = self.qkv_proj, self.o_proj  # each submodule looked up once (nn.Module.__getattr__)
        qkv = ops.linear(h, qkv_proj.weight, qkv_proj.bias)
        # one view and one split (views of qkv, read in place) cost less than a slice and a view per head group
        q, k, v = qkv.view(n, self.qkv_heads, self.head_dim).split_with_sizes(self.head_split, 1)
        q, k = ops.qk_norm_rope_2d(
            q, k, self.q_norm.weight, self.k_norm.weight, positions, theta=self.theta, eps=self.eps
        )
        a = ops.varlen_attention_op(q, k, v, cu_seqlens, max_seqlen)
        return ops.linear(a.reshape(n, self.q_dim), o_proj.weight, o_proj.bias, residual=residual)


class MLP(nn.Module):
    def __init__(self, config: PenguinEncoderConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        """``residual + down(silu(gate(h)) * up(h))``."""
        return ops.swiglu_mlp(h, self.gate_up_proj.weight, self.down_proj.weight, residual=residual)


class EncoderLayer(nn.Module):
    def __init__(self, config: PenguinEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.register_state_dict_post_hook(_split_fused)
        self.register_load_state_dict_pre_hook(_fuse_released)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        ops: ModuleType,
    ) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x, ops), x, positions, cu_seqlens, max_seqlen, ops)
        return self.mlp(self.post_attention_layernorm(x, ops), x, ops)


def _split_fused(layer: EncoderLayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    split_linears(state_dict, prefix, layer.config)


def _fuse_released(layer: EncoderLayer, state_dict: dict, prefix: str, *args: object) -> None:
    fuse_linears(state_dict, prefix)


class PatchEmbedding(nn.Module):
    def __init__(self, config: PenguinEncoderConfig) -> None:
        super().__init__()
        p = config.patch_size
        # A Conv2d with kernel = stride = p over one p x p patch is a linear map of the flattened patch.
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, p, stride=p)

    def forward(self, pixel_values: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        w = self.patch_embedding.weight
        return ops.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1), self.patch_embedding.bias)


class Encoder(nn.Module):
    def __init__(self, config: PenguinEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class PenguinProjector(nn.Module):
    """``readout.2(gelu(readout.0(x)))``: Penguin-VL's vision projector, erf GELU."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.readout = nn.Sequential(
            nn.Linear(config.in_dim, config.out_dim),
            nn.GELU(),
            nn.Linear(config.out_dim, config.out_dim),
        )

    def forward(self, x: torch.Tensor, ops: ModuleType = reference) -> torch.Tensor:
        l1, l2 = self.readout[0], self.readout[2]
        return ops.projector_mlp(x, l1.weight, l1.bias, l2.weight, l2.bias)


def check_grid(
    pixel_values: torch.Tensor, grid_sizes: torch.Tensor, merge_sizes: torch.Tensor, patch_dim: int
) -> list[tuple[int, int, int, int]]:
    """Validate a packed batch; returns ``(t, h, w, m)`` per item (one host read of the grid)."""
    if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values must be [N, {patch_dim}], got {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}")
    check_grid_sizes(grid_sizes, merge_sizes)
    items = [(t, h, w, m) for (t, h, w), m in zip(grid_sizes.tolist(), merge_sizes.tolist(), strict=True)]
    for i, (t, h, w, m) in enumerate(items):
        if min(t, h, w, m) < 1:
            raise ValueError(f"item {i}: grid (t, h, w) = {(t, h, w)} and merge {m} must be positive")
        if h % m or w % m:
            raise ValueError(f"item {i}: grid h x w = {h} x {w} is not divisible by the merge size {m}")
    n = sum(t * h * w for t, h, w, _ in items)
    if n != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but the grids hold {n} patches")
    return items


def merge_tokens(x: torch.Tensor, items: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Per frame, resize the (h, w) token grid to (h/m, w/m): bilinear, align_corners=False.

    ``x`` is ``[N, D]`` in merge-block order. For m = 1 this is the identity and for m = 2 the mean of
    each 2 x 2 block, which in block order is each run of 4 consecutive rows.
    """
    out = []
    start = 0
    for t, h, w, m in items:
        n = t * h * w
        xi = x[start : start + n]
        start += n
        if m == 1:
            out.append(xi)
        elif m == 2:
            out.append(xi.view(-1, 4, xi.shape[-1]).mean(dim=1))
        else:
            d = xi.shape[-1]
            grid = xi.view(t, h // m, w // m, m, m, d).permute(0, 5, 1, 3, 2, 4).reshape(t, d, h, w)
            small = F.interpolate(grid, size=(h // m, w // m), mode="bilinear", align_corners=False)
            out.append(small.permute(0, 2, 3, 1).reshape(-1, d))
    # one interpolated item comes out as a transposed view; callers save and pin features, which needs them dense
    return torch.cat(out) if len(out) != 1 else out[0].contiguous()


@functools.lru_cache(maxsize=256)
def _frame_positions(h: int, w: int, m: int) -> np.ndarray:
    """``(row, col)`` of one ``h x w`` frame's tokens in merge-block order (SPEC section 3), ``[h*w, 2]``.

    Remembered per frame size (read-only), as a server sees few; building one costs ~15 us.
    """
    block, r = np.divmod(np.arange(h * w, dtype=np.int32), m * m)
    cols = w // m
    positions = np.stack([(block // cols) * m + r // m, (block % cols) * m + r % m], axis=1)
    positions.setflags(write=False)
    return positions


@torch.compiler.disable
def _host_packing(items: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, int, int]:
    """``(buffer, frames, offset)``: one int32 host buffer holding ``cu_seqlens`` at 0 and the positions
    at ``offset``, 16-byte aligned as the kernels' pointers are specialised."""
    frames = sum(t for t, _, _, _ in items)
    n = sum(t * h * w for t, h, w, _ in items)
    offset = -(-(frames + 1) // 4) * 4
    buf = np.zeros(offset + 2 * n, dtype=np.int32)
    np.cumsum(np.repeat([h * w for _, h, w, _ in items], [t for t, _, _, _ in items]), out=buf[1 : frames + 1])
    positions = buf[offset:].reshape(n, 2)
    start = 0
    for t, h, w, m in items:
        size = h * w
        # every frame of a clip repeats its first frame's positions
        positions[start : start + t * size].reshape(t, size, 2)[:] = _frame_positions(h, w, m)
        start += t * size
    return torch.from_numpy(buf), frames, offset


def packing(items: list[tuple[int, int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(positions, cu_seqlens, max_seqlen)`` of a packed batch on ``device`` (what
    :func:`penguin_kernels.rope_positions` computes), from the grid :func:`check_grid` read on the host.

    Built on the host, where the grid already is, and sent in one copy: a few array operations in
    place of a chain of small device launches, and no sync.
    """
    buf, frames, offset = _host_packing(items)
    buf = buf.to(device, non_blocking=True)
    return buf[offset:].view(-1, 2), buf[: frames + 1], max((h * w for _, h, w, _ in items), default=0)


class PenguinEncoder(nn.Module):
    """The Penguin-VL vision encoder on packed batches.

    ``forward(pixel_values [N, C*p*p], grid_sizes [B, 3], merge_sizes [B])`` returns the merged features
    ``[sum t*(h/m)*(w/m), hidden]``; with ``project=True`` they go through the projector as well.
    ``gradient_checkpointing=True`` recomputes each layer in the backward pass instead of keeping its
    activations (``torch.utils.checkpoint``); it is a plain attribute and may be set at any time.
    """

    def __init__(
        self,
        config: PenguinEncoderConfig,
        projector: ProjectorConfig | None = None,
        *,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.embeddings = PatchEmbedding(config)
        self.encoder = Encoder(config)
        self.projector = PenguinProjector(projector) if projector is not None else None
        self.backend = "torch"
        self.gradient_checkpointing = gradient_checkpointing

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
        load_projector: bool = True,
    ) -> PenguinEncoder:
        """Load a standalone encoder or the encoder (and projector) of a full Penguin-VL checkpoint.

        ``path`` is a directory with ``config.json`` and ``model.safetensors`` (or shards listed in
        ``model.safetensors.index.json``), or a hub id such as ``tencent/Penguin-Encoder[@revision]``
        already in the local Hugging Face cache (nothing is downloaded). The encoder config of a full
        checkpoint is found nested in its ``config.json``, in a sub-directory, or where its
        ``vision_encoder`` / ``mm_vision_encoder`` entry points. ``dtype`` defaults to the stored one.
        ``backend``: ``"torch"`` (plain PyTorch, any device), ``"triton"`` (Triton kernels, CUDA) or
        ``"auto"`` (Triton on CUDA, else torch). The model is returned in eval mode.
        """
        model = load_encoder(cls, resolve(path), dtype=dtype, device=device, load_projector=load_projector)
        return model.eval().set_backend(backend)

    @classmethod
    def from_config(
        cls,
        config: PenguinEncoderConfig,
        *,
        projector: ProjectorConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
        seed: int = 0,
    ) -> PenguinEncoder:
        """A randomly initialised encoder (norm weights near 1, small linear weights): for tests and benchmarks."""
        gen = torch.Generator().manual_seed(seed)
        # built without nn.Linear's own (slow, immediately overwritten) init; every parameter is filled below
        with torch.device("meta"):
            model = cls(config, projector)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                # uniform draws (faster than normal ones) with the standard deviation s: U(-s sqrt3, s sqrt3)
                if name.endswith("norm.weight"):
                    centre, std = 1.0, 0.1
                elif name.endswith("bias"):
                    centre, std = 0.0, 0.02
                else:
                    centre, std = 0.0, p[0].numel() ** -0.5
                half = std * 3**0.5
                p.uniform_(centre - half, centre + half, generator=gen)
        return model.to(device=device, dtype=dtype).set_backend(backend)

    def set_backend(self, backend: str) -> PenguinEncoder:
        """Select the execution path (see :meth:`from_pretrained`); returns ``self``."""
        self.backend = resolve_backend(backend, self.device, self.config.head_dim)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    def encode_packed(
        self, pixel_values: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """Patch embedding, every layer and the final norm: ``[N, C*p*p] -> [N, hidden]``, before the merge.

        Trusts its inputs (see :func:`check_grid` and :func:`packing`) and never syncs with the host on
        the Triton backend: this is what ``torch.compile`` and CUDA graphs wrap.
        """
        ops = ops_for(self.backend)
        x = self.embeddings(pixel_values, ops)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.encoder.layers:
            if recompute:
                x = checkpoint(layer, x, positions, cu_seqlens, max_seqlen, ops, use_reentrant=False)
            else:
                x = layer(x, positions, cu_seqlens, max_seqlen, ops)
        return self.encoder.norm(x, ops)

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_sizes: torch.Tensor,
        merge_sizes: torch.Tensor,
        *,
        project: bool = False,
    ) -> torch.Tensor:
        if project and self.projector is None:
            raise ValueError("project=True needs a projector: load a full Penguin-VL checkpoint")
        items = check_grid(pixel_values, grid_sizes, merge_sizes, self.config.patch_dim)
        ops = ops_for(self.backend)
        positions, cu_seqlens, max_seqlen = packing(items, self.device)
        x = self.encode_packed(pixel_values.to(self.device), positions, cu_seqlens, max_seqlen)
        x = merge_tokens(x, items)
        return self.projector(x, ops) if project else x
