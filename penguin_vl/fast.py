"""The Triton path of :class:`~penguin_vl.model.PenguinEncoder`.

Per layer, on the packed batch ``x [N, D]`` (``D`` = hidden)::

    h    = rms_norm(x)                                   1 kernel
    qkv  = h Wqkv^T                                      1 GEMM, q/k/v weights concatenated at load
    q, k = qk_norm_rope_2d(qkv views)                    1 kernel, reads the strided views in place
    a    = varlen_attention(q, k, v)                     1 launch for every frame of every item
    x    = x + a Wo^T                                    1 GEMM, residual added in its epilogue
    h2   = rms_norm(x)                                   1 kernel
    x    = x + (silu(h2 Wg^T) * (h2 Wu^T)) Wd^T          2 GEMMs: SwiGLU epilogue, residual epilogue

Adding the residual in the GEMM epilogues moves four [N, D] passes per residual (GEMM read of x and
write of the sum, norm read and write) where a separate output + fused add-and-norm would move five.

Host syncs: none. ``check_grid`` reads ``grid_sizes`` on the host (free when it is a CPU tensor, as the
preprocessor returns it; one sync otherwise); ``max_seqlen`` comes from that read, and positions and
``cu_seqlens`` are built on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

import penguin_kernels as pk
from penguin_vl.model import merge_tokens

if TYPE_CHECKING:
    from penguin_vl.model import PenguinEncoder

__all__ = ["prepare_triton", "forward_triton", "capture_cuda_graph"]


def _fuse(owner: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """Concatenate the weights of the linears ``owner.<name>``; their weights become views of it.

    Returns the concatenated ``[sum out, in]`` weight. The Parameters keep their names (and the state
    dict its layout) but no longer own separate storage, so no weight is held twice. If the weights
    were replaced since (``.to()``, ``load_state_dict``), the concatenation is rebuilt.
    """
    linears = [getattr(owner, n) for n in names]
    key = "_fused_" + "_".join(names)
    starts = [0]
    for lin in linears:
        starts.append(starts[-1] + lin.weight.shape[0])
    fused = owner.__dict__.get(key)
    if fused is not None and all(
        lin.weight.data_ptr() == fused[start].data_ptr() for lin, start in zip(linears, starts, strict=False)
    ):
        return fused
    fused = torch.cat([lin.weight.detach() for lin in linears])
    for lin, start, end in zip(linears, starts, starts[1:], strict=False):
        lin.weight = nn.Parameter(fused[start:end], requires_grad=False)
    owner.__dict__[key] = fused
    return fused


def _fused_bias(owner: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    biases = [getattr(owner, n).bias for n in names]
    if biases[0] is None:
        return None
    return torch.cat([b.detach() for b in biases])


def prepare_triton(model: PenguinEncoder) -> None:
    """Lay weights out for the kernels: q/k/v and gate/up concatenated, once (idempotent)."""
    for layer in model.encoder.layers:
        _fuse(layer.self_attn, ("q_proj", "k_proj", "v_proj"))
        _fuse(layer.mlp, ("gate_proj", "up_proj"))


def _layer_weights(model: PenguinEncoder) -> list[dict[str, torch.Tensor | None]]:
    weights = []
    for layer in model.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights.append(
            {
                "in_norm": layer.input_layernorm.weight,
                "qkv": _fuse(attn, ("q_proj", "k_proj", "v_proj")),
                "qkv_bias": _fused_bias(attn, ("q_proj", "k_proj", "v_proj")),
                "q_norm": attn.q_norm.weight,
                "k_norm": attn.k_norm.weight,
                "o": attn.o_proj.weight,
                "o_bias": attn.o_proj.bias,
                "post_norm": layer.post_attention_layernorm.weight,
                "gate_up": _fuse(mlp, ("gate_proj", "up_proj")),
                "down": mlp.down_proj.weight,
            }
        )
    return weights


def _encode(
    model: PenguinEncoder,
    weights: list[dict[str, torch.Tensor | None]],
    pixel_values: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Patch embedding, every layer and the final norm; no host sync (CUDA-graph capturable)."""
    c = model.config
    n = pixel_values.shape[0]
    qd, kvd = c.q_dim, c.kv_dim
    conv = model.embeddings.patch_embedding
    x = pk.linear(pixel_values, conv.weight.view(conv.weight.shape[0], -1), conv.bias)
    for w in weights:
        h = pk.rms_norm(x, w["in_norm"], c.rms_norm_eps)
        qkv = pk.linear(h, w["qkv"], w["qkv_bias"])
        q = qkv[:, :qd].view(n, c.num_attention_heads, c.head_dim)
        k = qkv[:, qd : qd + kvd].view(n, c.num_key_value_heads, c.head_dim)
        v = qkv[:, qd + kvd :].view(n, c.num_key_value_heads, c.head_dim)
        q, k = pk.qk_norm_rope_2d(q, k, w["q_norm"], w["k_norm"], positions, theta=c.rope_theta, eps=c.rms_norm_eps)
        a = pk.varlen_attention_op(q, k, v, cu_seqlens, max_seqlen)
        x = pk.linear(a.view(n, qd), w["o"], w["o_bias"], residual=x)
        h2 = pk.rms_norm(x, w["post_norm"], c.rms_norm_eps)
        x = pk.swiglu_mlp(h2, w["gate_up"], w["down"], residual=x)
    return pk.rms_norm(x, model.encoder.norm.weight, c.rms_norm_eps)


def _inputs(model: PenguinEncoder, grid_sizes: torch.Tensor, merge_sizes: torch.Tensor, items) -> tuple:
    positions, cu_seqlens = pk.rope_positions(
        grid_sizes.to(model.device),
        merge_sizes.to(model.device),
        total_tokens=sum(t * h * w for t, h, w, _ in items),
        num_frames=sum(t for t, _, _, _ in items),
    )
    max_seqlen = max(h * w for _, h, w, _ in items)
    return positions, cu_seqlens, max_seqlen


def forward_triton(
    model: PenguinEncoder,
    pixel_values: torch.Tensor,
    grid_sizes: torch.Tensor,
    merge_sizes: torch.Tensor,
    items: list[tuple[int, int, int, int]],
    *,
    project: bool,
) -> torch.Tensor:
    positions, cu_seqlens, max_seqlen = _inputs(model, grid_sizes, merge_sizes, items)
    x = _encode(model, _layer_weights(model), pixel_values.to(model.dtype), positions, cu_seqlens, max_seqlen)
    x = merge_tokens(x, items)
    return _project(model, x) if project else x


def _project(model: PenguinEncoder, x: torch.Tensor) -> torch.Tensor:
    l1, l2 = model.projector.readout[0], model.projector.readout[2]
    return pk.projector_mlp(x, l1.weight, l1.bias, l2.weight, l2.bias)


def capture_cuda_graph(
    model: PenguinEncoder,
    grid_sizes: torch.Tensor,
    merge_sizes: torch.Tensor,
    *,
    project: bool = False,
    warmup: int = 2,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture the Triton forward for one fixed packed shape in a CUDA graph.

    Returns ``run(pixel_values) -> features``: it copies ``pixel_values`` into the graph's static input
    and replays the graph. The returned tensor is the graph's static output, overwritten by the next
    call: clone it to keep it. Positions and ``cu_seqlens`` are computed once here, outside the graph.
    """
    from penguin_vl.model import check_grid

    if model.backend != "triton" or not model.device.type == "cuda":
        raise ValueError("capture_cuda_graph needs a CUDA model with backend='triton'")
    n = int(grid_sizes.prod(dim=1).sum())
    static_in = torch.zeros(n, model.config.patch_dim, device=model.device, dtype=model.dtype)
    items = check_grid(static_in, grid_sizes, merge_sizes, model.config.patch_dim)
    positions, cu_seqlens, max_seqlen = _inputs(model, grid_sizes, merge_sizes, items)
    weights = _layer_weights(model)

    def body() -> torch.Tensor:
        x = merge_tokens(_encode(model, weights, static_in, positions, cu_seqlens, max_seqlen), items)
        return _project(model, x) if project else x

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = body()

    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape != static_in.shape:
            raise ValueError(f"pixel_values must be {tuple(static_in.shape)} for this graph")
        static_in.copy_(pixel_values)
        graph.replay()
        return static_out

    return run
