"""The GPU suite: ceilings, the whole test suite and every benchmark, summarised in one JSON + one table.

    PYTHONPATH=. python -m bench.gpu_suite                 # writes bench/results/<date>-<device>.{json,md}
    PYTHONPATH=. python -m bench.gpu_suite --out /tmp/res --budget 300 --skip-tests

Steps, each in its own subprocess with a share of the time budget (default 8.5 minutes in all), so
a crash, a hang or a failing test in one step is recorded and the next step still runs:

1. measure the roofline ceilings (bf16 matmul TFLOP/s, copy GB/s) once; later steps reuse them
   through ``PENGUIN_CEILINGS``;
2. ``pytest tests`` (on a GPU this includes the bf16 and CUDA-only cases), results from JUnit XML;
3. ``pytest <file> --benchmark-only`` for each ``bench/test_bench_*.py``, one file at a time so a
   timeout loses at most one file's numbers.

The JSON holds the environment, ceilings, every step's status and output tail, the test counts
and failures, and every benchmark's ``extra_info``; the Markdown file is the short table of it.
Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_TAIL = 3000


@dataclass
class Step:
    name: str
    command: list[str]
    status: str = "pending"  # ok | failed | timeout | skipped
    returncode: int | None = None
    seconds: float = 0.0
    output_tail: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _env(ceilings_path: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if ceilings_path is not None:
        env["PENGUIN_CEILINGS"] = str(ceilings_path)
    return env


def _run(step: Step, timeout: float, env: dict[str, str]) -> Step:
    if timeout < 5:
        step.status = "skipped"
        step.output_tail = "out of time budget"
        return step
    t0 = time.monotonic()
    # Own process group, so a timeout also ends the compile subprocesses a test may have started.
    proc = subprocess.Popen(
        step.command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        step.returncode = proc.returncode
        step.status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        # SIGINT first: pytest then stops, prints its summary and still writes its JUnit/JSON reports.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        step.status = "timeout"
        step.returncode = proc.returncode
    step.seconds = time.monotonic() - t0
    step.output_tail = (out or "")[-_TAIL:]
    return step


def _ceilings_step(path: Path, timeout: float, env: dict[str, str]) -> Step:
    code = (
        "import sys; from bench.timing import measure_ceilings, environment; "
        "import json; c = measure_ceilings(); "
        f"open({str(path)!r}, 'w').write(c.to_json()); "
        "print(json.dumps({'ceilings': json.loads(c.to_json()), 'environment': environment()}))"
    )
    step = _run(Step("ceilings", [sys.executable, "-c", code]), timeout, env)
    for line in reversed(step.output_tail.splitlines()):
        if line.startswith("{"):
            step.details = json.loads(line)
            break
    return step


def _junit_summary(path: Path) -> dict[str, Any]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failures = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                message = (el.get("message") or "").strip().splitlines()
                failures.append(
                    {
                        "test": f"{case.get('classname')}::{case.get('name')}",
                        "kind": tag,
                        "message": message[0][:300] if message else "",
                    }
                )
    counts["failed_tests"] = failures
    return counts


def _bench_rows(path: Path) -> list[dict[str, Any]]:
    # pytest-benchmark leaves the file empty when no benchmark ran, and truncated when killed.
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    rows = []
    for b in data.get("benchmarks", []):
        median_ms = b["stats"]["median"] * 1e3
        info = {"time_ms": median_ms, **b.get("extra_info", {})}
        rows.append({"name": b["fullname"], "params": b.get("params"), "wall_median_ms": median_ms, **info})
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown(result: dict[str, Any]) -> str:
    env = result.get("environment", {})
    ceil = result.get("ceilings") or {}
    lines = [
        f"# GPU suite, {result['date']}",
        "",
        f"- device: {env.get('device', '?')} (sm {env.get('capability', '?')}, {env.get('sm_count', '?')} SMs), "
        f"driver {env.get('driver', '?')}, CUDA {env.get('cuda', '?')}",
        f"- torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, python {env.get('python', '?')}",
        f"- ceilings: bf16 matmul {_fmt(ceil.get('matmul_tflops'), '.0f')} TFLOP/s, "
        f"copy {_fmt(ceil.get('copy_gbps'), '.0f')} GB/s (measured)",
    ]
    tests = result.get("tests") or {}
    if tests:
        lines.append(
            f"- tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped"
        )
        lines += [f"  - FAILED `{f['test']}`: {f['message']}" for f in tests["failed_tests"]]
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} |" for s in result["steps"]]
    lines += [
        "",
        "| benchmark | time ms | TFLOP/s | % peak | GB/s | % peak | % roofline | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("benchmarks", []):
        speedups = ", ".join(
            f"{k.removeprefix('speedup_vs_')} {v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_")
        )
        name = r["name"].split("::", 1)[-1]
        lines.append(
            f"| {name} | {_fmt(r.get('time_ms'), '.4g')} | {_fmt(r.get('tflops'), '.3g')} | "
            f"{_fmt(r.get('pct_peak_tflops'), '.0f')} | {_fmt(r.get('gbps'), '.0f')} | "
            f"{_fmt(r.get('pct_peak_gbps'), '.0f')} | {_fmt(r.get('pct_roofline'), '.0f')} | {speedups or '-'} |"
        )
    return "\n".join(lines) + "\n"


def _unique(path: Path) -> Path:
    candidate, i = path, 2
    while candidate.with_suffix(".json").exists():
        candidate = path.with_name(f"{path.name}-{i}")
        i += 1
    return candidate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="directory for the results")
    parser.add_argument("--budget", type=float, default=510, help="seconds for the whole suite (default 510)")
    parser.add_argument("--tests-share", type=float, default=0.4, help="fraction of the budget for the tests")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for the benchmarks")
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.budget
    left = lambda: deadline - time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="penguin-suite-"))
    ceilings_path = work / "ceilings.json"
    env = _env(None)
    steps: list[Step] = []
    result: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds")}

    step = _ceilings_step(ceilings_path, min(120, left()), env)
    steps.append(step)
    result["ceilings"] = step.details.get("ceilings")
    result["environment"] = step.details.get("environment") or _fallback_environment()
    if ceilings_path.exists():
        env = _env(ceilings_path)

    if not args.skip_tests:
        junit = work / "tests.xml"
        cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        step = _run(Step("tests", cmd), min(args.tests_share * args.budget, left() - 80), env)
        step.details = _junit_summary(junit)
        # pytest exits 1 for failed tests: a completed run with failures is "failed", not a crash.
        steps.append(step)
        result["tests"] = step.details

    result["benchmarks"] = []
    if not args.skip_bench:
        files = sorted((ROOT / "bench").glob("test_bench_*.py"))
        for i, path in enumerate(files):
            out = work / f"{path.stem}.json"
            cmd = [sys.executable, "-m", "pytest", str(path.relative_to(ROOT)), "--benchmark-only", "-q", "-rfE"]
            cmd += ["-p", "no:cacheprovider", f"--benchmark-json={out}"]
            if args.keyword:
                cmd += ["-k", args.keyword]
            # Keep 40 s for each file still to run, and never less than an even share of what is left.
            later = len(files) - i - 1
            step = _run(Step(f"bench:{path.stem}", cmd), max(left() - 40 * later, left() / (later + 1)), env)
            if step.returncode == 5:
                step.status = "ok"  # every benchmark in the file was deselected by -k
            rows = _bench_rows(out)
            step.details = {"benchmarks": len(rows)}
            result["benchmarks"] += rows
            steps.append(step)

    result["steps"] = [asdict(s) for s in steps]
    args.out.mkdir(parents=True, exist_ok=True)
    device = (result["environment"] or {}).get("device", "unknown")
    stem = _unique(args.out / f"{dt.date.today().isoformat()}-{_slug(device)}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0 if all(s.status == "ok" for s in steps) else 1


def _fallback_environment() -> dict[str, Any]:
    try:
        from bench.timing import environment

        return environment()
    except Exception as exc:  # the suite still writes its results when the package cannot import
        return {"error": repr(exc)}


if __name__ == "__main__":
    sys.exit(main())
