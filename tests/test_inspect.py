"""Static compilation of every shipped kernel config for sm_90 and sm_80 (no GPU needed).

Each kernel module's ``compile_cases(arch)`` is compiled to a cubin in a subprocess with the
interpreter off; the configs must compile, spill nothing, fit in shared memory, and issue tensor-core
instructions where they say they do (wgmma on Hopper). ``tests/inspect_example.py`` has one clean
and one spilling config with known properties, so the measurements themselves are checked too.
"""

from __future__ import annotations

import pytest

from bench import inspect as inspect_cli
from bench.compile import KERNEL_MODULES, check_case, compile_case, inspect_modules
from penguin_kernels.compile_case import CompileCase
from tests import inspect_example
from tests.utils import INTERPRETER

ARCHS = (90, 80)
EXAMPLE = "tests.inspect_example"
MMA_MODULES = ("penguin_kernels.attention", "penguin_kernels.attention_backward", "penguin_kernels.gemm")


@pytest.fixture(scope="module")
def reports():
    """Every (module, arch) compiled once, in parallel subprocesses; Triton's cache makes reruns cheap."""
    by_key = {}
    for r in inspect_modules((EXAMPLE, *KERNEL_MODULES), ARCHS):
        by_key.setdefault((r.module, r.arch), []).append(r)
    return by_key


def _describe(r) -> str:
    if not r.ok:
        return f"{r.name}: {r.error.splitlines()[-1] if r.error else ''}"
    return (
        f"{r.name}: {', '.join(inspect_cli.problems(r))} (regs {r.registers}, stack {r.stack_bytes} B, "
        f"STL {r.spill_stores}, LDL {r.spill_loads}, smem {r.shared_bytes} B, HGMMA {r.hgmma}, HMMA {r.hmma})"
    )


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_example_clean_config_measured(reports, arch):
    (r,) = [r for r in reports[(EXAMPLE, arch)] if r.name == "fits"]
    assert r.ok, r.error
    assert not r.spills and r.stack_bytes == 0
    assert 0 < r.registers <= 255
    assert 0 < r.shared_bytes <= r.shared_limit
    if arch == 90:
        assert r.hgmma > 0, "a 128x128 bf16 tile on 8 warps should issue wgmma on sm_90"
    else:
        assert r.hgmma == 0 and r.hmma > 0
    assert inspect_cli.problems(r) == []


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_example_spills_detected(reports, arch):
    (r,) = [r for r in reports[(EXAMPLE, arch)] if r.name == "spills"]
    assert r.ok, r.error
    assert r.spills and r.spill_stores > 0 and r.spill_loads > 0
    assert "spills" in inspect_cli.problems(r)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("module", KERNEL_MODULES, ids=lambda m: m.split(".")[-1])
def test_shipped_configs_compile_clean(reports, module, arch):
    rows = reports.get((module, arch), [])
    if not rows:
        pytest.skip(f"{module} launches no kernels of its own (compile_cases returned no configs)")
    assert not (rows[0].name == "compile_cases" and not rows[0].ok), (
        f"{module}.compile_cases({arch}) failed:\n{rows[0].error}"
    )
    bad = [_describe(r) for r in rows if inspect_cli.problems(r)]
    assert not bad, f"{module} on sm_{arch}:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", MMA_MODULES, ids=lambda m: m.split(".")[-1])
def test_mma_kernels_use_wgmma_on_hopper(reports, module):
    rows = [r for r in reports.get((module, 90), []) if r.tensor_cores]
    assert rows, f"{module} declares no tensor-core config for sm_90"
    missing = [_describe(r) for r in rows if not r.ok or r.hgmma == 0]
    assert not missing, f"{module}: no HGMMA on sm_90:\n" + "\n".join(missing)


def _case(**changes) -> CompileCase:
    (case,) = [c for c in inspect_example.compile_cases(90) if c.name == "fits"]
    fields = {f: getattr(case, f) for f in CompileCase.__dataclass_fields__}
    return CompileCase(**{**fields, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"signature": {**_case().signature, "bogus": "i32"}}, "not parameters"),
        ({"signature": {k: v for k, v in _case().signature.items() if k != "K"}}, "no type or constant"),
        ({"signature": {**_case().signature, "BLOCK_M": "i32"}}, "both signature and constexprs"),
        ({"aligned": ("a_ptr",)}, "aligned names runtime int"),
    ],
    ids=["unknown", "missing", "twice", "aligned-pointer"],
)
def test_check_case_names_bad_parameters(changes, message):
    with pytest.raises(ValueError, match=message):
        check_case(_case(**changes))


def test_check_case_orders_full_signature():
    sig = check_case(_case())
    assert list(sig) == list(inspect_example._matmul_kernel.arg_names)
    assert sig["BLOCK_M"] == sig["stride_ak"] == "constexpr" and sig["a_ptr"] == "*bf16"


@pytest.mark.skipif(not INTERPRETER, reason="only meaningful when this process runs Triton's interpreter")
def test_compile_case_refuses_interpreted_functions():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_case(_case(), 90)


def test_cli_table_and_exit_status(reports, monkeypatch, capsys):
    example = reports[(EXAMPLE, 90)]
    monkeypatch.setattr(inspect_cli, "inspect_modules", lambda modules, archs, jobs=None: example)
    assert inspect_cli.main(["--arch", "90", EXAMPLE]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(EXAMPLE)}
    assert "SPILLS" in lines["spills"] and "SPILLS" not in lines["fits"]
    assert "2 configs, 1 with problems" in out
    clean = [r for r in example if r.name == "fits"]
    monkeypatch.setattr(inspect_cli, "inspect_modules", lambda modules, archs, jobs=None: clean)
    assert inspect_cli.main(["--arch", "90", EXAMPLE]) == 0
