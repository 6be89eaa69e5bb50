"""The engine on the Triton backend, run by Triton's interpreter on the CPU: greedy outputs equal transformers'
for each family (sliding window included), and the block copies that sharing needs (copy-on-write, swapping) go
through the backend's kernels. Tiny shapes: the interpreter runs every kernel program in Python."""
from __future__ import annotations

import pytest
import torch

from engine import BeamSearchParams, SamplingParams
from engine.attention.triton_backend import TritonAttentionBackend


def token_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_on_the_triton_backend_equals_transformers(tiny_models, drive, family):
    ref = tiny_models[family]
    # 12 blocks of 4 tokens for 4 sequences growing to 11-28 tokens: some are preempted and recomputed; a
    # 6-token budget chunks the longer prompts, so the prefill kernel also reads cached prefixes.
    llm = ref.llm(num_blocks=12, block_size=4, max_model_len=48, attention_backend="triton",
                  max_num_batched_tokens=6)
    assert isinstance(llm.llm_engine.runner.backend, TritonAttentionBackend)
    prompts = token_prompts([3, 5, 9, 20], ref.config.vocab_size, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs, trace = drive(llm.llm_engine, [({"prompt_token_ids": p}, params) for p in prompts])
    assert trace.chunked_prefill
    assert [o.outputs[0].token_ids for o in outputs] == ref.greedy_reference(prompts, 8)


def test_forks_and_swaps_on_the_triton_backend_match_the_torch_backend(tiny_llama, drive):
    """Parallel samples (copy-on-write through copy_blocks) and beams swapped out and in (swap_blocks) give what
    the torch backend gives."""
    prompts = token_prompts([6, 9], tiny_llama.config.vocab_size, seed=2)
    requests = [({"prompt_token_ids": prompts[0]}, SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=8,
                                                                   ignore_eos=True)),
                ({"prompt_token_ids": prompts[1]}, BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True))]
    results = {}
    for backend in ("triton", "torch"):
        llm = tiny_llama.llm(num_blocks=14, block_size=4, max_model_len=48, attention_backend=backend,
                             preemption_mode="swap")
        outputs, trace = drive(llm.llm_engine, requests)
        assert trace.peak_blocks_shared > 0 and trace.swapped
        results[backend] = [[c.token_ids for c in o.outputs] for o in outputs]
    assert results["triton"] == results["torch"]


def test_fp8_kv_cache_needs_the_triton_backend(tiny_llama):
    with pytest.raises(ValueError, match="kv_cache_dtype fp8 needs the triton attention backend"):
        tiny_llama.llm(num_blocks=16, block_size=4, max_model_len=64, kv_cache_dtype="fp8",
                       attention_backend="torch")
