"""Dependencies point one way, ui -> app -> engine -> kernels: no module imports a layer above its own."""
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


def test_only_app_reads_the_environment():
    for layer in ("engine", "kernels"):
        for f in (ROOT / layer).rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            assert "os.environ" not in text and "getenv" not in text, f"{f.relative_to(ROOT)} reads env vars"


def test_the_checker_sees_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import app.cli\nfrom ui import bridge\nfrom . import sibling\n")
    assert imported_roots(sample) == {"app", "ui"}


def test_the_engine_imports_without_qt_aiohttp_or_gguf():
    """The GPU image has torch, triton and transformers only: engine/ and kernels/ must import there."""
    import subprocess
    import sys

    code = ("import sys, engine, engine.attention.triton_backend, kernels.triton_attention; "
            "print(sorted(m for m in ('gguf', 'PySide6', 'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
