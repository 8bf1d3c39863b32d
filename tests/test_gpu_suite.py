"""The GPU suite's own logic on the CPU: sharding, cut rows, specialisation counts, goldens, the output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_suite, specialisations
from bench.suite_plugin import shards
from tests.utils import INTERPRETER

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_shards_cover_every_test_once_and_balance(n):
    files = {"a.py": 40, "b.py": 7, "c.py": 1, "d.py": 13, "e.py": 0}
    parts = shards(files, n)
    assert len(parts) == n
    taken = {name: [] for name in files}
    for part in parts:
        for name, start, stop in part:
            taken[name] += range(start, stop)
    assert {name: sorted(ix) for name, ix in taken.items()} == {name: list(range(c)) for name, c in files.items()}
    loads = [sum(stop - start for _, start, stop in part) for part in parts]
    # Pieces are at most an even share, and each goes to the lightest part: no part exceeds two shares.
    assert max(loads) <= 2 * -(-sum(files.values()) // n)


def test_shards_keep_small_files_whole():
    parts = shards({"a.py": 3, "b.py": 3, "c.py": 2, "d.py": 2}, 2)
    for part in parts:
        for name, start, stop in part:
            assert (start, stop) == (0, {"a.py": 3, "b.py": 3, "c.py": 2, "d.py": 2}[name])


def _bench_json(path: Path) -> None:
    rows = [
        ("bench/test_bench_x.py::test_a[1]", {"time_ms": 1.5, "tflops": 2.0}),
        ("bench/test_bench_x.py::test_a[2]", {"tokens": 3}),  # stopped before ``time_ms`` was recorded
        ("bench/test_bench_x.py::test_b", {"tokens": 4}),
    ]
    data = {"benchmarks": [{"fullname": n, "params": None, "extra_info": i, "stats": {"median": 9.0}} for n, i in rows]}
    path.write_text(json.dumps(data))


def test_rows_stopped_mid_way_are_cut_and_carry_no_time(tmp_path):
    _bench_json(tmp_path / "b.json")
    rows = gpu_suite._bench_rows(tmp_path / "b.json", failed={gpu_suite._test_id("bench.test_bench_x::test_b")})
    assert [r["state"] for r in rows] == ["ok", "cut", "failed"]
    assert rows[0]["time_ms"] == 1.5 and "time_ms" not in rows[1] and "time_ms" not in rows[2]
    table = gpu_suite.markdown(
        {"date": "d", "dry_run": False, "budget_s": 1.0, "steps": [], "benchmarks": rows, "environment": {}}
    )
    assert "| test_a[2] | **CUT**" in table and "| test_b | **FAILED**" in table and "| test_a[1] | 1.5 |" in table
    assert gpu_suite._bench_rows(tmp_path / "missing.json", set()) == []


def test_goldens_are_found_in_order(tmp_path, monkeypatch):
    explicit, from_env = tmp_path / "x", tmp_path / "y"
    for d in (explicit, from_env):
        (d / "encoder_shared").mkdir(parents=True)
    monkeypatch.setenv("PENGUIN_GOLDEN_DIR", str(from_env))
    assert gpu_suite.find_goldens(explicit) == explicit.resolve()
    assert gpu_suite.find_goldens(tmp_path / "empty") == from_env.resolve()


@pytest.mark.skipif(not INTERPRETER, reason="counts launches through Triton's interpreter")
def test_specialisations_counted_per_key_and_unspecialised_args_collapse(tmp_path):
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n"])
    def scale(x, y, n, m, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        # m bounds nothing (o < n + m always holds): it is here for its specialisation only
        tl.store(y + o, tl.load(x + o, mask=o < n) * 2, mask=(o < n) & (o < n + m))

    specialisations.install()
    before = specialisations.keys()
    for n, m, block in ((5, 5, 8), (7, 7, 8), (16, 5, 8), (1, 7, 8), (5, 16, 8), (5, 5, 16), (5, 5, 8)):
        x = torch.arange(n, dtype=torch.float32)
        y = torch.zeros(max(n, block))
        scale[(1,)](x, y, n, m, BLOCK=block)
        assert torch.equal(y[: min(n, block)], x[:block] * 2)
    new = [k for k in specialisations.keys() - before if k[0].endswith(".scale")]
    # n never specialises (n = 16 and n = 1 share the first binary); m = 16 and BLOCK = 16 add one each
    assert len(new) == 3
    specialisations.write(tmp_path / "k.jsonl")
    summary = specialisations.summary((tmp_path / "k.jsonl").read_text().splitlines())
    assert summary["per_kernel"][new[0][0]] == 3


def test_dry_run_ceilings_step_writes_everything_under_out(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path / "out")}
    cmd = [sys.executable, "-m", "bench.gpu_suite", "--dry-run", "--only", "ceilings"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    result = json.loads((out / "gpu_suite.json").read_text())
    assert result["dry_run"] and [s["name"] for s in result["steps"]] == ["ceilings"]
    assert result["ceilings"]["matmul_shape"] == 64 and result["environment"]["capability"] == "9.0"
    assert (out / "logs" / "ceilings.log").read_text().startswith("$ ")
    assert "(dry run on the CPU)" in (out / "gpu_suite.md").read_text()
