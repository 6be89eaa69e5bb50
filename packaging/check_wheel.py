"""`make wheel-check`: the built wheel, installed in a fresh virtual environment, works away from the source tree.

Checks that the wheel carries the data files the code opens (the CPU kernels' C++ source, resources/) and no
tests, then, from a temporary folder outside the repository: the installed packages are the ones imported,
`kvstudio --help`, `kvstudio doctor`, and `kvstudio generate` on the default model (twice: the first run builds
the C++ CPU kernels, as a user's first run does). Prints each step's time; exit status 1 naming a failed step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

MUST_CARRY = (
    "kernels/csrc/paged_decode_attention.cpp",
    "kernels/csrc/quant_gemm.cpp",
    "kernels/csrc/quant_gemm.h",
    "kernels/csrc/paged_decode_attention.h",
    "kernels/csrc/fused_decode.cpp",
    "resources/bench/w64_prompts.jsonl",
    "resources/bench/w64_schema.json",
    "resources/bench/editor_files.txt",
    "resources/icons/kvstudio.svg",
    "app/cli/main.py",
    "engine/llm.py",
    "ui/launcher.py",
)
# The packages an installed kvstudio must import from the venv, and the data files they open.
IMPORTS = """
import sys
from pathlib import Path
import app, engine, kernels, ui
from app.bench.throughput import BUILTIN_WORKLOAD
from kernels import cpu_ops
venv = Path(sys.prefix).resolve()
for module in (app, engine, kernels, ui):
    assert venv in Path(module.__file__).resolve().parents, f"{module.__name__} imported from {module.__file__}"
assert BUILTIN_WORKLOAD.is_file(), BUILTIN_WORKLOAD
assert all(p.is_file() for p in cpu_ops._SOURCES), cpu_ops._SOURCES
print(Path(app.__file__).parent)
"""
TIMEOUT = 600  # seconds: the first generate compiles the CPU kernels (about a minute on two cores)


class CheckFailed(RuntimeError):
    pass


def check_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in MUST_CARRY if name not in names]
    if missing:
        raise CheckFailed(f"{wheel.name} lacks {', '.join(missing)}")
    if any(name.startswith("tests/") for name in names):
        raise CheckFailed(f"{wheel.name} carries the tests")
    print(f"wheel: {wheel.name}, {wheel.stat().st_size / 1024:.0f} KiB, {len(names)} files")


def step(name: str, cmd: list[str], cwd: Path, env: dict, expect: str = "") -> subprocess.CompletedProcess:
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or expect not in proc.stdout:
        raise CheckFailed(f"{name} failed (exit code {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    print(f"{name}: {seconds:.1f} s")
    return proc


def check(venv: Path, wheel: Path) -> None:
    check_contents(wheel)
    kvstudio, python = venv / "bin" / "kvstudio", venv / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="kvstudio-wheel-check-") as tmp:
        cwd = Path(tmp)
        # The kernels compile into a folder of this check's own, not the one the repository's .venv uses.
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cwd / "torch_extensions")}
        installed = step("imports from the venv", [str(python), "-c", IMPORTS], cwd, env).stdout.strip()
        print(f"  app/ at {installed}")
        step("kvstudio --help", [str(kvstudio), "--help"], cwd, env, expect="generate")
        doctor = step("kvstudio doctor", [str(kvstudio), "doctor"], cwd, env, expect="kvstudio can run here.")
        print("  " + doctor.stdout.strip().replace("\n", "\n  "))
        generate = [
            str(kvstudio),
            "generate",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "What is the capital of France?",
        ]
        for run in ("first run, builds the CPU kernels", "second run"):
            proc = step(f"kvstudio generate ({run})", generate, cwd, env, expect="Paris")
            fell_back = "falling back" in proc.stderr
            print(
                f"  {proc.stdout.strip()!r}; attention on "
                f"{'torch ops (the CPU kernels did not build)' if fell_back else 'the C++ CPU kernels'}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path, help="a virtual environment the wheel is installed in")
    parser.add_argument("wheel", type=Path)
    args = parser.parse_args()
    try:
        check(args.venv.resolve(), args.wheel)
    except (CheckFailed, subprocess.TimeoutExpired) as e:
        print(f"wheel-check: FAILED: {e}", file=sys.stderr)
        return 1
    print("wheel-check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
