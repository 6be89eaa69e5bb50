"""Weights kept quantized: a GGUF file's quantization kept (resident bytes near the file's, logprobs near the
dequantized model's), --quantization int8 / int4 on a float checkpoint, and which modules stay quantized."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams, TokensPrompt
from engine.config import EngineConfig
from engine.models.layers import Linear, QuantizedEmbedding
from engine.models.llama import LlamaForCausalLM
from kernels.quant import QuantizedWeight

TEXTS = [
    "The history of computing is a long story of abstraction layered upon abstraction.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Paris is the capital of France. Berlin is the capital of",
]
# SmolLM2's Q4_1 file kept quantized against the same file dequantized, nats per prompt token: the kernels' int8
# activations (llama.cpp's arithmetic) cost this much (seen: mean 0.054, max 0.36).
SMOL_MEAN_BOUND, SMOL_MAX_BOUND = 0.1, 0.6


def prompt_logprob_diffs(a: LLM, b: LLM, texts: list[str]) -> torch.Tensor:
    tok = a.get_tokenizer()
    prompts = [TokensPrompt(prompt_token_ids=tok.encode(t)) for t in texts]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    diffs = []
    for x, y, p in zip(
        a.generate(prompts, params, use_tqdm=False), b.generate(prompts, params, use_tqdm=False), prompts
    ):
        ids = p["prompt_token_ids"]
        diffs += [abs(u[t] - v[t]) for u, v, t in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], ids[1:])]
    return torch.tensor(diffs)


@pytest.fixture(scope="module")
def smol_kept(smollm2_gguf) -> LLM:
    return LLM(str(smollm2_gguf), max_model_len=512, kv_cache_memory=0.05)


def test_a_gguf_keeps_its_quantization_in_about_the_files_bytes(smol_kept, smollm2_gguf):
    file_bytes = smollm2_gguf.stat().st_size
    engine = smol_kept.llm_engine
    assert engine.weight_bytes <= 1.3 * file_bytes
    linears = [m for m in engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and m.qweights for m in linears)
    assert isinstance(engine.runner.model.embed_tokens, QuantizedEmbedding)  # tied: it serves the logits too


def test_a_kept_quantized_weight_is_held_once(smol_kept):
    """q/k/v and gate/up arrive as shards and are stacked into one matmul each: the shards are let go once stacked,
    so each weight's bytes are resident once (the model's weight_bytes, counted from the stacked weights)."""
    engine = smol_kept.llm_engine
    storages: dict[int, int] = {}
    stacked = 0
    for m in engine.runner.model.modules():
        if isinstance(m, Linear):
            stacked += len(m.shard_sizes) > len(m.qweights)
            held = [qw for qw in m.qshards if qw is not None] + m.qweights
            for t in (t for qw in held for t in (qw.codes, qw.scales, qw.mins) if t is not None):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    model = engine.runner.model
    others = model.embed_tokens.qweight.nbytes + sum(p.nbytes for p in model.parameters())  # the norms' floats
    assert stacked == 2 * engine.model_config.num_layers  # qkv and gate_up in every layer
    assert sum(storages.values()) + others == engine.weight_bytes


def test_kept_quantization_stays_near_the_dequantized_model(smol_kept, smollm2_gguf):
    exact = LLM(str(smollm2_gguf), max_model_len=512, kv_cache_memory=0.05, quantization="none")
    assert exact.llm_engine.weight_bytes > 4 * smol_kept.llm_engine.weight_bytes  # float32 against ~5 bits
    diffs = prompt_logprob_diffs(smol_kept, exact, TEXTS)
    assert diffs.mean() < SMOL_MEAN_BOUND and diffs.max() < SMOL_MAX_BOUND
    # A question whose first token leads by about a nat: "Which city is the capital of France?" starts "The"
    # ahead of "Le" by 0.03 nats, below the kept quantization's own noise, and either may come first.
    reply = smol_kept.chat(
        [{"role": "user", "content": "Name the capital city of France."}],
        SamplingParams(temperature=0.0, max_tokens=12),
        use_tqdm=False,
    )
    assert "Paris" in reply[0].outputs[0].text


@pytest.mark.parametrize(("mode", "bits"), [("int8", 8.5), ("int4", 5.0)])
def test_quantization_at_load_of_a_float_checkpoint(tiny_llama, mode, bits):
    float_llm = tiny_llama.llm(num_blocks=64, block_size=8, max_model_len=128)
    quant_llm = tiny_llama.llm(num_blocks=64, block_size=8, max_model_len=128, quantization=mode)
    model = quant_llm.llm_engine.runner.model
    linear_params = sum(m.in_features * sum(m.shard_sizes) for m in model.modules() if isinstance(m, Linear))
    embed_params = model.arch.vocab_size * model.arch.hidden_size
    # Every linear layer and the embedding at `bits` per weight (the tiny model's dimensions are whole panels),
    # the norms in float32.
    quantized_bytes = (linear_params + embed_params) * bits / 8
    assert quant_llm.llm_engine.weight_bytes == pytest.approx(quantized_bytes, rel=0.02)
    assert float_llm.llm_engine.weight_bytes > 3 * quant_llm.llm_engine.weight_bytes
    diffs = prompt_logprob_diffs(quant_llm, float_llm, ["The quick brown fox jumps over the lazy dog."])
    # int4 rounds the weights themselves (7% of a weight's range per step), int8 100 times finer.
    assert diffs.mean() < (1.0 if mode == "int4" else 0.25)


def test_a_module_stays_float_unless_all_its_tensors_can_stay_quantized(tiny_llama):
    model = LlamaForCausalLM(tiny_llama.config, max_positions=64)
    n = model.arch.num_layers
    candidates = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(n) for p in "qko"}
    candidates |= {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    kept = model.keep_quantized(candidates)
    layer0 = model.layers[0]
    assert layer0.self_attn.qkv_proj.weight is not None  # v_proj arrives in floats: q/k/v stay float together
    assert layer0.self_attn.o_proj.weight is None and layer0.mlp.gate_up_proj.weight is None
    assert model.layers[1].mlp.gate_up_proj.weight is not None
    assert not isinstance(model.embed_tokens, QuantizedEmbedding)
    assert kept == {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(n)} | {
        f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")
    }


def test_a_quantized_tensor_for_a_float_module_is_refused_in_words(tiny_llama):
    model = LlamaForCausalLM(tiny_llama.config, max_positions=64)
    model.keep_quantized(set())
    model.materialize(torch.device("cpu"), torch.float32)
    qw = QuantizedWeight(
        "q8g32",
        (model.arch.hidden_size, model.arch.hidden_size),
        torch.zeros(model.arch.hidden_size // 8, model.arch.hidden_size // 32, 256, dtype=torch.int8),
        torch.zeros(model.arch.hidden_size // 8, model.arch.hidden_size // 32, 8, dtype=torch.float16),
    )
    with pytest.raises(ValueError, match=r"o_proj\.weight arrives quantized, but this model holds it in floats"):
        model.load_weights([("model.layers.0.self_attn.o_proj.weight", qw)])


def test_the_quantization_option_is_checked():
    with pytest.raises(ValueError, match="quantization must be one of auto, none, int8, int4; got 'fp4'"):
        EngineConfig(model="m", quantization="fp4")


def test_without_the_compiled_kernels_a_gguf_loads_in_floats(smollm2_gguf, monkeypatch, caplog):
    from kernels import quant

    monkeypatch.setattr(quant, "cpu_kernels_available", lambda: False)
    llm = LLM(str(smollm2_gguf), max_model_len=128, kv_cache_memory=0.02)
    assert not any(isinstance(m, Linear) and m.quantized for m in llm.llm_engine.runner.model.modules())
    assert "the quantized CPU kernels cannot be built here" in caplog.text
    with pytest.raises(ValueError, match="quantization int8 needs kvstudio's compiled CPU kernels"):
        LLM(str(smollm2_gguf), max_model_len=128, kv_cache_memory=0.02, quantization="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_run_under_cuda_graphs(tiny_llama, mode):
    """Every step of a quantized model, its embedding lookup included, is capturable: nothing reads back to
    the host (on the H200 a range check in the quantized embedding broke the capture)."""
    llm = LLM(str(tiny_llama.path), max_model_len=128, quantization=mode, gpu_memory_utilization=0.2)
    assert llm.llm_engine.runner.graphs is not None
    out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_the_kv_cache_is_float16_for_weights_kept_quantized_on_the_cpu(smol_kept, tiny_llama):
    def kv_dtype(llm: LLM) -> torch.dtype:
        return llm.llm_engine.runner.kv_cache.dtype

    small = {"num_blocks": 16, "block_size": 8, "max_model_len": 64}
    assert kv_dtype(smol_kept) == torch.float16  # a GGUF's quantization kept
    assert kv_dtype(tiny_llama.llm(**small)) == torch.float32  # float weights: the exact path stays exact
    assert kv_dtype(tiny_llama.llm(**small, quantization="int8")) == torch.float16
    assert kv_dtype(tiny_llama.llm(**small, quantization="int8", kv_cache_dtype="float32")) == torch.float32
