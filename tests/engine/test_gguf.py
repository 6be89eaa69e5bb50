"""GGUF loading: SmolLM2's config, tokenizer and weights under HF names, and broken or foreign files refused."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from engine.models.gguf import unpermute_rows
from engine.models.loader import ModelLoadError, ModelSource, open_model

HF_LAYER_PARAMETERS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> ModelSource:
    return open_model(str(smollm2_gguf))


@pytest.fixture(scope="module")
def smol_weights(smol: ModelSource) -> dict[str, torch.Tensor]:
    return dict(smol.weights(torch.float32))


def test_config_comes_from_the_metadata(smol: ModelSource, smollm2_gguf: Path) -> None:
    config = smol.hf_config
    assert smol.format == "gguf"
    assert smol.path == smollm2_gguf
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (576, 1536, 64)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert smol.eos_token_ids == [2]


def test_tokenizer_round_trips_and_has_the_chat_template(smol: ModelSource) -> None:
    tokenizer = smol.tokenizer
    assert tokenizer.is_fast
    text = "The capital of France is Paris. 12345 café\n\n  indented"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>user") == [1, tokenizer.encode("user")[0]]
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_splits_digits_off_first(smol: ModelSource) -> None:
    # SmolLM2's pre-tokenizer (tokenizer.ggml.pre "smollm"): digits one by one, then GPT-2's regex, so the spaces
    # before a number stay one token ("ĠĠ"); GPT-2's regex alone, as transformers' GGUF tokenizer has it, gives "Ġ Ġ1"
    assert smol.tokenizer.convert_ids_to_tokens(smol.tokenizer.encode("  12  34")) == ["ĠĠ", "1", "2", "ĠĠ", "3", "4"]


def test_weights_have_hf_names_and_shapes(smol_weights: dict[str, torch.Tensor]) -> None:
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{layer}.{part}.weight" for layer in range(30) for part in HF_LAYER_PARAMETERS
    }
    assert set(smol_weights) == expected  # tied: no lm_head.weight
    assert smol_weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert smol_weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert smol_weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert smol_weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(weight.dtype == torch.float32 for weight in smol_weights.values())
    assert smol_weights["model.embed_tokens.weight"].isfinite().all()


def test_weights_convert_to_the_requested_dtype(smol: ModelSource, smol_weights: dict[str, torch.Tensor]) -> None:
    weights = smol.weights(torch.bfloat16)
    for name, weight in (next(weights), next(weights), next(weights)):
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, smol_weights[name].to(torch.bfloat16))


def test_unpermute_rows_inverts_llama_cpp_permutation() -> None:
    num_heads, head_dim, hidden = 3, 8, 5
    hf_weight = torch.randn(num_heads * head_dim, hidden)
    # llama.cpp's converter: per head, split the rows in halves and interleave them
    gguf_weight = hf_weight.reshape(num_heads, 2, head_dim // 2, hidden).transpose(1, 2).reshape(-1, hidden)
    assert not torch.equal(gguf_weight, hf_weight)
    assert torch.equal(unpermute_rows(gguf_weight, num_heads), hf_weight)


def test_greedy_chat_answer_is_sensible(smol: ModelSource, smol_weights: dict[str, torch.Tensor]) -> None:
    # the end-to-end check of the q/k un-permutation: with it wrong, rotary embeddings scramble attention
    model = LlamaForCausalLM(smol.checkpoint.transformers_config()).eval()
    missing, unexpected = model.load_state_dict(smol_weights, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )["input_ids"]
    with torch.inference_mode():
        output = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    answer = smol.tokenizer.decode(output[0, len(ids) :])
    assert "Paris" in answer


@pytest.mark.parametrize("kept_bytes", [50_000_000, 100_000], ids=["cut-in-tensor-data", "cut-in-metadata"])
def test_truncated_gguf_is_refused(smollm2_gguf: Path, tmp_path: Path, kept_bytes: int) -> None:
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf.open("rb") as source:
        truncated.write_bytes(source.read(kept_bytes))
    with pytest.raises(ModelLoadError, match="truncated") as error:
        open_model(str(truncated))
    assert str(truncated) in str(error.value)


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(ModelLoadError, match="not a GGUF file") as error:
        open_model(str(fake))
    assert str(fake) in str(error.value)


def _write_gguf(path: Path, architecture: str, tensor_names: list[str]) -> None:
    writer = gguf.GGUFWriter(path, architecture)
    for name in tensor_names:
        writer.add_tensor(name, np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tensors_without_a_place_in_the_model_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    _write_gguf(path, "llama", ["token_embd.weight", "blk.0.ffn_gate_exps.weight"])
    with pytest.raises(ModelLoadError, match=r"no place in a 'llama' model: blk.0.ffn_gate_exps.weight"):
        open_model(str(path))


def test_raw_tensors_are_the_files_blocks(smol: ModelSource, smol_weights: dict[str, torch.Tensor]) -> None:
    checkpoint = smol.checkpoint
    assert checkpoint.file_type == "Q4_1"
    types = checkpoint.tensor_types()
    assert types["model.embed_tokens.weight"] == "Q8_0"
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.norm.weight"] == "F32"
    raw = dict(checkpoint.raw_tensors())
    assert raw.keys() == smol_weights.keys()
    q = raw["model.layers.0.self_attn.q_proj.weight"]
    assert (q.ggml_type, q.shape, q.data.shape) == (gguf.GGMLQuantizationType.Q4_1, (576, 576), (576, 576 // 32 * 20))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(raw[name].dequantize(), smol_weights[name])  # un-permuted as whole rows of blocks


def test_a_chat_on_a_gguf_never_imports_transformers_modelling(smollm2_gguf: Path) -> None:
    # The family's config class pulls in transformers' modelling machinery (and sympy through torch.distributed):
    # 60 MiB resident that a chat never uses. A fresh process, since this suite imports transformers' models.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from engine import LLM, SamplingParams\n"
        f"llm = LLM({str(smollm2_gguf)!r})\n"
        "out = llm.generate(['Hi'], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)\n"
        "assert len(out[0].outputs[0].token_ids) == 4\n"
        "print(sorted(m for m in ('transformers.activations', 'transformers.modeling_utils', 'sympy')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
