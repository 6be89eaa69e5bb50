"""Fixtures for the OpenAI protocol tests: SmolLM2's tokenizer (with its chat template) behind a 64-token model."""

from __future__ import annotations

import pytest

from app.server.protocol import ModelInfo


@pytest.fixture(scope="module")
def model(smollm2_tokenizer) -> ModelInfo:
    return ModelInfo("smol", smollm2_tokenizer, 64, len(smollm2_tokenizer), 1700000000)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer
