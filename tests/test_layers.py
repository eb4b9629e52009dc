"""The package's layers: imports only go down (the import-linter contract in pyproject.toml), and no cycles."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def test_every_subpackage_is_in_the_layers_contract():
    subpackages = {f"scan_zoo.{p.name}" for p in (ROOT / "scan_zoo").iterdir() if (p / "__init__.py").is_file()}
    modules = {f"scan_zoo.{p.stem}" for p in (ROOT / "scan_zoo").glob("*.py") if p.stem != "__init__"}
    assert subpackages <= set(_contract_layers()) | {"scan_zoo.weights"}
    assert modules <= set(_contract_layers()), "a top-level module outside every layer"


def test_lint_imports_keeps_the_contract():
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import cycles."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    g = grimp.build_graph("scan_zoo")
    graph = {m: {i for i in g.find_modules_directly_imported_by(m) if i != "scan_zoo"} for m in g.modules}
    assert _cycles(graph) == []


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, source)`` of each import inside a function of ``path`` that no ``# lazy:`` / ``# optional:``
    comment on the line above explains."""
    import ast

    text = path.read_text()
    lines = text.splitlines()
    found = []
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
                if not above.startswith(("# lazy:", "# optional:")):
                    found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


def test_imports_inside_functions_say_why():
    """Imports go at the top; one inside a function is for a heavy or optional dependency, with its reason."""
    unexplained = {
        str(p.relative_to(ROOT)): _function_level_imports(p) for p in sorted((ROOT / "scan_zoo").rglob("*.py"))
    }
    unexplained = {k: v for k, v in unexplained.items() if v}
    assert not unexplained, f"imports inside functions without a '# lazy:'/'# optional:' reason: {unexplained}"


def test_the_import_check_sees_an_unexplained_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import json\n\n\ndef g():\n    # lazy: heavy\n    import csv\n")
    assert _function_level_imports(module) == [(2, "import json")]
