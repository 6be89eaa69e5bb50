"""What a model's weights will occupy resident, counted from its headers (the engine's own arithmetic, checked
against the engine), estimated from a Hub file's size before a download, and whether it fits the memory a
(monkeypatched) machine has."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from app.library import machine, model_store
from app.library.footprint import estimate_gguf_file, read_weights
from app.library.machine import CPU_RESERVE, GIB, MachineMemory, check_fit, check_gguf_file, check_model_fits
from engine.models.hub import ModelLoadError


def local_num_params(path):
    weights = read_weights(path)
    return None if weights is None else weights.num_params


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


# ---- GGUF files: their quantized weights stay quantized ----------------------------------------------------------

SMOLLM2_RESIDENT = 96_576_768  # engine.weight_bytes of SmolLM2's Q4_1 file loaded as it comes (auto)


def test_a_q4_1_file_is_judged_by_its_kept_size_not_at_4_bytes_a_parameter(smollm2_gguf, monkeypatch):
    weights = read_weights(smollm2_gguf)
    assert (weights.format, weights.label, weights.num_params) == ("gguf", "Q4_1", SMOLLM2_135M_PARAMS)
    resident = weights.resident(4, "auto")
    assert resident.bytes == SMOLLM2_RESIDENT and resident.how == "Q4_1 kept quantized"
    assert weights.resident(4, "none").bytes == SMOLLM2_135M_PARAMS * 4  # dequantized: the float32 model
    # room for the 98 MB file's weights beside the reserve, not for 135M float32 weights (538 MB)
    monkeypatch.setattr(machine, "machine_memory", lambda: small_machine(GIB // 4 + 200_000_000))
    fit = check_model_fits(smollm2_gguf, {})
    assert (fit.verdict, fit.weights, fit.needed) == ("tight", SMOLLM2_RESIDENT, SMOLLM2_RESIDENT + GIB // 4)
    assert fit.message.startswith("Tight: needs about 0.3 GiB, 0.4 GiB of RAM is free; weights 92 MiB")
    assert "(Q4_1 kept quantized) + 256 MiB for the KV cache and activations" in fit.message
    assert check_fit(SMOLLM2_135M_PARAMS, small_machine(GIB // 4 + 200_000_000)).verdict == "too big"
    assert check_model_fits(smollm2_gguf, {"quantization": "none"}).verdict == "too big"
    # before a download only the Hub's size is known: its estimate lands within 2% of the headers' count
    estimate = estimate_gguf_file(model_store.DEFAULT_MODEL.size, "Q4_1", 4, "auto")
    assert abs(estimate.bytes - SMOLLM2_RESIDENT) < 0.02 * SMOLLM2_RESIDENT
    assert estimate.how == "Q4_1 kept quantized, estimated from the file size"


@pytest.mark.parametrize(
    "label, size, options, resident",
    [
        ("Q4_K_M", 4_500_000, {}, 4_625_000),  # Q4_K's 4.5 bits a weight kept as q4k's 4.625
        ("Q8_0", 8_500_000, {}, 8_500_000),  # the same grid: the same size
        ("Q6_K", 6_562_500, {}, 8_500_000),  # requantized to q8g32: larger than the file
        ("IQ4_XS", 4_250_000, {}, 32_000_000),  # not kept quantized: float32 on the CPU, 7.5x the file
        ("F16", 16_000_000, {}, 32_000_000),
        ("F16", 16_000_000, {"dtype": "bfloat16"}, 16_000_000),
        ("IQ4_XS", 4_250_000, {"quantization": "int8"}, 8_500_000),
        ("Q8_0", 8_500_000, {"quantization": "int4"}, 5_000_000),
        ("Q4_0", 4_500_000, {"quantization": "none"}, 32_000_000),
        ("Q4_0_4_4", 4_500_000, {}, 4_500_000),  # a type unknown here: the file's size
        (None, 4_500_000, {}, 4_500_000),
    ],
)
def test_a_hub_file_is_estimated_from_its_size_and_quantization(label, size, options, resident):
    fit = check_gguf_file(size, label, small_machine(64 * GIB), options)
    assert fit.weights == resident  # each case is a million weights
    assert fit.needed == resident + GIB // 4


def _engine_weight_bytes(source, mode: str) -> int:
    """What the engine holds resident for `source` loaded with quantization `mode` in float32 (as
    LLMEngine.weight_bytes reports it), built without a tokenizer or KV cache."""
    from engine.models import quantization
    from engine.models.llama import LlamaForCausalLM

    config = source.checkpoint.config if source.format == "gguf" else source.hf_config
    model = LlamaForCausalLM(config, max_positions=64)
    cpu = torch.device("cpu")
    kept = model.keep_quantized(quantization.candidates(source, mode, cpu))
    model.materialize(cpu, torch.float32)
    model.load_weights(quantization.weight_stream(source, torch.float32, mode, kept))
    return model.weight_bytes()


@pytest.mark.parametrize("mode", ["auto", "none", "int8", "int4"])
@pytest.mark.parametrize(
    "label, types",
    [
        ("Q4_K_M", {"blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K"}),
        # v in F16: the fused q/k/v projection stays float as a whole; down requantized from Q5_K
        ("Q4_0", {"blk.0.attn_v.weight": "F16", "blk.0.ffn_down.weight": "Q5_K"}),
        ("IQ4_XS", {"token_embd.weight": "Q8_0"}),  # only the embedding kept quantized
    ],
)
def test_the_count_from_gguf_headers_is_what_the_engine_holds(tmp_path, make_gguf, label, types, mode):
    from types import SimpleNamespace

    from engine.models.gguf import GGUFCheckpoint

    path = tmp_path / f"tiny-{label}.gguf"
    path.write_bytes(make_gguf(label, types))
    checkpoint = GGUFCheckpoint(path)
    source = SimpleNamespace(format="gguf", checkpoint=checkpoint, weights=checkpoint.weights)
    assert read_weights(path).resident(4, mode).bytes == _engine_weight_bytes(source, mode)


@pytest.mark.parametrize("mode", ["auto", "int8", "int4"])
def test_the_count_from_safetensors_headers_is_what_the_engine_holds(tiny_chat_model, mode):
    from engine.models.loader import open_model

    weights = read_weights(tiny_chat_model)
    assert weights.label == "F32"
    assert weights.resident(4, mode).bytes == _engine_weight_bytes(open_model(str(tiny_chat_model)), mode)


def test_the_process_rss_grows_with_memory_it_touches_and_stays_near_its_peak(monkeypatch):
    import mmap
    import resource

    before = machine.process_rss()
    # Fresh anonymous pages, every one written: resident. (A tensor could land in memory malloc already held.)
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    after = machine.process_rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    assert before > 0 and after - before >= 48 * 2**20
    assert after <= peak + 8 * 2**20  # the kernel's counters of the two lag each other by a few pages
    block.close()
    # Without /proc (macOS), the peak stands in.
    real_path = machine.Path
    monkeypatch.setattr(machine, "Path", lambda _: real_path("/nonexistent/statm"))
    assert machine.process_rss() >= peak


def test_memory_use_is_said_in_binary_units():
    use = machine.MemoryUse(rss=412 * 2**20, weights=97 * 2**20, kv_pool=int(2.5 * GIB))
    assert str(use) == "Memory 412 MiB (weights 97 MiB, KV 2.5 GiB)"
    assert str(machine.MemoryUse(0, 97 * 2**20, 2**20)) == "Memory: weights 97 MiB, KV 1 MiB"  # RSS unknown
