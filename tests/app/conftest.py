"""Fixtures for the OpenAI protocol tests: SmolLM2's tokenizer (with its chat template) behind a 64-token model."""

from __future__ import annotations

import pytest
from server_harness import MAX_LEN, run_server

from app.server.app import ServerConfig
from app.server.protocol import ModelInfo
from engine import LLM, LLMEngine


@pytest.fixture(scope="module")
def model(smollm2_tokenizer) -> ModelInfo:
    return ModelInfo("smol", smollm2_tokenizer, 64, len(smollm2_tokenizer), 1700000000)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


# The endpoint in-process (test_server*.py): one tiny engine and server per module.
@pytest.fixture(scope="module")
def engine(tiny_chat_model) -> LLMEngine:
    return LLM(str(tiny_chat_model), max_model_len=MAX_LEN, kv_cache_memory=0.02).llm_engine


@pytest.fixture(scope="module")
def server(engine):
    srv, stop = run_server(engine, ServerConfig(port=0), max_queue=64)
    yield srv
    stop()
