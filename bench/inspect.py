"""Compile every shipped kernel config for a GPU architecture and print what the compiler made of it.

    python -m bench.inspect --arch 90            # Hopper: expect HGMMA in the MMA kernels
    python -m bench.inspect --arch 80 attention   # Ampere, one module
    python -m bench.inspect --arch 90 --arch 80 --json reports.json

No GPU is needed: kernels are compiled to cubins with Triton's bundled ``ptxas`` and read back with
its ``cuobjdump`` (see :mod:`bench.compile`). Columns: registers per thread; shared
memory per block against the architecture's limit; spills (stack bytes, local stores/loads in
SASS); tensor-core instructions (``HGMMA`` = wgmma, ``HMMA`` = mma.sync). The exit status is 1 when
any config fails to compile, spills, exceeds shared memory, or declares tensor cores and issues
none of the expected kind (HGMMA on sm_90, HMMA before).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from bench.compile import KERNEL_MODULES, CompileReport, inspect_modules

__all__ = ["main", "problems"]


def problems(report: CompileReport) -> list[str]:
    """What is wrong with one compiled config; empty when it is clean."""
    if not report.ok:
        return ["compile error"]
    out = []
    if report.spills:
        out.append("spills")
    if not report.fits_shared:
        out.append(f"shared memory > {report.shared_limit} B")
    if report.tensor_cores:
        if report.arch >= 90 and report.hgmma == 0:
            out.append("no HGMMA")
        elif report.arch < 90 and report.hmma == 0:
            out.append("no HMMA")
    return out


def _resolve(name: str) -> str:
    return name if "." in name else f"penguin_kernels.{name}"


def _table(reports: Sequence[CompileReport]) -> str:
    header = ("module", "config", "kernel", "sm", "warps", "stages", "regs", "smem KiB", "spills", "HGMMA", "HMMA", "")
    rows = [header]
    for r in reports:
        module = r.module.removeprefix("penguin_kernels.")
        if not r.ok:
            rows.append((module, r.name, r.kernel, str(r.arch), "", "", "", "", "", "", "", "ERROR"))
            continue
        limit = r.shared_limit
        smem = f"{r.shared_bytes / 1024:.1f}" + (f"/{limit // 1024}" if limit else "")
        spills = f"{r.stack_bytes}B {r.spill_stores}st {r.spill_loads}ld" if r.spills else "0"
        rows.append(
            (
                module,
                r.name,
                r.kernel,
                str(r.arch),
                str(r.num_warps),
                str(r.num_stages),
                str(r.registers),
                smem,
                spills,
                str(r.hgmma),
                str(r.hmma),
                ", ".join(problems(r)).upper(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inspect",
        description="Compile the shipped kernel configs for a GPU architecture (no GPU needed) and report "
        "registers, shared memory, spills and tensor-core instructions.",
    )
    parser.add_argument(
        "modules",
        nargs="*",
        help=f"kernel modules (default: all of {', '.join(m.split('.')[-1] for m in KERNEL_MODULES)})",
    )
    parser.add_argument(
        "--arch", type=int, action="append", help="compute capability as an int, repeatable (default: 90)"
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--json", metavar="PATH", help="also write every report as JSON to PATH")
    args = parser.parse_args(argv)

    modules = [_resolve(m) for m in args.modules] or list(KERNEL_MODULES)
    archs = args.arch or [90]
    reports = inspect_modules(modules, archs, jobs=args.jobs)
    print(_table(reports))
    for r in reports:
        if not r.ok:
            print(f"\n{r.module} {r.name} (sm_{r.arch}):\n{r.error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=1)
    bad = sum(1 for r in reports if problems(r))
    print(f"\n{len(reports)} configs, {bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
