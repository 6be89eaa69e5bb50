"""The engine on the Triton backend, run by Triton's interpreter on the CPU: greedy outputs equal transformers'
for each family (sliding window included), and the block copies that sharing needs (copy-on-write, swapping) go
through the backend's kernels. Tiny shapes: the interpreter runs every kernel program in Python."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, BeamSearchParams, SamplingParams
from engine.attention.triton_backend import TritonAttentionBackend
from engine.cuda_graphs import graph_batch_sizes


def token_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_on_the_triton_backend_equals_transformers(tiny_models, drive, family):
    ref = tiny_models[family]
    # 12 blocks of 4 tokens for 4 sequences growing to 11-28 tokens: some are preempted and recomputed; a
    # 6-token budget chunks the longer prompts, so the prefill kernel also reads cached prefixes.
    llm = ref.llm(num_blocks=12, block_size=4, max_model_len=48, attention_backend="triton", max_num_batched_tokens=6)
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
    requests = [
        ({"prompt_token_ids": prompts[0]}, SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=8, ignore_eos=True)),
        ({"prompt_token_ids": prompts[1]}, BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)),
    ]
    results = {}
    for backend in ("triton", "torch"):
        llm = tiny_llama.llm(
            num_blocks=14, block_size=4, max_model_len=48, attention_backend=backend, preemption_mode="swap"
        )
        outputs, trace = drive(llm.llm_engine, requests)
        assert trace.peak_blocks_shared > 0 and trace.swapped
        results[backend] = [[c.token_ids for c in o.outputs] for o in outputs]
    assert results["triton"] == results["torch"]


def test_fp8_kv_cache_needs_the_triton_backend(tiny_llama):
    with pytest.raises(ValueError, match="kv_cache_dtype fp8 needs the triton attention backend"):
        tiny_llama.llm(num_blocks=16, block_size=4, max_model_len=64, kv_cache_dtype="fp8", attention_backend="torch")


def test_an_fp8_kv_cache_stays_within_e4m3_precision_of_float32(tiny_llama):
    """Prompt logprobs with the KV cache in fp8 e4m3 (3 mantissa bits) against float32: off by what e4m3's
    rounding explains, about 16 times a bfloat16 cache's error (7 mantissa bits), and no more."""
    prompts = token_prompts([5, 9, 14, 20], tiny_llama.config.vocab_size, seed=2)
    logprobs = {}
    for kv, backend, dtype in (
        ("auto", "triton", torch.float32),
        ("fp8", "triton", torch.float8_e4m3fn),
        ("bfloat16", "torch", torch.bfloat16),
    ):
        llm = LLM(
            str(tiny_llama.path),
            block_size=4,
            max_model_len=48,
            dtype="float32",
            kv_cache_dtype=kv,
            kv_cache_memory=tiny_llama.kv_cache_gib(24, 4, dtype),
            attention_backend=backend,
        )
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
        )
        logprobs[kv] = torch.tensor([v for o in outs for entry in o.prompt_logprobs[1:] for v in entry.values()])
    fp8_err = (logprobs["fp8"] - logprobs["auto"]).abs()
    bf16_err = (logprobs["bfloat16"] - logprobs["auto"]).abs()
    assert fp8_err.mean() < 0.25 and fp8_err.max() < 1.5
    assert 4 * bf16_err.mean() < fp8_err.mean() < 64 * bf16_err.mean()


@pytest.mark.parametrize(
    "max_batch, sizes",
    [
        (256, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256]),
        (100, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]),
        (5, [1, 2, 4, 5]),
        (1, [1]),
    ],
)
def test_decode_graphs_cover_every_batch_size_up_to_the_largest(max_batch, sizes):
    assert graph_batch_sizes(max_batch) == sizes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_equal_eager_decoding(tiny_llama):
    prompts = token_prompts([3, 7, 12, 30, 41], tiny_llama.config.vocab_size, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for graphs in (True, False):
        llm = LLM(
            str(tiny_llama.path), dtype="float32", max_model_len=128, cuda_graphs=graphs, gpu_memory_utilization=0.3
        )
        assert (llm.llm_engine.runner.graphs is not None) == graphs
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens[graphs] = [o.outputs[0].token_ids for o in outs]
    assert tokens[True] == tokens[False] == tiny_llama.greedy_reference(prompts, 24)


def test_auto_on_cuda_takes_triton_where_it_is_installed_and_torch_ops_where_not(monkeypatch, caplog):
    import importlib.util

    from engine.attention import TorchAttentionBackend, select_backend

    cuda = torch.device("cuda")
    picked = select_backend("auto", cuda, 16, 64, None, torch.float16)
    assert isinstance(picked, TritonAttentionBackend)
    assert isinstance(select_backend("auto", cuda, 16, 80, None, torch.float16), TorchAttentionBackend)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    with caplog.at_level("WARNING"):
        assert isinstance(select_backend("auto", cuda, 16, 64, None, torch.float16), TorchAttentionBackend)
    assert "triton is not installed" in caplog.text
