"""Host time per call: the Python each public op costs around its launches, with the launches stubbed.

    PYTHONPATH=. python -m bench.host_time                    # table on stdout
    PYTHONPATH=. python -m bench.host_time --out bench/results  # also <date>-host-time-cpu.{json,md}

At the encoder's sizes a kernel runs for tens of microseconds, so the Python around it (checks,
configuration, allocation, the custom-op dispatch) decides whether the GPU waits for the host. This
measures that Python alone on the CPU: every Triton launch is replaced by a no-op for the duration
(:func:`stubbed_launches`), so what remains is the Python a GPU run executes around its launches
(Triton's own launcher, which the stub replaces, is not counted). For scale, the same run times a
bare custom op (``torch.library.triton_op`` whose body allocates its output and launches nothing):
the floor that every registered op pays. The command re-executes itself in the environment it needs
(the interpreter, no GPU, a heap that keeps freed blocks), so it runs the same on any machine.

Shapes are the released encoder's (hidden 1024, 16 query and 8 KV heads of 128, intermediate 3072) at
the ``latency`` workload (one 1024-token image), in float16 under ``torch.inference_mode()``, the way
the model calls the ops. :func:`encoder_forward` times a whole forward of the Triton-backend encoder
the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.library import triton_op

import penguin_kernels as pk
from bench.timing import environment

__all__ = ["HostTime", "encoder_forward", "measure", "op_calls", "stubbed_launches", "main"]

TOKENS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 1024, 1024, 16, 8, 128, 3072
# The process the measurement runs in: Triton's interpreter (so CPU tensors are launchable, set before
# triton is imported), no visible GPU, and a heap that keeps freed blocks. By default glibc hands each
# freed multi-megabyte output back to the OS and maps a fresh one for the next call, tens of
# microseconds here, where the CUDA caching allocator of a GPU run costs about one.
_ENVIRONMENT = {
    "TRITON_INTERPRET": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912",
}
# Per-call target: within ~2x of the bare custom-op dispatch, at most 25 us on the reference CPU.
TARGET_US = 25.0


@triton_op("penguin_bench::bare", mutates_args=())
def _bare(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@dataclass(frozen=True)
class HostTime:
    """Microseconds per call: thread CPU time (median and min over runs) and wall time (median).

    The CPU time of the calling thread is the figure to read: on a shared machine it leaves out the
    time other processes hold the core, which wall time counts.
    """

    name: str
    cpu_us: float
    cpu_us_min: float
    wall_us: float
    calls: int
    repeats: int


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[int]]:
    """Every Triton launch (compiled or interpreted) is a no-op inside; yields the list of launch counts.

    The launch stub replaces ``run`` on Triton's kernel classes, which is where ``kernel[grid](...)``
    and ``wrap_triton`` end up, so everything before the launch runs as it would on a GPU.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches = [0]

    def run(self: Any, *args: Any, **kwargs: Any) -> None:
        launches[0] += 1

    saved = {cls: cls.__dict__["run"] for cls in (JITFunction, InterpretedFunction)}
    for cls in saved:
        cls.run = run
    try:
        yield launches
    finally:
        for cls, fn in saved.items():
            cls.run = fn


def measure(name: str, fn: Callable[[], Any], *, calls: int = 200, repeats: int = 25) -> HostTime:
    """Time ``repeats`` runs of ``calls`` back-to-back calls of ``fn``, garbage collection paused."""
    for _ in range(20):
        fn()
    cpu, wall = [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            cpu.append((time.thread_time() - c0) / calls * 1e6)
            wall.append((time.perf_counter() - w0) / calls * 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
    return HostTime(name, statistics.median(cpu), min(cpu), statistics.median(wall), calls, repeats)


def _randn(*shape: int, device: str, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


def op_calls(device: str = "cpu", dtype: torch.dtype = torch.float16) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per public op at the encoder's sizes, inputs built once."""
    n, d, h, kv, hd, inter = TOKENS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER
    x = _randn(n, d, device=device, dtype=dtype)
    res = _randn(n, d, device=device, dtype=dtype)
    norm_w = _randn(d, device=device, dtype=dtype)
    w_qkv = _randn((h + 2 * kv) * hd, d, device=device, dtype=dtype, scale=d**-0.5)
    w_o = _randn(d, h * hd, device=device, dtype=dtype, scale=(h * hd) ** -0.5)
    b = _randn(d, device=device, dtype=dtype)
    w_gu = _randn(2 * inter, d, device=device, dtype=dtype, scale=d**-0.5)
    w_down = _randn(d, inter, device=device, dtype=dtype, scale=inter**-0.5)
    w1 = _randn(2048, d, device=device, dtype=dtype, scale=d**-0.5)
    w2 = _randn(2048, 2048, device=device, dtype=dtype, scale=2048**-0.5)
    b1 = _randn(2048, device=device, dtype=dtype)
    qkv = pk.reference.linear(x, w_qkv)
    q = qkv[:, : h * hd].view(n, h, hd)
    k = qkv[:, h * hd : (h + kv) * hd].view(n, kv, hd)
    v = qkv[:, (h + kv) * hd :].view(n, kv, hd)
    attn = _randn(n, h * hd, device=device, dtype=dtype)
    qn_w, kn_w = _randn(hd, device=device, dtype=dtype), _randn(hd, device=device, dtype=dtype)
    grid = torch.tensor([[1, 32, 32]], device=device)
    merge = torch.tensor([1], device=device)
    positions, cu = pk.rope_positions(grid, merge)
    return {
        "bare custom op": lambda: _bare(x),
        "rms_norm": lambda: pk.rms_norm(x, norm_w, 1e-6),
        "rms_norm_residual": lambda: pk.rms_norm_residual(x, res, norm_w, 1e-6),
        "linear (qkv)": lambda: pk.linear(x, w_qkv),
        "linear (+bias +residual)": lambda: pk.linear(attn, w_o, b, residual=res),
        "linear (+bias, gelu)": lambda: pk.linear(x, w1, b1, gelu=True),
        "gate_up_swiglu": lambda: pk.gate_up_swiglu(x, w_gu),
        "swiglu_mlp": lambda: pk.swiglu_mlp(x, w_gu, w_down, res),
        "projector_mlp": lambda: pk.projector_mlp(x, w1, b1, w2, b1),
        "qk_norm_rope_2d": lambda: pk.qk_norm_rope_2d(q, k, qn_w, kn_w, positions, theta=1e6, eps=1e-6),
        "varlen_attention_op": lambda: pk.varlen_attention_op(q, k, v, cu, n),
        "varlen_attention (validates cu_seqlens)": lambda: pk.varlen_attention(q, k, v, cu, n),
        "rope_positions (hints given)": lambda: pk.rope_positions(grid, merge, total_tokens=n, num_frames=1),
    }


def encoder_forward(layers: int = 28, device: str = "cpu", dtype: torch.dtype = torch.float16) -> Callable[[], Any]:
    """One forward of the Triton-backend encoder at the released sizes on the ``latency`` image."""
    from penguin_vl import PenguinEncoder, PenguinEncoderConfig
    from penguin_vl.workloads import get, make_inputs

    config = PenguinEncoderConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
    )
    model = PenguinEncoder.from_config(config, dtype=dtype, device=device, backend="triton")
    inputs = make_inputs(get("latency"), patch_dim=config.patch_dim, device=device, dtype=dtype)
    return lambda: model(inputs.pixel_values, inputs.grid_sizes, inputs.merge_sizes)


def _commit() -> str:
    """The checkout measured (a merge names its parents), so that a committed table says what it describes."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %p"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    commit, *parents = out.stdout.split() or ["unknown"]
    if len(parents) > 1:
        commit += f" (merge of {' and '.join(parents)})"
    return commit + (" with local changes" if dirty.stdout.strip() else "")


def markdown(rows: Sequence[HostTime], env: dict[str, Any], date: str) -> str:
    bare = next(r.cpu_us_min for r in rows if r.name == "bare custom op")
    lines = [
        f"# Host time per call, launches stubbed ({date})",
        "",
        f"- {env['device']}, {env.get('threads', '?')} threads; torch {env['torch']}, triton {env['triton']}, "
        f"python {env['python']}",
        f"- commit {env.get('commit', 'unknown')}; released encoder sizes, 1024 tokens, float16, inference mode; "
        f"target <= {TARGET_US:.0f} us per op call",
        "- CPU time of the calling thread per call: median and min over the runs; the ratio compares mins,",
        "  which other processes on a shared machine disturb least; wall time (median) for reference",
        "",
        "| call | CPU us per call | min | min / bare min | wall us |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.name} | {r.cpu_us:.1f} | {r.cpu_us_min:.1f} | {r.cpu_us_min / bare:.2f} | {r.wall_us:.1f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_time", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for <date>-host-time-cpu.json and .md")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed run")
    parser.add_argument("--layers", type=int, default=28, help="encoder layers for the forward (0: skip it)")
    parser.add_argument("-k", dest="keyword", help="only calls whose name contains this")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in _ENVIRONMENT.items()):
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "bench.host_time", *argv], {**os.environ, **_ENVIRONMENT})
    rows = []
    selected = lambda name: args.keyword is None or args.keyword in name or name == "bare custom op"
    with torch.inference_mode(), stubbed_launches():
        for name, fn in op_calls().items():
            if selected(name):
                rows.append(measure(name, fn, calls=args.calls))
        forward = f"encoder forward, {args.layers} layers"
        if args.layers and selected(forward):
            rows.append(measure(forward, encoder_forward(args.layers), calls=3, repeats=5))
    env = {**environment(), "commit": _commit()}
    date = dt.datetime.now().isoformat(timespec="seconds")
    table = markdown(rows, env, date)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"{date[:10]}-host-time-cpu"
        record = {"date": date, "environment": env, "target_us": TARGET_US, "rows": [asdict(r) for r in rows]}
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
        stem.with_suffix(".md").write_text(table)
        print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
