"""The GPU suite: what one short GPU window should prove, most valuable first, with every result under one folder.

    PYTHONPATH=. python -m bench.gpu_suite                  # writes to $OUT when set, else bench/results/<stamp>/
    PYTHONPATH=. python -m bench.gpu_suite --only kernels   # one step alone
    PYTHONPATH=. python -m bench.gpu_suite --dry-run        # the same code on the CPU (CI runs it)

Steps, each in its own processes with its own share of the budget (default 8 minutes); time a step
leaves unused passes to the next, and a step that runs out is stopped and marked ``cut``:

1. ``ceilings``: the roofline (bf16 matmul TFLOP/s, copy GB/s), measured once and reused by the
   benchmarks through ``PENGUIN_CEILINGS``;
2. ``kernels``: every GPU benchmark (those taking the ``ceilings`` fixture) in ``bench/test_bench_*.py``
   but the encoder's, so new benchmark files join without edits;
3. ``encoder``: the GPU benchmarks of ``bench/test_bench_*encoder*.py`` (whole-encoder forwards, one
   ``torch.compile`` baseline for all workloads; training steps);
4. ``tests``: the tests marked ``gpu`` under ``tests/``, split across ``--shards`` processes. They
   need the goldens: ``--golden DIR``, ``$PENGUIN_GOLDEN_DIR``, ``./.golden`` or ``../shared/golden``;
   the step fails at once when none holds them (the dry run goes on: it checks code paths, not parity).

Written to the output folder as each step ends: ``gpu_suite.json`` (environment, ceilings, steps,
tests, benchmark rows, JIT specialisations per step), ``gpu_suite.md`` (the short summary) and
``logs/<step>.log``. A benchmark row cut mid-way has ``"cut": true`` and no time. Exit status 0
when every step passed.

``--dry-run`` runs every step on the CPU: Triton's interpreter, tiny shapes, CUDA events and device
queries faked (:mod:`bench.dry_run`), ``torch.compile`` with its eager backend.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import specialisations

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("ceilings", "kernels", "encoder", "tests")
# Fractions of the budget, sized from a cold-cache run's compile and timing work per step.
SHARES = {"ceilings": 0.06, "kernels": 0.40, "encoder": 0.24, "tests": 0.30}
_TAIL = 3000
# A module that fails to import on the GPU image (a missing optional package) is reported, and the
# GPU tests of the other modules still run.
_PYTEST = ["-p", "bench.suite_plugin", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
_CEILINGS = """
import json, sys
from bench import dry_run
if dry_run.ACTIVE:
    dry_run.install()
from bench.timing import environment, measure_ceilings
c = measure_ceilings()
open(sys.argv[1], "w").write(c.to_json())
print(json.dumps({"ceilings": json.loads(c.to_json()), "environment": environment()}))
"""


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | cut | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    returncodes: list[int | None] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    output_tail: str = ""
    specialisations: dict[str, Any] = field(default_factory=dict)
    triton_cache_new_entries: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        # Own process group, so a cut also ends the compile workers a step may have started.
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs: list[subprocess.Popen], deadline: float) -> bool:
    """Wait for every process until ``deadline``; on time out stop them all. True when cut."""
    cut = False
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            cut = True
            break
    if cut:
        # SIGINT first: pytest then stops, prints its summary and still writes its JUnit/JSON reports.
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return cut


def _run(step: Step, commands: list[list[str]], env: dict[str, str], logs: Path, budget: float) -> None:
    step.budget_s = budget
    if budget < 5:
        step.status = "skipped"
        step.output_tail = "out of time budget"
        return
    names = [step.name] if len(commands) == 1 else [f"{step.name}-{i}" for i in range(len(commands))]
    paths = [logs / f"{name}.log" for name in names]
    t0 = time.monotonic()
    procs = [_start(cmd, env, path) for cmd, path in zip(commands, paths, strict=True)]
    cut = _wait(procs, t0 + budget)
    step.seconds = time.monotonic() - t0
    step.returncodes = [p.returncode for p in procs]
    step.logs = [str(p.relative_to(logs.parent)) for p in paths]
    step.output_tail = "\n".join(p.read_text(errors="replace")[-_TAIL // len(paths) :] for p in paths)
    # pytest exits 5 when every test of a file was deselected (a file with CPU benchmarks only).
    step.status = "cut" if cut else "ok" if all(rc in (0, 5) for rc in step.returncodes) else "failed"


def _junit_summary(paths: Sequence[Path]) -> dict[str, Any]:
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    failures, skips = [], {}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is None:
                    continue
                message = (el.get("message") or "").strip().splitlines()
                message = message[0][:300] if message else ""
                if tag == "skipped":
                    skips[message] = skips.get(message, 0) + 1
                else:
                    test = f"{case.get('classname')}::{case.get('name')}"
                    failures.append({"test": test, "kind": tag, "message": message})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed_tests": failures, "skip_reasons": skips}


def _bench_rows(path: Path, failed: set[str]) -> list[dict[str, Any]]:
    """Rows of pytest-benchmark's JSON; ``failed`` names the tests (``file::test[id]``) that raised."""
    # pytest-benchmark leaves the file empty when no benchmark ran, and truncated when killed.
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        name = b["fullname"]
        # ``time_ms`` is written last, after the baselines: a row without it raised or was stopped
        # mid-way, and pytest-benchmark's wall-clock median of it would be another measure.
        state = "failed" if _test_id(name) in failed else "cut" if "time_ms" not in info else "ok"
        rows.append({"name": name, "params": b.get("params"), "state": state, "cut": state == "cut", **info})
    return rows


def _test_id(name: str) -> str:
    """``module_stem::test[id]`` from a node id or from JUnit's ``classname::name``."""
    path, _, test = name.rpartition("::")
    return f"{path.replace('/', '.').removesuffix('.py').rsplit('.', 1)[-1]}::{test}"


def _cache_entries(env: dict[str, str]) -> int | None:
    if env.get("TRITON_INTERPRET") == "1":
        return None
    cache = Path(env.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else 0


def find_goldens(explicit: Path | None) -> Path | None:
    """The first of ``explicit``, ``$PENGUIN_GOLDEN_DIR``, ``./.golden``, ``../shared/golden`` holding the goldens."""
    candidates = [explicit, os.environ.get("PENGUIN_GOLDEN_DIR"), ROOT / ".golden", ROOT.parent / "shared" / "golden"]
    for c in candidates:
        if c and (Path(c) / "encoder_shared").is_dir():
            return Path(c).resolve()
    return None


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def markdown(result: dict[str, Any]) -> str:
    env = result.get("environment") or {}
    ceil = result.get("ceilings") or {}
    lines = [
        f"# GPU suite{' (dry run on the CPU)' if result['dry_run'] else ''}, {result['date']}",
        "",
        f"- device: {env.get('device', '?')} (sm {env.get('capability', '?')}, {env.get('sm_count', '?')} SMs), "
        f"driver {env.get('driver', '?')}, CUDA {env.get('cuda', '?')}",
        f"- torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, python {env.get('python', '?')}",
        f"- ceilings: bf16 matmul {_fmt(ceil.get('matmul_tflops'), '.0f')} TFLOP/s, "
        f"copy {_fmt(ceil.get('copy_gbps'), '.0f')} GB/s (measured)",
        f"- goldens: {result.get('goldens') or 'NOT FOUND'}; budget {result['budget_s']:.0f} s, "
        f"took {result.get('seconds', 0):.0f} s",
    ]
    tests = result.get("tests") or {}
    if tests:
        lines.append(
            f"- tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped"
        )
        lines += [f"  - FAILED `{f['test']}`: {f['message']}" for f in tests["failed_tests"]]
        lines += [f"  - skipped {n}: {reason}" for reason, n in tests["skip_reasons"].items()]
    lines += ["", "| step | status | seconds | share s | specialisations | new cache entries | log |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for s in result["steps"]:
        status = "**CUT**" if s["status"] == "cut" else s["status"]
        lines.append(
            f"| {s['name']} | {status} | {s['seconds']:.0f} | {s['budget_s']:.0f} | "
            f"{s['specialisations'].get('total', '-')} | {_fmt(s['triton_cache_new_entries'], 'd')} | "
            f"{', '.join(s['logs']) or '-'} |"
        )
    lines += [
        "",
        "| benchmark | time ms | TFLOP/s | % peak | GB/s | % peak | % roofline | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("benchmarks", []):
        name = r["name"].split("::", 1)[-1]
        if r["state"] != "ok":
            what = "**CUT** (stopped mid-way, no time)" if r["cut"] else "**FAILED** (see the step's log)"
            lines.append(f"| {name} | {what} | | | | | | |")
            continue
        speedups = ", ".join(
            f"{k.removeprefix('speedup_vs_')} {v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_")
        )
        lines.append(
            f"| {name} | {_fmt(r.get('time_ms'), '.4g')} | {_fmt(r.get('tflops'), '.3g')} | "
            f"{_fmt(r.get('pct_peak_tflops'), '.0f')} | {_fmt(r.get('gbps'), '.0f')} | "
            f"{_fmt(r.get('pct_peak_gbps'), '.0f')} | {_fmt(r.get('pct_roofline'), '.0f')} | {speedups or '-'} |"
        )
    return "\n".join(lines) + "\n"


def _default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return ROOT / "bench" / "results" / dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")


def _env(args: argparse.Namespace, goldens: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if goldens is not None:
        env["PENGUIN_GOLDEN_DIR"] = str(goldens)
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def _bench_files(encoder: bool) -> list[str]:
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").glob("test_bench_*.py"))
    return [f for f in files if ("encoder" in Path(f).stem) == encoder]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else bench/results/)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 480; dry run 600)")
    parser.add_argument("--only", choices=STEPS, action="append", help="run this step alone (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="run every step on the CPU at tiny shapes")
    parser.add_argument("--shards", type=int, default=None, help="processes for the tests (default cores / 2, 2 to 8)")
    parser.add_argument("--golden", type=Path, default=None, help="folder holding the goldens")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for the benchmarks and tests")
    args = parser.parse_args(argv)
    budget = args.budget or (600.0 if args.dry_run else 480.0)
    selected = [s for s in STEPS if not args.only or s in args.only]
    out = (args.out or _default_out()).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    goldens = find_goldens(args.golden)
    env = _env(args, goldens)
    # The benchmarks' tiny shapes and CUDA fakes; the tests need neither (they run on the CPU already).
    fake = {"PENGUIN_DRY_RUN": "1"} if args.dry_run else {}
    shards = args.shards or max(2, min(8, (os.cpu_count() or 2) // 2))
    keyword = ["-k", args.keyword] if args.keyword else []

    t_start = time.monotonic()
    result: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "budget_s": budget,
        "goldens": str(goldens) if goldens else None,
        "steps": [],
        "benchmarks": [],
        "environment": _fallback_environment(env),
    }
    ceilings_path = out / "ceilings.json"
    carried = 0.0  # seconds earlier steps left unused
    for name in selected:
        share = SHARES[name] / sum(SHARES[s] for s in selected) * budget + carried
        share = min(share, budget - (time.monotonic() - t_start))
        step = Step(name)
        jit_log = out / f"specialisations-{name}.jsonl"
        jit_log.unlink(missing_ok=True)
        step_env = dict(env)
        # Keying every launch costs host time, which would show in a GPU benchmark's device time: on a
        # GPU the benchmark steps count compilations through Triton's cache instead.
        if args.dry_run or name == "tests":
            step_env["PENGUIN_JIT_LOG"] = str(jit_log)
        if ceilings_path.exists():
            step_env["PENGUIN_CEILINGS"] = str(ceilings_path)
        cache_before = _cache_entries(env)
        if name == "ceilings":
            _ceilings(step, {**step_env, **fake}, logs, share, ceilings_path, result)
        elif name in ("kernels", "encoder"):
            files = _bench_files(encoder=name == "encoder")
            result["benchmarks"] += _benchmarks(step, files, {**step_env, **fake}, logs, share, out, keyword)
        elif goldens is None and not args.dry_run:
            step.status = "failed"
            step.output_tail = (
                "goldens not found: copy ../shared/golden to ./.golden and carry it, pass --golden DIR "
                "or set PENGUIN_GOLDEN_DIR; without them golden parity would be skipped"
            )
        else:
            result["tests"] = _tests(step, shards, step_env, logs, share, out, keyword)
        cache_after = _cache_entries(env)
        if cache_before is not None and cache_after is not None:
            step.triton_cache_new_entries = cache_after - cache_before
        if jit_log.exists():
            step.specialisations = specialisations.summary(jit_log.read_text().splitlines())
        carried = max(0.0, step.budget_s - step.seconds) if step.status != "skipped" else share
        result["steps"].append(asdict(step))
        result["seconds"] = time.monotonic() - t_start
        _write(out, result)
    print(markdown(result))
    for s in result["steps"]:
        if s["status"] != "ok":  # the logs may not outlive the run (a CI machine): their ends go to stderr
            print(f"---- {s['name']}: {s['status']} ----\n{s['output_tail']}", file=sys.stderr)
    print(f"wrote {out / 'gpu_suite.json'}, {out / 'gpu_suite.md'} and {logs}/")
    return 0 if all(s["status"] == "ok" for s in result["steps"]) else 1


def _ceilings(step: Step, env: dict[str, str], logs: Path, budget: float, path: Path, result: dict) -> None:
    _run(step, [[sys.executable, "-c", _CEILINGS, str(path)]], env, logs, budget)
    for line in reversed(step.output_tail.splitlines()):
        if line.startswith("{"):
            step.details = json.loads(line)
            result["ceilings"] = step.details["ceilings"]
            result["environment"] = step.details["environment"]
            break


def _benchmarks(
    step: Step, files: list[str], env: dict[str, str], logs: Path, budget: float, out: Path, keyword: list[str]
) -> list[dict[str, Any]]:
    junit, data = out / f"junit-{step.name}.xml", out / f"benchmarks-{step.name}.json"
    cut_log = out / f"cut-{step.name}.txt"
    cut_log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *files, "-m", "gpu", "--benchmark-only", "-q", "-rfEs", *_PYTEST]
    cmd += [f"--benchmark-json={data}", f"--junitxml={junit}", *keyword]
    _run(step, [cmd], {**env, "PENGUIN_CUT_LOG": str(cut_log)}, logs, budget)
    step.details = _junit_summary([junit])
    rows = _bench_rows(data, {_test_id(f["test"]) for f in step.details["failed_tests"]})
    if cut_log.exists():
        rows += [{"name": name, "state": "cut", "cut": True} for name in cut_log.read_text().split()]
    step.details["rows"] = len(rows)
    if step.status == "ok" and step.details["failures"] + step.details["errors"]:
        step.status = "failed"
    return rows


def _tests(
    step: Step, shards: int, env: dict[str, str], logs: Path, budget: float, out: Path, keyword: list[str]
) -> dict[str, Any]:
    junits = [out / f"junit-tests-{i}.xml" for i in range(shards)]
    commands = [
        [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-rfEs", *_PYTEST, *keyword]
        + [f"--shard={i}/{shards}", f"--junitxml={junits[i]}"]
        for i in range(shards)
    ]
    _run(step, commands, env, logs, budget)
    step.details = _junit_summary(junits)
    return step.details


def _write(out: Path, result: dict[str, Any]) -> None:
    # Rewritten after every step: a run stopped from outside still leaves what it measured.
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_suite.md").write_text(markdown(result))


def _fallback_environment(env: dict[str, str]) -> dict[str, Any]:
    code = "import json; from bench.timing import environment; print(json.dumps(environment()))"
    try:
        cmd = [sys.executable, "-c", code]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError) as exc:
        return {"error": repr(exc)}


if __name__ == "__main__":
    sys.exit(main())
