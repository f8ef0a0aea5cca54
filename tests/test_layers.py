"""The import graph of vitkit: layers point one way, no cycles, no function-local imports hiding either."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vitkit"

# A package may not import these (cli -> engine/tools -> weights -> models; data -> leaf helpers only).
FORBIDDEN = {
    "vitkit.models": ("vitkit.weights", "vitkit.engine", "vitkit.tools", "vitkit.data", "vitkit.cli"),
    "vitkit.weights": ("vitkit.engine", "vitkit.tools", "vitkit.cli"),
    "vitkit.data": ("vitkit.engine", "vitkit.tools", "vitkit.weights", "vitkit.models", "vitkit.cli"),
    "vitkit.engine": ("vitkit.tools", "vitkit.cli"),
    "vitkit.tools": ("vitkit.cli",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def vitkit_imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(imported vitkit module, imported inside a function) for every import in `tree`."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module \
                    and child.module.split(".")[0] == "vitkit":
                out.extend((f"{child.module}.{a.name}" if MODULES.get(f"{child.module}.{a.name}") else child.module,
                            local) for a in child.names)
            elif isinstance(child, ast.Import):
                out.extend((a.name, local) for a in child.names if a.name.split(".")[0] == "vitkit")
            visit(child, inner)

    visit(tree, False)
    return out


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH: dict[str, list[tuple[str, bool]]] = {m: vitkit_imports(ast.parse(p.read_text())) for m, p in MODULES.items()}


def test_no_function_local_imports_of_vitkit() -> None:
    local = sorted(f"{m} imports {t}" for m, edges in GRAPH.items() for t, is_local in edges if is_local)
    assert not local, "function-local imports of vitkit modules:\n" + "\n".join(local)


def test_no_import_cycles() -> None:
    edges = {m: {t for t, _ in e if t in MODULES and t != m} for m, e in GRAPH.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def walk(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                walk(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_down(package: str) -> None:
    wrong = sorted(f"{m} imports {t}" for m, edges in GRAPH.items() if m == package or m.startswith(package + ".")
                   for t, _ in edges if t.startswith(FORBIDDEN[package]))
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_cli() -> None:
    assert not [m for m, edges in GRAPH.items() if any(t == "vitkit.cli" for t, _ in edges)]


def test_importing_data_loads_no_engine() -> None:
    code = "import sys, vitkit.data; print(sorted(m for m in sys.modules if m.startswith(('vitkit.engine', " \
           "'vitkit.tools'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_data_never_receives_the_run_config() -> None:
    hits = [f"{p}:{i}" for p in (ROOT / "data").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "cfg: Any" in line]
    assert not hits


def test_cli_help_imports_no_torch() -> None:
    """`vitkit --help` and a mistyped verb answer without loading torch (lazy `vitkit` package, issue 18)."""
    code = ("import sys, contextlib, io; from vitkit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    assert main(['--help']) == 0 and main(['trian']) == 2\n"
            "import vitkit; print(sorted(m for m in ('torch', 'numpy', 'vitkit.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
