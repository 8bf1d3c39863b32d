"""The pytest plugin every step of ``bench.gpu_suite`` loads (``-p bench.suite_plugin``).

* ``PENGUIN_DRY_RUN=1``: the dry run's CUDA fakes (:mod:`bench.dry_run`), installed before any
  conftest runs;
* ``PENGUIN_JIT_LOG=<file>``: every Triton launch's specialisation key is appended to the file when
  the session ends (:mod:`bench.specialisations`);
* ``PENGUIN_CUT_LOG=<file>``: a benchmark stopped before its first timed round (the step ran out of
  time) is taken out of pytest-benchmark's report, whose statistics of it would fail and lose every
  other row, and its name is written to the file;
* ``--shard I/N``: keep the I-th of N parts of the selected tests, whole files where they fit, so
  N processes run the GPU tests side by side with the module fixtures built once per part.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Generator
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shard", default=None, help="I/N: run the I-th of N parts of the selected tests (0-based)")


def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    from bench import dry_run

    if dry_run.ACTIVE:
        dry_run.install()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PENGUIN_JIT_LOG"):
        from bench import specialisations

        specialisations.install()


def pytest_unconfigure(config: pytest.Config) -> None:
    path = os.environ.get("PENGUIN_JIT_LOG")
    if path:
        from bench import specialisations

        specialisations.write(Path(path))


def shards(files: dict[str, int], n: int) -> list[list[tuple[str, int, int]]]:
    """Split ``{file: test count}`` into ``n`` parts of about equal count: ``(file, start, stop)`` slices.

    Files go whole, largest first, to the lightest part; a file larger than an even share is cut
    into share-sized slices first, so one big kernel file does not leave the other processes idle.
    """
    total = sum(files.values())
    share = max(1, -(-total // n))
    pieces = []
    for name, count in files.items():
        pieces += [(name, start, min(start + share, count)) for start in range(0, count, share)]
    parts: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]
    loads = [0] * n
    for piece in sorted(pieces, key=lambda p: (p[1] - p[2], p[0], p[1])):
        i = loads.index(min(loads))
        parts[i].append(piece)
        loads[i] += piece[2] - piece[1]
    return parts


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, None, None]:
    # Ahead of pytest-benchmark's own wrapper, which computes and saves the statistics.
    bench = getattr(session.config, "_benchmarksession", None)
    path = os.environ.get("PENGUIN_CUT_LOG")
    if bench is not None and path:
        cut = [b for b in bench.benchmarks if not b.stats.data]
        bench.benchmarks[:] = [b for b in bench.benchmarks if b.stats.data]
        with open(path, "a") as f:
            f.writelines(f"{b.fullname}\n" for b in cut)
    yield


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    spec = config.getoption("--shard")
    if not spec:
        return
    index, n = (int(x) for x in spec.split("/"))
    if not 0 <= index < n:
        raise pytest.UsageError(f"--shard {spec}: the index must be in 0..{n - 1}")
    by_file: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        by_file[item.nodeid.split("::")[0]].append(item)
    mine = shards({name: len(group) for name, group in by_file.items()}, n)[index]
    keep = [item for name, start, stop in mine for item in by_file[name][start:stop]]
    kept = set(map(id, keep))
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = [item for item in items if id(item) in kept]
