"""Loading Hugging Face model directories: weights equal the saved state_dict, tokenizer and chat template
come through, EOS ids are gathered, and every broken directory fails early with the file named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from engine.models.loader import ModelLoadError, open_model

VOCAB = 49152  # SmolLM2's tokenizer, saved next to the tiny models
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
)


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path, **save_options) -> None:
    model.save_pretrained(directory, **save_options)
    tokenizer.save_pretrained(directory)


def _expected_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    # a tied LM head is the embedding matrix: checkpoints do not store it twice
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, smollm2_tokenizer) -> tuple[Path, dict[str, torch.Tensor]]:
    """An untied tiny Llama in one model.safetensors."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=False))
    directory = tmp_path_factory.mktemp("tiny-llama")
    _save(model, smollm2_tokenizer, directory)
    return directory, _expected_weights(model)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, smollm2_tokenizer) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tied tiny Qwen2 (q/k/v biases) in several shards with model.safetensors.index.json."""
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True))
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    _save(model, smollm2_tokenizer, directory, max_shard_size="1MB")
    return directory, _expected_weights(model)


@pytest.fixture
def broken_copy(tmp_path: Path, qwen2_dir) -> Path:
    """A copy of the sharded model, for a test to break."""
    return Path(shutil.copytree(qwen2_dir[0], tmp_path / "model"))


def _assert_weights_equal(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, weight in expected.items():
        assert torch.equal(loaded[name], weight), name


def test_single_file_weights_equal_the_state_dict(llama_dir) -> None:
    directory, expected = llama_dir
    source = open_model(str(directory))
    assert source.format == "safetensors"
    assert source.path == directory
    assert source.hf_config.architectures == ["LlamaForCausalLM"]
    assert "lm_head.weight" in expected
    _assert_weights_equal(dict(source.weights(torch.float32)), expected)


def test_sharded_weights_equal_the_state_dict(qwen2_dir) -> None:
    directory, expected = qwen2_dir
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    source = open_model(str(directory))
    assert source.hf_config.architectures == ["Qwen2ForCausalLM"]
    assert source.hf_config.tie_word_embeddings is True
    assert "model.layers.0.self_attn.q_proj.bias" in expected
    _assert_weights_equal(dict(source.weights(torch.float32)), expected)


def test_weights_convert_to_the_requested_dtype(qwen2_dir) -> None:
    directory, expected = qwen2_dir
    loaded = dict(open_model(str(directory)).weights(torch.bfloat16))
    assert all(weight.dtype == torch.bfloat16 for weight in loaded.values())
    _assert_weights_equal(loaded, {name: weight.to(torch.bfloat16) for name, weight in expected.items()})


def test_tokenizer_and_chat_template_come_through(llama_dir, smollm2_tokenizer) -> None:
    tokenizer = open_model(str(llama_dir[0])).tokenizer
    assert tokenizer.is_fast
    text = "<|im_start|>user\nThe capital of France?<|im_end|>"
    assert tokenizer.encode(text) == smollm2_tokenizer.encode(text)
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template


def test_separate_chat_template_file_is_used(broken_copy: Path) -> None:
    template = "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    (broken_copy / "chat_template.jinja").write_text(template)
    tokenizer = open_model(str(broken_copy)).tokenizer
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "[user] hi\n"


def test_eos_ids_unite_config_generation_config_and_tokenizer(broken_copy: Path) -> None:
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps(config | {"eos_token_id": 7}))
    (broken_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 7]}))
    # the tokenizer's eos is <|im_end|>, id 2
    assert open_model(str(broken_copy)).eos_token_ids == [7, 2, 0]


def test_weights_are_read_lazily(broken_copy: Path) -> None:
    source = open_model(str(broken_copy))
    shard = broken_copy / "model-00002-of-00002.safetensors"
    shard.unlink()
    weights = source.weights(torch.float32)
    next(weights)  # the first shard is still there
    with pytest.raises(ModelLoadError) as error:
        list(weights)
    assert str(shard) in str(error.value)


# --- every broken model fails in open_model, naming the file


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no such file or directory") as error:
        open_model(str(missing))
    assert str(missing) in str(error.value)


def test_directory_without_config(broken_copy: Path) -> None:
    (broken_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config.json") as error:
        open_model(str(broken_copy))
    assert str(broken_copy) in str(error.value)


def test_directory_without_weights(broken_copy: Path) -> None:
    for file in [*broken_copy.glob("*.safetensors"), broken_copy / "model.safetensors.index.json"]:
        file.unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights") as error:
        open_model(str(broken_copy))
    assert str(broken_copy) in str(error.value)


def test_truncated_safetensors(broken_copy: Path) -> None:
    shard = broken_copy / "model-00001-of-00002.safetensors"
    with shard.open("r+b") as file:
        file.truncate(shard.stat().st_size - 100)
    with pytest.raises(ModelLoadError, match="truncated") as error:
        open_model(str(broken_copy))
    assert str(shard) in str(error.value)


def test_corrupt_safetensors_header(broken_copy: Path) -> None:
    shard = broken_copy / "model-00002-of-00002.safetensors"
    with shard.open("r+b") as file:
        file.seek(8)
        file.write(b"\x00garbage\xff")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file") as error:
        open_model(str(broken_copy))
    assert str(shard) in str(error.value)


def test_missing_shard(broken_copy: Path) -> None:
    shard = broken_copy / "model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(ModelLoadError, match="missing") as error:
        open_model(str(broken_copy))
    assert str(shard) in str(error.value)


def test_index_placing_a_tensor_in_the_wrong_shard(broken_copy: Path) -> None:
    index_file = broken_copy / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(name for name, shard in index["weight_map"].items() if shard == "model-00002-of-00002.safetensors")
    index["weight_map"][name] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=f"lacks tensor {name}") as error:
        open_model(str(broken_copy))
    assert str(broken_copy / "model-00001-of-00002.safetensors") in str(error.value)


def test_corrupt_index(broken_copy: Path) -> None:
    index_file = broken_copy / "model.safetensors.index.json"
    index_file.write_text('{"weight_map": ')
    with pytest.raises(ModelLoadError, match="JSON") as error:
        open_model(str(broken_copy))
    assert str(index_file) in str(error.value)


def test_config_without_architectures(broken_copy: Path) -> None:
    config = json.loads((broken_copy / "config.json").read_text())
    del config["architectures"]
    (broken_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="names no architectures") as error:
        open_model(str(broken_copy))
    assert str(broken_copy / "config.json") in str(error.value)


def test_directory_without_tokenizer(broken_copy: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (broken_copy / name).unlink()
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer") as error:
        open_model(str(broken_copy))
    assert str(broken_copy) in str(error.value)


def test_file_that_is_neither_gguf_nor_directory(broken_copy: Path) -> None:
    shard = broken_copy / "model-00001-of-00002.safetensors"
    with pytest.raises(ModelLoadError, match="expected a model directory") as error:
        open_model(str(shard))
    assert str(shard) in str(error.value)
