"""Static compilation of shipped kernel configs for a GPU architecture, without a GPU.

Every kernel module exposes ``compile_cases(arch) -> list[CompileCase]``: one case per config it
launches on that architecture (tile sizes, warps, stages, dtypes). :func:`compile_case` runs
Triton's full pipeline for ``GPUTarget("cuda", arch, 32)`` (TTIR -> TTGIR -> LLVM -> PTX -> cubin
through the ``ptxas`` bundled with Triton) and reads the cubin back with the bundled ``cuobjdump``:

* registers per thread, stack frame and local memory (``cuobjdump -res-usage``);
* spill traffic: local loads/stores (``LDL``/``STL``) in the SASS;
* shared memory: Triton's dynamic allocation plus the static part, against the per-block limit;
* tensor-core instructions: ``HGMMA`` (wgmma, sm_90) and ``HMMA`` (mma.sync, sm_80 and later).

This catches what the CPU interpreter forgives (layout or lowering errors, spills, configs that
do not fit in shared memory) and shows whether Hopper kernels issue wgmma.

Launch-time specialisation is reproduced: pointers are marked 16-byte aligned (as PyTorch
allocations are), ints listed in ``CompileCase.aligned`` are marked multiples of 16, and runtime
ints that Triton would specialise to a constant (a stride of 1) go in ``constexprs``.
:func:`check_case` validates a case against the kernel's parameters without compiling.

``TRITON_INTERPRET=1`` turns ``@triton.jit`` functions into interpreted ones at import time, and the
test suite sets it on machines without a GPU. :func:`inspect_modules` therefore compiles in
subprocesses started with ``TRITON_INTERPRET=0``; :func:`compile_case` works in-process only when
the interpreter is off. :func:`main` (``<module> --arch 90 --arch 80``) is the subprocess entry point
and prints the reports of one module as JSON. Disassembly results are cached beside Triton's cache,
keyed by the cubin's hash, so a rerun with unchanged kernels costs only the imports.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from penguin_kernels.compile_case import CompileCase
from penguin_kernels.device import SHARED_MEMORY_PER_BLOCK, interpreter_active

__all__ = [
    "KERNEL_MODULES",
    "CompileReport",
    "check_case",
    "compile_case",
    "inspect_module",
    "inspect_modules",
]

# Every module that ships Triton kernels; each defines compile_cases(arch).
KERNEL_MODULES = (
    "penguin_kernels.rope",
    "penguin_kernels.attention",
    "penguin_kernels.gemm",
    "penguin_kernels.mlp",
    "penguin_kernels.norm",
    "penguin_kernels.attention_backward",
    "penguin_kernels.gemm_backward",
    "penguin_kernels.norm_backward",
    "penguin_kernels.rope_backward",
)


_REPORT_MARKER = "penguin-compile-reports:"
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass(frozen=True)
class CompileReport:
    """What the compiler produced for one :class:`CompileCase` on one architecture."""

    module: str
    name: str
    kernel: str
    arch: int
    num_warps: int = 0
    num_stages: int = 0
    tensor_cores: bool = False
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0
    hgmma: int = 0
    hmma: int = 0
    compile_s: float = 0.0
    error: str | None = None
    sass_mnemonics: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def spills(self) -> bool:
        """Any local-memory traffic: register spills (Triton kernels keep no arrays in local memory)."""
        return bool(self.stack_bytes or self.local_bytes or self.spill_stores or self.spill_loads)

    @property
    def shared_limit(self) -> int | None:
        return SHARED_MEMORY_PER_BLOCK.get(self.arch)

    @property
    def fits_shared(self) -> bool:
        limit = self.shared_limit
        return limit is None or self.shared_bytes <= limit

    @property
    def tensor_core_instructions(self) -> int:
        return self.hgmma + self.hmma

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cuobjdump() -> str:
    from triton import knobs

    path = knobs.nvidia.cuobjdump.path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found (looked for {path!r} inside the triton package)")
    return path


def _cubin_facts(cubin: bytes) -> dict[str, Any]:
    """Resource usage and opcode counts of a cubin, cached by its hash (disassembly takes about a second)."""
    import hashlib
    import tempfile

    from triton import knobs

    cache = Path(knobs.cache.dir) / "penguin-inspect" / f"{hashlib.sha256(cubin).hexdigest()}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", "-sass", f.name], capture_output=True, text=True, check=True)
    usage = _RES_USAGE.search(out.stdout)
    if usage is None:
        raise RuntimeError("could not read the resource usage of the cubin from cuobjdump")
    regs, stack, shared, local = (int(g) for g in usage.groups())
    facts = {
        "registers": regs,
        "stack_bytes": stack,
        "static_shared": shared,
        "local_bytes": local,
        "ops": _sass_mnemonics(out.stdout),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(facts))
    tmp.replace(cache)
    return facts


def _sass_mnemonics(sass: str) -> dict[str, int]:
    """Count of each opcode (without modifiers) in a ``cuobjdump -sass`` listing."""
    counts: dict[str, int] = {}
    for line in sass.splitlines():
        # Instruction lines read "/*0130*/   @!P0 HGMMA.64x128x16.F32.BF16 gdesc[UR4], ... ;"
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@\S+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def _kernel(fn: Any) -> Any:
    """The ``@triton.jit`` function under ``@triton.heuristics`` / ``@triton.autotune`` wrappers."""
    from triton.runtime.interpreter import InterpretedFunction

    while not isinstance(fn, (_jit_type(), InterpretedFunction)) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _jit_type() -> type:
    from triton.runtime import JITFunction

    return JITFunction


def check_case(case: CompileCase) -> dict[str, str]:
    """The full ``ASTSource`` signature of ``case`` (constexprs typed ``"constexpr"``), in parameter order.

    Raises ``ValueError`` naming the parameters that are unknown, given twice or missing. Works with
    the interpreter on, so kernel tests can check their ``compile_cases`` cheaply.
    """
    fn = _kernel(case.fn)
    names = list(fn.arg_names)
    unknown = sorted((set(case.signature) | set(case.constexprs) | set(case.aligned)) - set(names))
    if unknown:
        raise ValueError(f"{case.name}: {unknown} are not parameters of {fn.__name__}{tuple(names)}")
    both = sorted(set(case.signature) & set(case.constexprs))
    if both:
        raise ValueError(f"{case.name}: {both} appear in both signature and constexprs")
    missing = [n for n in names if n not in case.signature and n not in case.constexprs]
    if missing:
        raise ValueError(f"{case.name}: no type or constant given for {missing}")
    not_int = [n for n in case.aligned if n not in case.signature or case.signature[n] not in ("i32", "i64")]
    if not_int:
        raise ValueError(f"{case.name}: aligned names runtime int arguments only, got {not_int}")
    return {n: "constexpr" if n in case.constexprs else case.signature[n] for n in names}


def compile_case(case: CompileCase, arch: int, *, module: str = "") -> CompileReport:
    """Compile ``case`` for ``sm_<arch>`` in this process and measure the result.

    Raises ``RuntimeError`` when Triton's interpreter is on (use :func:`inspect_modules`, which
    compiles in a clean subprocess); compiler errors propagate.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    signature = check_case(case)
    fn = _kernel(case.fn)
    if interpreter_active() or not isinstance(fn, _jit_type()):
        raise RuntimeError(
            f"{case.name}: compiling needs @triton.jit functions imported with TRITON_INTERPRET unset or 0 "
            f"(got {type(fn).__name__}); use inspect_modules(), which compiles in a subprocess"
        )
    index = {n: i for i, n in enumerate(fn.arg_names)}
    aligned = [n for n, t in signature.items() if t.startswith("*")] + list(case.aligned)
    attrs = {(index[n],): [["tt.divisibility", 16]] for n in aligned}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(case.constexprs), attrs=attrs)
    t0 = time.perf_counter()
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    elapsed = time.perf_counter() - t0
    facts = _cubin_facts(kernel.asm["cubin"])
    ops = facts["ops"]
    return CompileReport(
        module=module,
        name=case.name,
        kernel=fn.__name__,
        arch=arch,
        num_warps=case.num_warps,
        num_stages=case.num_stages,
        tensor_cores=case.tensor_cores,
        registers=facts["registers"],
        stack_bytes=facts["stack_bytes"],
        local_bytes=facts["local_bytes"],
        spill_stores=ops.get("STL", 0),
        spill_loads=ops.get("LDL", 0),
        shared_bytes=int(kernel.metadata.shared) + facts["static_shared"],
        hgmma=ops.get("HGMMA", 0),
        hmma=ops.get("HMMA", 0),
        compile_s=elapsed,
        sass_mnemonics=ops,
    )


def _error_text(exc: BaseException) -> str:
    # Triton's CompilationError shows where the error is; the chained cause says what it is.
    parts = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        parts.append("".join(traceback.format_exception_only(type(seen), seen)).strip())
        seen = seen.__cause__ or seen.__context__
    return "\ncaused by: ".join(parts)[-4000:]


def inspect_module(module: str, arch: int) -> list[CompileReport]:
    """Compile every case of ``module.compile_cases(arch)`` in this process; errors become reports."""
    try:
        cases = importlib.import_module(module).compile_cases(arch)
    except Exception as exc:  # a broken module becomes a report, so the other modules still compile
        return [CompileReport(module=module, name="compile_cases", kernel="", arch=arch, error=_error_text(exc))]
    reports = []
    for case in cases:
        try:
            reports.append(compile_case(case, arch, module=module))
        except Exception as exc:
            kernel = getattr(_kernel(case.fn), "__name__", "")
            reports.append(
                CompileReport(
                    module=module,
                    name=case.name,
                    kernel=kernel,
                    arch=arch,
                    num_warps=case.num_warps,
                    num_stages=case.num_stages,
                    tensor_cores=case.tensor_cores,
                    error=_error_text(exc),
                )
            )
    return reports


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    # Triton 3.9 warns when this is unset; 1 is the default on every supported version.
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


_WORKER = "import sys; from bench.compile import main; sys.exit(main(sys.argv[1:]))"


def _run_subprocess(module: str, archs: Sequence[int], timeout: float) -> list[CompileReport]:
    cmd = [sys.executable, "-c", _WORKER, module, *(f"--arch={a}" for a in archs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        error = f"compile subprocess timed out after {timeout}s"
        return [CompileReport(module=module, name="compile_cases", kernel="", arch=a, error=error) for a in archs]
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_REPORT_MARKER):
            rows = json.loads(line[len(_REPORT_MARKER) :])
            return [CompileReport(**row) for row in rows]
    error = f"compile subprocess exited with {proc.returncode}:\n{(proc.stderr or proc.stdout)[-4000:]}"
    return [CompileReport(module=module, name="compile_cases", kernel="", arch=a, error=error) for a in archs]


def inspect_modules(
    modules: Sequence[str] = KERNEL_MODULES,
    archs: Sequence[int] = (90,),
    *,
    jobs: int | None = None,
    timeout: float = 900,
) -> list[CompileReport]:
    """Compile every case of every module for every arch, one subprocess per module.

    Subprocesses run with ``TRITON_INTERPRET=0`` whatever this process uses, ``jobs`` at a time
    (default: the CPU count). Reports come back in ``modules`` x ``archs`` order; a module that fails
    to import or a case that fails to compile yields a report with ``error`` set.
    """
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(modules)))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda m: _run_subprocess(m, archs, timeout), modules)
        return [r for batch in results for r in batch]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile one module's shipped kernel configs; print JSON reports.")
    parser.add_argument("module", help="module defining compile_cases(arch), e.g. penguin_kernels.attention")
    parser.add_argument("--arch", type=int, action="append", required=True, help="compute capability: 90, 80")
    args = parser.parse_args(argv)
    if interpreter_active():
        parser.error("TRITON_INTERPRET must be unset or 0 to compile kernels")
    reports = [r for arch in args.arch for r in inspect_module(args.module, arch)]
    print(_REPORT_MARKER + json.dumps([r.to_dict() for r in reports]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
