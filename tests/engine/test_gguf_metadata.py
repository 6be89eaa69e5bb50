"""GGUF metadata the loader reads without the families' files: tokenizer variants (SentencePiece without a space
prefix, GPT-2's and Tekken's byte-level pre-tokenizers), rope scaling (llama3 recovered from rope_freqs, linear and
yarn keys), and the files it refuses (unknown pre-tokenizers and architectures, metadata contradicting the tensors)."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_tokenizers import (
    TEKKEN_SPLIT,
    TEXTS,
    byte_level_bpe,
    llama3_tokenizer,
    sentencepiece_tokenizer,
    split,
    tiny_file,
)
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from engine.models.loader import ModelLoadError, open_model
from engine.models.rope import llama3_from_freq_factors

# ---- tokenizer variants --------------------------------------------------------------------------------------


def test_sentencepiece_without_space_prefix(tmp_path: Path, gguf_writer) -> None:
    """tokenizer.ggml.add_space_prefix false: no "▁" before the text (transformers' GGUF tokenizer adds one)."""
    path, source = tiny_file(tmp_path, gguf_writer, lambda: sentencepiece_tokenizer(add_prefix_space=False))
    ours = open_model(str(path)).tokenizer
    for text in TEXTS:
        assert ours.encode(text) == source.encode(text), text
        assert ours.decode(source.encode(text), skip_special_tokens=True) == text
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert theirs.encode("Hello") == source.encode(" Hello") != source.encode("Hello")


def _gpt2_tokenizer() -> PreTrainedTokenizerFast:
    tok = byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _tekken_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral Nemo's: the Tekken split, whole-word vocabulary hits, BOS."""
    tok = byte_level_bpe(split(TEKKEN_SPLIT), ["<unk>", "<s>", "</s>"], ignore_merges=True, bos="<s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize(("pre", "make_tokenizer"), [("gpt-2", _gpt2_tokenizer), ("tekken", _tekken_tokenizer)])
def test_other_byte_level_pre_tokenizers(tmp_path: Path, gguf_writer, pre: str, make_tokenizer) -> None:
    path, source = tiny_file(tmp_path, gguf_writer, make_tokenizer, pre=pre)
    ours = open_model(str(path)).tokenizer
    for text in TEXTS:
        assert ours.encode(text) == source.encode(text), text
        assert ours.decode(source.encode(text)) == source.decode(source.encode(text))


# ---- config: rope scaling and refusals ----------------------------------------------------------------------


def _llama_cpp_freq_factors(base: float, dim: int, factor: float, low: float, high: float, context: int):
    """convert_hf_to_gguf's rope_freqs for HF's llama3 parameters."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            factors.append(1)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0], ids=["llama-3.1", "llama-3.2"])
def test_llama3_parameters_come_back_from_rope_freqs(factor: float) -> None:
    factors = _llama_cpp_freq_factors(500000.0, 128, factor, 1.0, 4.0, 8192)
    assert llama3_from_freq_factors(factors, 500000.0, 128) == dict(
        rope_type="llama3",
        factor=factor,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    assert llama3_from_freq_factors(torch.ones(64), 500000.0, 128) is None


def test_rope_freqs_of_another_curve_are_refused() -> None:
    factors = torch.linspace(1.0, 8.0, 64) ** 0.5  # smooth, but not llama3's curve
    with pytest.raises(ValueError, match="Llama 3's scaling curve"):
        llama3_from_freq_factors(factors, 500000.0, 128)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=16.0),
    ],
    ids=["linear", "yarn"],
)
def test_rope_scaling_keys_map_to_hf(tmp_path: Path, gguf_writer, rope: dict) -> None:
    path, _ = tiny_file(tmp_path, gguf_writer, llama3_tokenizer, dict(rope_parameters=rope))
    assert open_model(str(path)).hf_config.rope_parameters == rope


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path, gguf_writer) -> None:
    path, _ = tiny_file(tmp_path, gguf_writer, llama3_tokenizer, pre="chatglm-bpe")
    with pytest.raises(ModelLoadError, match=r"pre-tokenizer 'chatglm-bpe' is not supported \(supported: .*llama-bpe"):
        open_model(str(path))


def test_metadata_that_contradicts_the_tensors_is_refused(tmp_path: Path, gguf_writer) -> None:
    def four_kv_heads(model: PreTrainedModel) -> None:  # in the metadata; the k/v tensors hold 2
        model.config.num_key_value_heads = 4

    path, _ = tiny_file(tmp_path, gguf_writer, llama3_tokenizer, dict(num_key_value_heads=2), edit=four_kv_heads)
    with pytest.raises(ModelLoadError, match=r"blk.0.attn_k.weight is \[32, 64\], expected \[64, 64\]"):
        open_model(str(path))


@pytest.mark.parametrize("architecture", ["phi3", "gemma2", "mamba"])
def test_unsupported_architectures_are_refused_by_name(tmp_path: Path, architecture: str) -> None:
    path = tmp_path / f"{architecture}.gguf"
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=f"'{architecture}' is not supported") as error:
        open_model(str(path))
    assert "llama, qwen2, qwen3" in str(error.value)
    assert str(path) in str(error.value)
