"""The benchmark's synthetic GGUF: a loadable model of the asked shape and type, with the default tokenizer."""

from __future__ import annotations

import pytest

from app.bench import synthetic_gguf
from engine import LLM, SamplingParams
from engine.models.gguf import GGUFCheckpoint


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q4_0"])
def test_a_small_synthetic_model_loads_and_generates(tmp_path, smollm2_gguf, kind):
    path = tmp_path / f"synth-{kind}.gguf"
    shape = synthetic_gguf.Shape(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=50_000)
    synthetic_gguf.write(path, synthetic_gguf.T[kind], shape, smollm2_gguf)
    checkpoint = GGUFCheckpoint(path)
    types = checkpoint.tensor_types()
    assert types["model.layers.1.mlp.down_proj.weight"] == kind and types["model.norm.weight"] == "F32"
    llm = LLM(str(path), max_model_len=128, kv_cache_memory=0.01)
    assert llm.llm_engine.model_config.vocab_size == 50_000
    # the default model's tokenizer and template, padded with reserved tokens
    assert llm.get_tokenizer().convert_ids_to_tokens(49_999) == "<|reserved_special_token_847|>"
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
