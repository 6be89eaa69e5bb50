"""GGUF files of every supported family, written from tiny seeded transformers models the way llama.cpp's
converter writes them (gguf_writing.write_gguf), with tokenizers trained here in each family's style.

Each family has a float file (F32 or F16) and a quantized one whose types cover F32 ... Q6_K between them. A
file's reference is its dequantized twin: the source model holding exactly the weights the file stores. kvstudio
must agree with the twin and with transformers' own GGUF loader: greedy token-identical on float files, prompt
logprobs within LOGPROB_BOUND on quantized ones (the engine dequantizes to float32, so the bound is float32
noise). The tokenizer built from the metadata must encode and decode like the source tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_tokenizers import (
    SIZES,
    TEXTS,
    llama3_tokenizer,
    qwen2_tokenizer,
    save_source,
    sentencepiece_tokenizer,
    smollm_tokenizer,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
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
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from engine import LLM, SamplingParams, TokensPrompt
from engine.models.gguf import GGUFCheckpoint
from engine.models.llama import LlamaArch
from engine.models.loader import open_model
from engine.models.rope import rope_parameters

# kept quantized vs dequantized, nats per prompt token; tiny random models have large weights and logits, which
# magnify the int8 activations' rounding (seen: mean 0.04-0.13, max 0.13-0.73; SmolLM2 is tested in test_quantized.py)
KEPT_MEAN_BOUND, KEPT_MAX_BOUND = 0.25, 1.5
LOGPROB_BOUND = 1e-4  # |kvstudio - twin| per prompt token, nats (seen: under 5e-6)
NEW_TOKENS = 16
PROMPTS = ["The quick brown fox", "Once upon a time a small model wrote", "Hello world! Numbers: 12 345, and"]

# ---- families ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    config: Callable[[int], PretrainedConfig]
    model_class: type[PreTrainedModel]
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    pre: str  # tokenizer.ggml.pre
    float_type: T
    quant_types: dict[str, T]  # GGUF base name -> type; other matrices get default_quant
    default_quant: T
    file_type: gguf.LlamaFileType
    sliding_window: int | None = None


FAMILIES = {
    # Llama 3.x: llama3 rope scaling (only the rope_freqs tensor in the file), GQA, K-quants as in Q4_K_M
    "llama3": Family(
        lambda vocab: LlamaConfig(
            vocab_size=vocab,
            hidden_size=256,
            intermediate_size=512,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            tie_word_embeddings=False,
            **SIZES,
        ),
        LlamaForCausalLM,
        llama3_tokenizer,
        pre="llama-bpe",
        float_type=T.F32,
        quant_types={"token_embd": T.Q6_K, "output": T.Q6_K, "attn_v": T.Q6_K, "ffn_down": T.Q6_K, "ffn_up": T.Q5_K},
        default_quant=T.Q4_K,
        file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M,
    ),
    # Mistral: written as llama, a SentencePiece vocabulary, one kv head, a sliding window shorter than the
    # longer sequences, and an explicit head_dim
    "mistral": Family(
        lambda vocab: MistralConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=16,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **SIZES,
        ),
        MistralForCausalLM,
        sentencepiece_tokenizer,
        pre="default",
        float_type=T.F16,
        quant_types={"attn_q": T.Q4_0, "attn_k": T.Q4_0},
        default_quant=T.Q8_0,
        file_type=gguf.LlamaFileType.MOSTLY_Q8_0,
        sliding_window=16,
    ),
    # Qwen2: q/k/v biases, tied embeddings
    "qwen2": Family(
        lambda vocab: Qwen2Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **SIZES,
        ),
        Qwen2ForCausalLM,
        qwen2_tokenizer,
        pre="qwen2",
        float_type=T.F32,
        quant_types={"token_embd": T.BF16, "ffn_down": T.Q5_0},
        default_quant=T.Q4_1,
        file_type=gguf.LlamaFileType.MOSTLY_Q4_1,
    ),
    # Qwen3: q/k RMSNorm and a head_dim (32) that is not hidden / heads (16)
    "qwen3": Family(
        lambda vocab: Qwen3Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **SIZES,
        ),
        Qwen3ForCausalLM,
        smollm_tokenizer,
        pre="smollm",
        float_type=T.F16,
        quant_types={"output": T.BF16},
        default_quant=T.Q5_1,
        file_type=gguf.LlamaFileType.MOSTLY_Q5_1,
    ),
}
FAMILY_NAMES = tuple(FAMILIES)


@dataclass
class Built:
    family: Family
    source: PreTrainedModel  # the model the files were written from
    tokenizer: PreTrainedTokenizerFast  # the source tokenizer, as saved
    float_path: Path
    float_twin: PreTrainedModel
    quant_path: Path
    quant_twin: PreTrainedModel
    _llms: dict = field(default_factory=dict, repr=False)

    def llm(self, which: str) -> LLM:
        """kvstudio, once per module, on: "float", the float file; "quant", the quantized file dequantized to
        float32 (quantization none: the file's exact weights); "kept", the quantized file kept quantized."""
        if which not in self._llms:
            path = self.float_path if which == "float" else self.quant_path
            self._llms[which] = LLM(
                str(path),
                dtype="float32",
                attention_backend="torch",
                max_model_len=128,
                kv_cache_memory=0.01,
                quantization="auto" if which == "kept" else "none",
            )
        return self._llms[which]


def _perturb_norms(model: PreTrainedModel) -> None:
    """Non-trivial norm weights and biases (HF initialises them to 1 and 0)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))


@pytest.fixture(scope="module")
def built(tmp_path_factory, gguf_writer) -> dict[str, Built]:
    out = {}
    for seed, (name, family) in enumerate(FAMILIES.items()):
        # the GGUF files in a folder of their own, as downloaded: nothing there for a loader to fall back on
        source_dir, gguf_dir = tmp_path_factory.mktemp(f"{name}-source"), tmp_path_factory.mktemp(f"{name}-gguf")
        tokenizer = save_source(family.tokenizer(), source_dir)
        torch.manual_seed(seed)
        source = family.model_class(family.config(len(tokenizer))).eval()
        _perturb_norms(source)
        source.config.architectures = [family.model_class.__name__]
        source.config.bos_token_id, source.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        source.config.save_pretrained(source_dir)  # SpecialVocab reads config.json too, as the converter does
        write = dict(name=f"{name} tiny", pre=family.pre, sliding_window=family.sliding_window, seed=seed)
        float_path, quant_path = gguf_dir / f"{name}-float.gguf", gguf_dir / f"{name}-quant.gguf"
        float_file_type = gguf.LlamaFileType.ALL_F32 if family.float_type == T.F32 else gguf.LlamaFileType.MOSTLY_F16
        float_twin = gguf_writer(
            float_path, source, source_dir, default_type=family.float_type, file_type=float_file_type, **write
        )
        quant_twin = gguf_writer(
            quant_path,
            source,
            source_dir,
            types=family.quant_types,
            default_type=family.default_quant,
            file_type=family.file_type,
            **write,
        )
        out[name] = Built(family, source, tokenizer, float_path, float_twin, quant_path, quant_twin)
    return out


def _transformers_gguf_model(path: Path, config: PretrainedConfig) -> PreTrainedModel:
    """transformers' own GGUF reader (load_gguf_checkpoint: gguf's reader and dequantization, its q/k
    un-permutation) into the family's model. Its from_pretrained(gguf_file=...) would need accelerate, and its
    GGUF config reader ignores llama3 rope scaling, the sliding window and qwen3's key_length: so the source config.
    """
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # it reads a Mistral file as what the file says, llama (whose names Mistral's model shares)
    if config.model_type == "mistral":
        names = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"}))
    else:
        names = model
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=names)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def _greedy(model: PreTrainedModel, prompts: list[list[int]]) -> list[list[int]]:
    outputs = []
    with torch.inference_mode():
        for ids in prompts:  # one at a time, all unmasked: no padding to get right
            tokens = torch.tensor([ids])
            out = model.generate(
                tokens,
                attention_mask=torch.ones_like(tokens),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=None,
            )
            outputs.append(out[0, len(ids) :].tolist())
    assert all(len(output) == NEW_TOKENS for output in outputs)
    return outputs


# ---- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_config_is_the_source_models(built, name: str) -> None:
    b = built[name]
    for path in (b.float_path, b.quant_path):
        config = open_model(str(path)).hf_config
        assert config.architectures == b.source.config.architectures
        # everything the model class and the rotary table read
        assert LlamaArch.from_hf(config) == LlamaArch.from_hf(b.source.config)
        assert rope_parameters(config) == rope_parameters(b.source.config)
        assert config.max_position_embeddings == b.source.config.max_position_embeddings
    if name == "llama3":  # recovered from rope_freqs alone
        assert open_model(str(b.float_path)).hf_config.rope_parameters == b.source.config.rope_parameters


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_float_file_greedy_matches_the_source_and_transformers(built, name: str) -> None:
    b = built[name]
    llm = b.llm("float")
    prompts = [llm.get_tokenizer().encode(text) for text in PROMPTS]
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )
    ours = [out.outputs[0].token_ids for out in outputs]
    assert ours == _greedy(b.float_twin, prompts)
    assert ours == _greedy(_transformers_gguf_model(b.float_path, b.source.config), prompts)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_quantized_file_logprobs_match_its_dequantized_twin(built, name: str) -> None:
    b = built[name]
    llm = b.llm("quant")
    prompts = [llm.get_tokenizer().encode(text) for text in PROMPTS]
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    hf_gguf = _transformers_gguf_model(b.quant_path, b.source.config)
    for ids, out in zip(prompts, outputs):
        ours = torch.tensor([entry[token] for entry, token in zip(out.prompt_logprobs[1:], ids[1:])])
        for reference in (b.quant_twin, hf_gguf):
            with torch.inference_mode():
                logprobs = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            expected = logprobs[torch.arange(len(ids) - 1), ids[1:]]
            assert (ours - expected).abs().max() < LOGPROB_BOUND


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_kept_quantized_weights_stay_near_the_dequantized_model(built, name: str) -> None:
    """The file's quantized matrices kept quantized (int8 activations per 32 in the kernels) against the same
    file dequantized to float32: prompt logprobs within KEPT_MEAN_BOUND on average, KEPT_MAX_BOUND at worst."""
    b = built[name]
    kept, exact = b.llm("kept"), b.llm("quant")
    assert kept.llm_engine.weight_bytes < exact.llm_engine.weight_bytes
    prompts = [TokensPrompt(prompt_token_ids=kept.get_tokenizer().encode(text)) for text in PROMPTS]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    diffs = []
    for a, e, p in zip(
        kept.generate(prompts, params, use_tqdm=False), exact.generate(prompts, params, use_tqdm=False), prompts
    ):
        ids = p["prompt_token_ids"]
        diffs += [abs(x[t] - y[t]) for x, y, t in zip(a.prompt_logprobs[1:], e.prompt_logprobs[1:], ids[1:])]
    diffs = torch.tensor(diffs)
    assert diffs.mean() < KEPT_MEAN_BOUND and diffs.max() < KEPT_MAX_BOUND


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_raw_tensors_are_the_stored_blocks_in_hf_order(built, name: str) -> None:
    b = built[name]
    checkpoint = GGUFCheckpoint(b.quant_path)
    twin = b.quant_twin.state_dict()
    stored = {tensor.name: tensor for tensor in gguf.GGUFReader(b.quant_path).tensors}
    assert sorted(checkpoint.tensor_types().values()) == sorted(
        tensor.tensor_type.name for name, tensor in stored.items() if name != "rope_freqs.weight"
    )
    assert checkpoint.file_type == b.family.file_type.name.removeprefix("MOSTLY_")
    dequantized = dict(checkpoint.weights(torch.float32))
    seen = set()
    for hf_name, raw in checkpoint.raw_tensors():
        seen.add(hf_name)
        assert raw.shape == tuple(twin[hf_name].shape)
        assert raw.data.dtype == np.uint8 and not raw.data.flags.writeable
        block_size, type_size = gguf.GGML_QUANT_SIZES[raw.ggml_type]
        assert raw.data.shape == (*raw.shape[:-1], raw.shape[-1] // block_size * type_size)
        assert torch.equal(raw.dequantize(), twin[hf_name]), hf_name  # un-permuted rows, right name, right type
        assert torch.equal(dequantized[hf_name], twin[hf_name])
    assert seen == set(twin) - ({"lm_head.weight"} if b.source.config.tie_word_embeddings else set())
    # views of the file's memory map, no copies: two passes share memory (llama's q/k rows are reordered copies)
    permuted = ("q_proj.weight", "k_proj.weight") if b.source.config.model_type in ("llama", "mistral") else ()
    for (hf_name, first), (_, second) in zip(checkpoint.raw_tensors(), checkpoint.raw_tensors()):
        assert np.shares_memory(first.data, second.data) != hf_name.endswith(permuted), hf_name
    up = next(raw for n, raw in checkpoint.raw_tensors() if n == "model.layers.1.mlp.up_proj.weight")
    assert bytes(up.data) == bytes(stored["blk.1.ffn_up.weight"].data)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tokenizer_matches_the_source_and_transformers(built, name: str) -> None:
    b = built[name]
    ours = open_model(str(b.float_path)).tokenizer
    theirs = AutoTokenizer.from_pretrained(b.float_path.parent, gguf_file=b.float_path.name)
    specials = " ".join(b.tokenizer.get_added_vocab())  # the special tokens, and Qwen3's <think> </think>
    for text in [*TEXTS, specials, f"{specials} between {specials}"]:
        ids = b.tokenizer.encode(text)
        assert ours.encode(text) == ids, text
        assert theirs.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == b.tokenizer.decode(ids, skip_special_tokens=skip)
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        b.tokenizer.bos_token,
        b.tokenizer.eos_token,
        b.tokenizer.unk_token,
        b.tokenizer.pad_token,
    )
    assert ours.chat_template == b.tokenizer.chat_template


def test_tokenizer_keeps_qwen2s_nfc_normalizer(built) -> None:
    """transformers' GGUF tokenizer drops Qwen2's NFC step: a decomposed é tokenizes as two code points there."""
    b = built["qwen2"]
    ours = open_model(str(b.float_path)).tokenizer
    decomposed = "cafe\u0301"
    assert ours.encode(decomposed) == b.tokenizer.encode(decomposed) == b.tokenizer.encode("café")
    theirs = AutoTokenizer.from_pretrained(b.float_path.parent, gguf_file=b.float_path.name)
    assert theirs.encode(decomposed) != b.tokenizer.encode(decomposed)


def test_tokenizer_splits_digits_first_for_smollm(built) -> None:
    """transformers' GGUF tokenizer leaves `smollm` on GPT-2's regex, which keeps a space before a number with it;
    SmolLM's tokenizer (and llama.cpp) split the digits off first, so two spaces are one token."""
    b = built["qwen3"]
    ours = open_model(str(b.float_path)).tokenizer
    theirs = AutoTokenizer.from_pretrained(b.float_path.parent, gguf_file=b.float_path.name)
    text = "  12  34\n56"
    assert ours.encode(text) == b.tokenizer.encode(text)
    assert theirs.encode(text) != b.tokenizer.encode(text)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_chat_template_is_carried_through(built, name: str) -> None:
    b = built[name]
    messages = [{"role": "user", "content": "Hello world!"}]
    (out,) = b.llm("quant").chat(messages, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    text = b.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == text
    assert out.prompt_token_ids == b.tokenizer.encode(text, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) >= 1


def test_every_tensor_type_is_covered(built) -> None:
    types = set()
    for b in built.values():
        for path in (b.float_path, b.quant_path):
            types |= set(GGUFCheckpoint(path).tensor_types().values())
    assert types == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
