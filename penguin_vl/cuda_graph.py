"""CUDA-graph replay of the encoder for one fixed packed shape.

The grid is read and the positions and ``cu_seqlens`` are built once, outside the graph; the graph
holds :meth:`~penguin_vl.model.PenguinEncoder.encode_packed` (which never syncs with the host on the
Triton backend), the merge and, if asked, the projector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from penguin_vl.model import PenguinEncoder, check_grid, merge_tokens, ops_for, packing

__all__ = ["capture_cuda_graph"]


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
    call: clone it to keep it. The graph runs without autograd.
    """
    if model.backend != "triton" or model.device.type != "cuda":
        raise ValueError("capture_cuda_graph needs a CUDA model with backend='triton'")
    if project and model.projector is None:
        raise ValueError("project=True needs a projector: load a full Penguin-VL checkpoint")
    n = int(grid_sizes.prod(dim=1).sum())
    static_in = torch.zeros(n, model.config.patch_dim, device=model.device, dtype=model.dtype)
    items = check_grid(static_in, grid_sizes, merge_sizes, model.config.patch_dim)
    ops = ops_for(model.backend)
    positions, cu_seqlens, max_seqlen = packing(ops, grid_sizes, merge_sizes, items, model.device)

    def body() -> torch.Tensor:
        x = merge_tokens(model.encode_packed(static_in, positions, cu_seqlens, max_seqlen), items)
        return model.projector(x, ops) if project else x

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
