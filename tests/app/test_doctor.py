"""kvstudio doctor: the probes read this machine (model store from KVSTUDIO_DATA_DIR, free disk, torch, Qt in a
child process), and the judgement of what is missing is checked on environments changed one fact at a time."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch

from app.cli import doctor
from app.cli import main as cli
from app.library import model_store
from app.library.machine import GIB, MachineMemory, check_fit, check_gguf_file, machine_memory
from app.units import byte_size

MIB = 2**20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("doctor") / "kvstudio-data"  # not created: the store is empty


@pytest.fixture(scope="module")
def env(data_dir) -> doctor.Environment:
    """One real probe of this machine with an empty model store (it takes seconds: torch, the engine, Qt)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(model_store.DATA_DIR_ENV, str(data_dir))
        mp.delenv("DISPLAY", raising=False)
        mp.delenv("WAYLAND_DISPLAY", raising=False)
        return doctor.collect()


def cpu_memory(available: int) -> MachineMemory:
    return MachineMemory("cpu", 2 * available, available, 4, 3 * GIB)


def messages(env: doctor.Environment, fatal: bool) -> list[str]:
    return [f.message for f in doctor.findings(env) if f.fatal == fatal]


def test_the_probe_reads_this_machine(env, data_dir):
    assert env.model_store == data_dir / "models"
    assert env.default_model == data_dir / "models" / model_store.DEFAULT_MODEL.filename
    assert not env.default_model_present
    assert env.disk_path == data_dir.parent  # the nearest folder that exists
    assert abs(env.disk_free - shutil.disk_usage(data_dir.parent).free) < 256 * MIB
    assert env.torch_version == torch.__version__ and env.torch_error is None and env.engine_error is None
    assert env.memory is not None and env.memory.total == machine_memory().total
    assert env.display is False
    # conftest sets QT_QPA_PLATFORM=offscreen; the child process started Qt on it
    assert env.qt.platform == "offscreen" and env.qt.error is None and "offscreen" in env.qt.plugins


def test_the_report_prints_the_probed_values(env, data_dir):
    text = doctor.render(env, doctor.findings(env))

    def row(label: str, value: str) -> bool:
        return re.search(rf"^  {label} +{re.escape(value)}$", text, re.MULTILINE) is not None

    assert row("Model store", str(data_dir / "models"))
    assert row("Free disk", f"{byte_size(env.disk_free)} at {data_dir.parent}")
    assert row("torch", torch.__version__)
    assert row("Default model", f"{env.default_model} (not fetched)")
    # Doctor loads no model: it says what it holds itself and what the default model's weights will take.
    assert env.rss > 0
    assert row("Process memory", f"{byte_size(env.rss)} resident (this process, torch and the engine imported)")
    fit = check_gguf_file(model_store.DEFAULT_MODEL.size, doctor.DEFAULT_MODEL_QUANT, env.memory)
    assert model_store.DEFAULT_MODEL.size // 2 < fit.weights <= model_store.DEFAULT_MODEL.size  # kept quantized
    assert row(
        "Default model memory",
        f"weights {byte_size(fit.weights)} once loaded, about {byte_size(fit.needed)} with the KV cache and "
        "activations",
    )
    assert "the default model is not fetched yet" in text
    assert text.endswith("kvstudio can run here.")


def test_largest_model_is_the_edge_of_check_fit():
    memory = cpu_memory(16 * GIB)
    fits = doctor.largest_model(memory, "fits")
    assert check_fit(fits, memory).verdict == "fits"
    assert check_fit(fits + 1_000_000, memory).verdict != "fits"
    tight = doctor.largest_model(memory, "tight")
    assert check_fit(tight, memory).verdict == "tight" and not check_fit(tight + 1_000_000, memory).fits
    assert doctor.largest_model(cpu_memory(GIB), "tight") == 0  # the reserve alone does not fit


def test_a_cpu_machine_says_the_triton_kernels_need_a_gpu(env):
    cpu = dataclasses.replace(env, memory=cpu_memory(16 * GIB), cuda_version=None, nvidia_driver=False)
    assert any(m.startswith("CPU only: the Triton kernels need an NVIDIA GPU") for m in messages(cpu, False))
    gpu = dataclasses.replace(
        env, memory=MachineMemory("cuda (NVIDIA H100)", 80 * GIB, 79 * GIB, 2, GIB), cuda_version="13.0"
    )
    assert not any("CPU only" in m or "CPU attention kernels" in m for m in messages(gpu, False))
    cpu_torch_on_gpu = dataclasses.replace(cpu, nvidia_driver=True)
    assert any("this torch is a CPU build" in m for m in messages(cpu_torch_on_gpu, False))


def test_the_cpu_kernels_name_what_their_build_lacks(env):
    bundle = dataclasses.replace(env, memory=cpu_memory(16 * GIB), compiler=None, torch_headers=False)
    (note,) = [m for m in messages(bundle, False) if "CPU attention kernels" in m]
    assert "(a C++ compiler, torch's C++ headers missing)" in note
    assert not messages(bundle, True)


def test_qt_that_cannot_start_is_fatal_only_with_a_display(env):
    broken = dataclasses.replace(env, qt=doctor.QtStatus(None, None, (), "xcb-cursor0 is needed"))
    assert not messages(broken, True)  # headless: the commands still work
    assert any("Qt does not start here either (xcb-cursor0 is needed)" in m for m in messages(broken, False))
    on_screen = dataclasses.replace(broken, display=True)
    assert messages(on_screen, True) == ["the window cannot open: Qt does not start (xcb-cursor0 is needed)"]


def test_a_missing_platform_plugin_is_said_in_qts_words(monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "nosuchplatform")
    qt = doctor.probe_qt(display=True)
    assert qt.platform is None and "nosuchplatform" in qt.error


def test_disk_and_memory_too_small_for_the_default_model_are_fatal(env):
    full = dataclasses.replace(env, default_model_present=False, disk_free=10 * MIB)
    assert any("the default model" in m and "cannot be fetched" in m for m in messages(full, True))
    fetched = dataclasses.replace(full, default_model_present=True)
    assert not messages(fetched, True)
    assert any(m.startswith("low disk: 10 MiB free") for m in messages(fetched, False))
    small = dataclasses.replace(env, memory=cpu_memory(2 * GIB))
    assert any(m.startswith("not enough memory for the default model") for m in messages(small, True))


def test_torch_that_does_not_import_is_fatal(env):
    broken = dataclasses.replace(env, torch_version=None, torch_error="ImportError: libtorch_cpu.so", memory=None)
    (fatal,) = messages(broken, True)
    assert "torch does not import (ImportError: libtorch_cpu.so)" in fatal
    assert re.search(r"^  torch +does not import$", doctor.render(broken, doctor.findings(broken)), re.MULTILINE)


def test_the_command_exits_1_when_kvstudio_cannot_run(env, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "collect", lambda: env)
    assert cli.main(["doctor"]) == 0
    assert capsys.readouterr().out.endswith("kvstudio can run here.\n")
    monkeypatch.setattr(doctor, "collect", lambda: dataclasses.replace(env, memory=cpu_memory(GIB)))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "ERROR  not enough memory for the default model" in out
    assert out.endswith("kvstudio cannot run here until the errors above are fixed.\n")
