"""Fixtures shared by the whole suite: the default model, its tokenizer, and the environment the suite runs in."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Idle OpenMP threads sleep instead of spinning: a test that shares the cores with anything else (another
# process, a Qt thread) would otherwise crawl. Set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 - importing torch runs no @triton.jit

# Triton kernels run on its interpreter when there is no GPU (on one, the GPU-marked tests run them compiled);
# this must be set before any @triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Both cores for each test's matmuls; the suite runs tests one at a time.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from app.model_store import default_model_path

    path = default_model_path()
    if not path.is_file():
        pytest.fail(f"the default model is missing at {path}: run `make setup` (it fetches it)")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from engine.models.loader import open_model

    return open_model(str(smollm2_gguf)).tokenizer


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer and chat template, saved like a
    downloaded model: fast enough for tests that need a real engine behind an API, not exact outputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-chat")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
