"""``bench.tune``: candidates are checked against the shipped configuration, timed, ranked; failures are listed."""

from __future__ import annotations

import json

import pytest
import torch

import bench.tune as tune
from penguin_kernels.attention import AttentionConfig
from penguin_kernels.gemm import Tile
from tests.utils import HAS_CUDA, INTERPRETER

requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)


def _toy_problem() -> tune.Problem:
    """A stand-in kernel whose "configs" are ints: 2 is slow, 3 is wrong, 4 raises, 1 is shipped."""
    x = torch.arange(6.0)

    def run(config: int) -> torch.Tensor:
        if config == 4:
            raise RuntimeError("out of resources: shared memory\nsecond line")
        if config == 2:
            torch.cumsum(torch.rand(200_000), 0)
        return x + 1 if config == 3 else x * 1

    return tune.Problem("toy", "x [6]", 12.0, 1, [2, 3, 4, 1], run)


def test_sweep_ranks_checks_and_reports():
    trials = tune.sweep(_toy_problem(), tol=1e-6, rounds=3, on_cuda=False)
    by_config = {t.config["config"]: t for t in trials}
    assert sorted(by_config) == [1, 2, 3, 4]  # the shipped config once, though it is also a candidate
    assert by_config[1].shipped and by_config[1].speedup == 1.0 and not by_config[2].shipped
    assert by_config[3].status == "wrong" and "relative error" in by_config[3].error and by_config[3].seconds is None
    assert by_config[4].status == "failed" and by_config[4].error == "RuntimeError: out of resources: shared memory"
    assert [t.config["config"] for t in trials][:2] == [1, 2]  # ranked by time, unranked ones last
    assert by_config[2].speedup < 1.0 and by_config[2].tflops == 12.0 / by_config[2].seconds / 1e12
    text = tune.table(_toy_problem(), trials)
    assert "shipped ok" in text and "wrong: relative error" in text and "failed: RuntimeError" in text


@requires_kernels
def test_attention_candidates_run_and_match(monkeypatch):
    """Real attention configs in place of the shipped one: every output is checked, none may fail here."""
    small = [
        AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, max_pack=2),
        AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=1, max_pack=4),
    ]
    monkeypatch.setattr(tune, "attention_candidates", lambda sweep: small)
    args = tune._parser().parse_args(
        ["attention", "--tokens", "45", "--seqlen", "15", "--heads", "4", "--kv-heads", "2", "--head-dim", "64"]
        + ["--dtype", "fp16", "--rounds", "1"]
    )
    problem = tune.attention_problem(args, "cuda" if HAS_CUDA and not INTERPRETER else "cpu")
    trials = tune.sweep(problem, tol=tune._TOL["fp16"], rounds=1, on_cuda=HAS_CUDA and not INTERPRETER)
    assert len(trials) == 3 and all(t.status == "ok" and t.seconds > 0 for t in trials), trials
    assert sum(t.shipped for t in trials) == 1


@requires_kernels
def test_cli_gemm_sweep_writes_json(tmp_path, monkeypatch, capsys):
    tiles = [Tile(16, 32, 32, 4, 1), Tile(32, 32, 32, 4, 1, group_m=2)]
    monkeypatch.setattr(tune, "gemm_candidates", lambda sweep, swiglu: tiles)
    out = tmp_path / "t.json"
    args = ["gate_up_swiglu", "--m", "40", "--k", "48", "--n", "24", "--dtype", "fp32", "--rounds", "1"]
    assert tune.main([*args, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["target"] == "gate_up_swiglu" and record["flops"] == 2.0 * 40 * 48 * 48
    assert len(record["trials"]) == 3 and all(t["status"] == "ok" for t in record["trials"])
    assert "gate_up_swiglu: x [40, 48]" in capsys.readouterr().out


def test_candidate_grids():
    quick = tune.attention_candidates("quick")
    assert len(quick) == 16 and len(set(quick)) == 16
    assert len(tune.attention_candidates("full")) == 2 * 3 * 2 * 4
    tiles = tune.gemm_candidates("quick", swiglu=False)
    assert all(t.split_epilogue == (t.bn == 256) for t in tiles)
    assert max(t.bn for t in tune.gemm_candidates("full", swiglu=True)) == 128
