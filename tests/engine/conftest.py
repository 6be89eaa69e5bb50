"""Fixtures for the engine's end-to-end tests: tiny random models of each supported family, SmolLM2 with a
transformers twin, and a driver that steps an LLMEngine while checking the KV pool's invariants after every step.

Tiny models are saved with save_pretrained (safetensors + config + a byte-level BPE tokenizer trained here), so
the engine loads them exactly as it loads a downloaded model. Their weights are drawn with a large std and
every bias and norm weight is perturbed, so logits are far from ties and a weight loaded into the wrong place
changes the output. GGUF files are written from such models the way llama.cpp's converter writes them
(gguf_writing.write_gguf, handed to the tests as the gguf_writer fixture).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from gguf_writing import write_gguf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from engine import LLM, LLMEngine, RequestOutput, SamplingParams
from engine.sequence import SequenceStatus

# Text the tiny tokenizer learns its merges from; the tests' string prompts use the same words.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps keys and values in fixed-size blocks of the cache.",
    "Once upon a time a small model wrote one token after another.",
    "A scheduler batches requests; the block manager hands out blocks and takes them back.",
    "Hello world! Numbers: 0 1 2 3 4 5 6 7 8 9, and punctuation: ( ) [ ] { } ; : ' \" ?",
]
TINY_VOCAB = 384
BOS, EOS = "<s>", "</s>"


@dataclass
class ReferenceModel:
    """A model the engine loads from `path`, and the transformers model (float32, eval) it must agree with."""

    name: str
    path: Path
    hf: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    _greedy_cache: dict = field(default_factory=dict, repr=False)

    @property
    def config(self) -> PretrainedConfig:
        return self.hf.config

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def kv_cache_gib(self, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32) -> float:
        """The kv_cache_memory (GiB) that buys exactly num_blocks blocks: K and V, every layer and kv head."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        elem = torch.empty((), dtype=dtype).element_size()
        block_bytes = 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * head_dim * elem
        return num_blocks * block_bytes / 2**30  # exact: a power-of-two division of an integer

    def llm(self, *, num_blocks: int, block_size: int, max_model_len: int, **options) -> LLM:
        # The twin holds the checkpoint's weights in float32: so does the engine, unless a test asks otherwise.
        options.setdefault("quantization", "none")
        # auto: float32, or float16 for weights quantized on the CPU (EngineConfig.cache_dtype)
        auto = torch.float32 if options["quantization"] == "none" else torch.float16
        kv_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            options.get("kv_cache_dtype", "auto"), auto
        )
        llm = LLM(
            str(self.path),
            block_size=block_size,
            max_model_len=max_model_len,
            kv_cache_memory=self.kv_cache_gib(num_blocks, block_size, kv_dtype),
            dtype="float32",
            **options,
        )
        assert llm.llm_engine.block_manager.num_blocks == num_blocks
        return llm

    def greedy_reference(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """transformers' generate (greedy, float32, EOS disabled so every output has max_new_tokens tokens).

        Prompts are left-padded into one batch; generate derives positions from the attention mask.
        """
        key = (tuple(map(tuple, prompts)), max_new_tokens)
        if key not in self._greedy_cache:
            width = max(map(len, prompts))
            ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.inference_mode():
                out = self.hf.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            self._greedy_cache[key] = out[:, width:].tolist()
        return self._greedy_cache[key]

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """transformers' float32 logits for one sequence: [len(token_ids), vocab]."""
        with torch.inference_mode():
            return self.hf(torch.tensor([list(token_ids)])).logits[0].float()


# ---- tiny models --------------------------------------------------------------------------------------------


def _train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return _train_tokenizer()


_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)

# name -> (config, model class). Each family's distinguishing feature is switched on.
_FAMILIES: dict[str, tuple[Callable[[int], PretrainedConfig], type[PreTrainedModel]]] = {
    # plain Llama with GQA (4 query heads over 2 kv heads), separate lm_head
    "llama": (
        lambda v: LlamaConfig(
            vocab_size=v, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, **_COMMON
        ),
        LlamaForCausalLM,
    ),
    # Mistral: one kv head, and a sliding window shorter than the longer sequences
    "mistral": (
        lambda v: MistralConfig(
            vocab_size=v, num_key_value_heads=1, sliding_window=16, tie_word_embeddings=False, head_dim=16, **_COMMON
        ),
        MistralForCausalLM,
    ),
    # Qwen2: q/k/v biases, tied embeddings
    "qwen2": (
        lambda v: Qwen2Config(
            vocab_size=v, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False, **_COMMON
        ),
        Qwen2ForCausalLM,
    ),
    # Qwen3: q/k RMSNorm and an explicit head_dim (32) that is not hidden / heads (16)
    "qwen3": (
        lambda v: Qwen3Config(
            vocab_size=v,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=False,
            use_sliding_window=False,
            **_COMMON,
        ),
        Qwen3ForCausalLM,
    ),
}
TINY_FAMILIES = tuple(_FAMILIES)


def _perturb(model: PreTrainedModel, std: float) -> None:
    """Make every bias and norm weight non-trivial (HF initialises them to 0 and 1)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif "norm" in name:
                param.copy_(1.0 + std * torch.randn_like(param))


def build_tiny(
    name: str,
    directory: Path,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    edit: Callable[[PreTrainedModel], None] | None = None,
    **overrides,
) -> ReferenceModel:
    """Save a random tiny model of family `name` (plus the tokenizer) to directory and return its reference."""
    make_config, cls = _FAMILIES[name]
    config = make_config(len(tokenizer))
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = cls(config).eval()
    _perturb(model, 0.2)
    if edit is not None:
        edit(model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return ReferenceModel(name, directory, model, tokenizer)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer) -> dict[str, ReferenceModel]:
    return {
        name: build_tiny(name, tmp_path_factory.mktemp(f"tiny-{name}"), tiny_tokenizer, seed=i)
        for i, name in enumerate(TINY_FAMILIES)
    }


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory, tiny_tokenizer) -> Callable[..., ReferenceModel]:
    """make_tiny(name, seed, edit=None, **config_overrides): build_tiny into a fresh directory."""

    def make(
        name: str, seed: int, edit: Callable[[PreTrainedModel], None] | None = None, **overrides
    ) -> ReferenceModel:
        return build_tiny(name, tmp_path_factory.mktemp(f"tiny-{name}"), tiny_tokenizer, seed, edit, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> ReferenceModel:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def eager_eos_model(tmp_path_factory, tiny_tokenizer) -> ReferenceModel:
    """A tiny Llama that puts almost all probability on EOS at every step.

    The last MLP's down_proj bias pushes one hidden feature far up, so after the final RMSNorm that feature is
    close to sqrt(hidden) for every token; EOS's lm_head row reads it with a large weight.
    """

    def favour_eos(model: PreTrainedModel) -> None:
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.bias[0] = 200.0
            model.lm_head.weight[tiny_tokenizer.eos_token_id, 0] = 4.0

    return build_tiny(
        "llama", tmp_path_factory.mktemp("tiny-eager-eos"), tiny_tokenizer, seed=11, edit=favour_eos, mlp_bias=True
    )


# ---- SmolLM2 ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path) -> ReferenceModel:
    """transformers' LlamaForCausalLM holding the GGUF's weights as the engine's loader dequantizes them."""
    from engine.models.loader import open_model

    source = open_model(str(smollm2_gguf))
    config = source.checkpoint.transformers_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    # to_empty leaves non-persistent buffers (the rotary inv_freq) uninitialised: rebuild them.
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    missing, unexpected = model.load_state_dict(dict(source.weights(torch.float32)), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return ReferenceModel("smollm2", smollm2_gguf, model.eval(), source.tokenizer)


SMOL_BLOCK_SIZE = 8
SMOL_MAX_MODEL_LEN = 256
SMOL_NUM_BLOCKS = 40  # 320 tokens: 8 prompts of 7-64 tokens + 32 new each need ~520, so some are preempted


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_reference) -> LLM:
    """The one SmolLM2 engine of the suite: a block pool small enough for 8 concurrent requests to preempt."""
    return smollm2_reference.llm(
        num_blocks=SMOL_NUM_BLOCKS, block_size=SMOL_BLOCK_SIZE, max_model_len=SMOL_MAX_MODEL_LEN
    )


# ---- driving the engine -------------------------------------------------------------------------------------


@dataclass
class DriveTrace:
    """What drive() saw across the steps."""

    steps: int = 0
    peak_blocks_used: int = 0
    max_table_blocks: int = 0  # longest block table of any running sequence
    chunked_prefill: bool = False  # a prompt was part-way through its prefill after some step
    joined_mid_decode: int = 0  # requests added while another request had output tokens and was running
    swapped: bool = False  # some group was swapped out after some step
    peak_blocks_shared: int = 0  # most blocks held by several tables at once


def check_kv_invariants(engine: LLMEngine, trace: DriveTrace) -> None:
    """After a step: tables hold exactly the blocks their computed tokens need (at most one partly filled block
    of slack), waiting sequences hold none, every block's ref count equals the number of tables holding it, and
    the blocks the pool counts as used (and the swap space as used) are those the tables hold."""
    bm, sched = engine.block_manager, engine.scheduler
    bs = bm.block_size
    holders: Counter[int] = Counter()
    for group in sched.running:
        for seq in group.seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            table = seq.block_table
            need = math.ceil(seq.num_computed_tokens / bs)
            assert need <= len(table) <= need + 1, (
                f"seq {seq.seq_id}: {len(table)} blocks for {seq.num_computed_tokens} computed tokens (block {bs})"
            )
            assert len(set(table)) == len(table), f"seq {seq.seq_id} holds a block twice: {table}"
            holders.update(table)
            trace.max_table_blocks = max(trace.max_table_blocks, len(table))
            if 0 < seq.num_computed_tokens < seq.num_prompt_tokens:
                trace.chunked_prefill = True
    for block_id, n in holders.items():
        assert bm.blocks[block_id].ref_count == n, (
            f"block {block_id}: ref count {bm.blocks[block_id].ref_count}, held by {n} tables"
        )
    for group in sched.waiting:
        for seq in group.seqs:
            assert not seq.block_table, f"waiting seq {seq.seq_id} still holds blocks {seq.block_table}"
    swap_held = {b for g in sched.swapped for s in g.seqs if s.status is SequenceStatus.SWAPPED for b in s.block_table}
    assert bm.num_swap_blocks - bm.num_free_swap_blocks == len(swap_held)
    trace.swapped = trace.swapped or bool(sched.swapped)
    used = bm.num_blocks - bm.num_free_blocks
    assert used == len(holders), f"the pool counts {used} blocks used, the running tables hold {len(holders)}"
    trace.peak_blocks_used = max(trace.peak_blocks_used, used)
    trace.peak_blocks_shared = max(trace.peak_blocks_shared, sum(1 for n in holders.values() if n > 1))


def assert_all_blocks_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_free_swap_blocks == bm.num_swap_blocks


Request = tuple[str | dict, SamplingParams]


def drive_engine(
    engine: LLMEngine, requests: Sequence[Request], add_at: Sequence[int] | None = None, max_steps: int = 10_000
) -> tuple[list[RequestOutput], DriveTrace]:
    """Run requests through add_request/step by hand, request i joining before step add_at[i] (default 0).

    Checks the KV invariants after every step and that every block is free at the end. Returns the final
    outputs in request order and a trace of what the steps did.
    """
    add_at = list(add_at) if add_at is not None else [0] * len(requests)
    ids = [f"drive-{i}" for i in range(len(requests))]
    finished: dict[str, RequestOutput] = {}
    trace = DriveTrace()
    while len(finished) < len(requests):
        assert trace.steps < max_steps, "the engine stopped making progress"
        for rid, (prompt, params), step in zip(ids, requests, add_at):
            if step == trace.steps:
                if any(s.num_output_tokens > 0 for g in engine.scheduler.running for s in g.seqs):
                    trace.joined_mid_decode += 1
                engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = out
        trace.steps += 1
        check_kv_invariants(engine, trace)
    assert_all_blocks_free(engine)
    return [finished[rid] for rid in ids], trace


@pytest.fixture(scope="session")
def drive() -> Callable[..., tuple[list[RequestOutput], DriveTrace]]:
    """drive(engine, [(prompt, params), ...], add_at=None) -> (outputs in order, DriveTrace); see drive_engine."""
    return drive_engine


@pytest.fixture(scope="session")
def all_blocks_free() -> Callable[[LLMEngine], None]:
    """all_blocks_free(engine) asserts nothing is left running and every KV block is back in the pool."""
    return assert_all_blocks_free


# ---- GGUF files ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gguf_writer() -> Callable[..., PreTrainedModel]:
    """write_gguf(path, model, tokenizer_dir, *, name, pre, types, ...) -> the file's dequantized twin model."""
    return write_gguf
