"""Dependencies point one way, ui -> app -> engine -> kernels: no module imports a layer above its own, and no
modules import each other in a cycle within a layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each layer may not import (the layers above it, and the GUI/server toolkits for the lower ones).
FORBIDDEN = {
    "kernels": {"engine", "app", "ui", "PySide6", "aiohttp"},
    "engine": {"app", "ui", "PySide6", "aiohttp"},
    "app": {"ui", "PySide6"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"{layer}/ has no modules"
    offenders = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[layer]) for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules path imports at run time (imports inside functions too, not `if TYPE_CHECKING:` ones):
    `from a.b import c` is module a.b.c when that exists, else a.b."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself): Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


@pytest.mark.parametrize("layer", ["kernels", "engine", "app", "ui"])
def test_no_import_cycles_within_a_layer(layer):
    files = {_module_name(f): f for f in (ROOT / layer).rglob("*.py")}
    known = set(files)
    # A package's __init__ re-exporting its modules is not a cycle with them: a module importing the package
    # itself would be, and shows up through the package's own edges.
    graph = {name: imported_modules(path, known) - {name} for name, path in files.items()}
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_only_app_reads_the_environment():
    for layer in ("engine", "kernels"):
        for f in (ROOT / layer).rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            assert "os.environ" not in text and "getenv" not in text, f"{f.relative_to(ROOT)} reads env vars"


def test_the_checker_sees_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import app.cli.main\nfrom ui import bridge\nfrom . import sibling\n")
    assert imported_roots(sample) == {"app", "ui"}


def test_the_engine_imports_without_qt_aiohttp_or_gguf():
    """The GPU image has torch, triton and transformers only: engine/ and kernels/ must import there."""
    import subprocess
    import sys

    code = (
        "import sys, engine, engine.attention.triton_backend, kernels.triton_attention; "
        "print(sorted(m for m in ('gguf', 'PySide6', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
