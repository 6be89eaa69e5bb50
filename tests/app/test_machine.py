"""Counting a local model's weights from its headers, and whether it fits the memory a (monkeypatched) machine has."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from app.library import machine
from app.library.machine import CPU_RESERVE, GIB, MachineMemory, check_model_fits, local_num_params
from engine.models.hub import ModelLoadError

SMOLLM2_135M_PARAMS = 134_515_008  # SmolLM2-135M's published parameter count (its embedding tied to the LM head)


def small_machine(available: int) -> MachineMemory:
    return MachineMemory("cpu", total=available, available=available, bytes_per_param=4, reserve=GIB // 4)


def test_a_safetensors_directory_counts_every_tensor_of_the_shards_its_index_names(tmp_path):
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, tmp_path / "model-1.safetensors")
    save_file({"c": torch.zeros(2, 2, 2)}, tmp_path / "model-2.safetensors")
    assert local_num_params(tmp_path) == 12 + 5 + 8
    # a stray file beside the shards an index names is not part of the model
    save_file({"stray": torch.zeros(100)}, tmp_path / "consolidated.safetensors")
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert local_num_params(tmp_path) == 25


def test_a_gguf_file_counts_its_tensor_table(smollm2_gguf):
    assert local_num_params(smollm2_gguf) == SMOLLM2_135M_PARAMS


def test_no_weights_there_is_unknown(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert local_num_params(tmp_path) is None
    assert local_num_params(tmp_path / "config.json") is None
    assert check_model_fits("org/not-a-path", {}) is None  # a repo id: the loader resolves it


def test_a_truncated_gguf_raises_naming_the_file(tmp_path, smollm2_gguf):
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        cut.write_bytes(f.read(5_000_000))  # the header whole, most tensor data missing
    with pytest.raises(ModelLoadError, match=f"{cut} is truncated"):
        local_num_params(cut)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match=str(garbage)):
        local_num_params(garbage)


def test_a_truncated_safetensors_file_raises_naming_it(tmp_path):
    save_file({"a": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model.safetensors is truncated or not a valid safetensors file"):
        local_num_params(tmp_path)


def test_check_model_fits_weighs_the_weights_in_the_chosen_dtype(tmp_path, monkeypatch):
    save_file({"w": torch.zeros(1000, 1000)}, tmp_path / "model.safetensors")  # 1e6 weights
    needed32, needed16 = 4_000_000 + GIB // 4, 2_000_000 + GIB // 4
    monkeypatch.setattr(machine, "machine_memory", lambda: small_machine(needed32 - 1))
    fit = check_model_fits(tmp_path, {})
    assert (fit.verdict, fit.needed) == ("too big", needed32)
    assert fit.message.startswith("Too big for this machine")
    half = check_model_fits(str(tmp_path), {"dtype": "float16"})
    assert (half.verdict, half.needed) == ("tight", needed16)
    monkeypatch.setattr(machine, "machine_memory", lambda: small_machine(2 * needed32))
    assert check_model_fits(tmp_path, {}).verdict == "fits"


def test_the_kv_pool_and_device_asked_for_count(tmp_path, monkeypatch):
    save_file({"w": torch.zeros(1000, 1000)}, tmp_path / "model.safetensors")
    monkeypatch.setattr(machine, "machine_memory", lambda: MachineMemory("cpu", GIB, GIB, 4, CPU_RESERVE))
    assert check_model_fits(tmp_path, {}).verdict == "too big"  # the default 2 GiB KV pool alone is more than 1 GiB
    small_pool = check_model_fits(tmp_path, {"kv_cache_memory": 0.02})
    assert (small_pool.verdict, small_pool.needed) == ("fits", 4_000_000 + GIB // 2 + int(0.02 * GIB))
    # a GPU machine told to load on its CPU: the RAM counts, not the GPU's memory
    monkeypatch.setattr(machine, "machine_memory", lambda: MachineMemory("cuda (test)", GIB, GIB // 8, 2, GIB))
    monkeypatch.setattr(machine, "_ram", lambda: (64 * GIB, 32 * GIB))
    assert check_model_fits(tmp_path, {}).verdict == "too big"
    on_cpu = check_model_fits(tmp_path, {"device": "cpu"})
    assert (on_cpu.verdict, on_cpu.available) == ("fits", 32 * GIB)
