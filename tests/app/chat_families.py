"""Model families for the tool-call and reasoning tests: Qwen3's published chat template, tokenizers with a
family's tokens added, and a tiny random model that has Qwen3's tokens and template (imported by the tests that
use them: `from chat_families import ...`)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

QWEN3_TEMPLATE = (Path(__file__).parent / "templates" / "qwen3.jinja").read_text()
# Qwen3's own tokens (added, not special: they stay in the decoded text).
QWEN3_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]


def variant(tokenizer, tokens=(), special=(), chat_template: str | None = None):
    """A copy of the tokenizer with tokens (decoded as text) and special tokens added, and another template."""
    tok = copy.deepcopy(tokenizer)
    if tokens:
        tok.add_tokens(list(tokens))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def qwen3_template() -> str:
    return QWEN3_TEMPLATE


@pytest.fixture(scope="session")
def tiny_qwen3_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    """tests/conftest.py's tiny random Llama, with SmolLM2's tokenizer given Qwen3's tool-call and think tokens
    and Qwen3's chat template: what the server sees of a Qwen3 model, small enough for a test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = variant(smollm2_tokenizer, QWEN3_TOKENS, chat_template=QWEN3_TEMPLATE)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-qwen3")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
