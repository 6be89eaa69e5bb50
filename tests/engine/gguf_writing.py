"""Writing GGUF files for the engine's tests: write_gguf lays a transformers model and its saved tokenizer out as
llama.cpp's convert_hf_to_gguf.py does (tensor names, q/k row permutation, metadata, the vocabulary) and returns the
file's dequantized twin. conftest's gguf_writer fixture hands it to the tests."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from transformers import AutoTokenizer, PreTrainedModel

_GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,  # llama.cpp writes Mistral as llama
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
}
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
# K-quant blocks: byte offset of the f16 scale d, of the f16 min scale dmin (None: the type has none), and the
# dmin / d ratio that centres random blocks on zero: w = d * scale * q - dmin * min, with random 6-bit scales and
# mins of one mean, so the ratio is the mean quant (7.5 for 4 bits, 15.5 for 5).
_K_SCALES = {
    GGMLQuantizationType.Q4_K: (0, 2, 7.5),
    GGMLQuantizationType.Q5_K: (0, 2, 15.5),
    GGMLQuantizationType.Q6_K: (208, None, 0.0),
}


def _random_k_blocks(shape: tuple[int, int], std: float, qtype: GGMLQuantizationType, rng) -> np.ndarray:
    """Random K-quant blocks whose values have standard deviation `std` (gguf cannot quantize K types):
    random quants and sub-block scales, and the f16 super-block scales set so the values centre on zero."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block_size, type_size), dtype=np.uint8)
    d_at, dmin_at, dmin_ratio = _K_SCALES[qtype]

    def set_scales(d: float) -> None:
        blocks[:, d_at : d_at + 2] = np.array([d], np.float16).view(np.uint8)
        if dmin_at is not None:
            blocks[:, dmin_at : dmin_at + 2] = np.array([d * dmin_ratio], np.float16).view(np.uint8)

    set_scales(1.0)
    set_scales(std / gguf.quants.dequantize(blocks, qtype).std())
    return blocks.reshape(shape[0], -1)


def _llama_cpp_permute(weight: np.ndarray, num_heads: int, inverse: bool = False) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (per head, interleave the two halves of the rows), or its inverse."""
    halves = (weight.shape[0] // num_heads // 2, 2) if inverse else (2, weight.shape[0] // num_heads // 2)
    return weight.reshape(num_heads, *halves, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _byte_level_vocab(tokenizer) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf's get_vocab_base: tokens by id, and their types (added tokens: special -> control)."""
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(len(reverse)):
        tokens.append(reverse[i])
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (reverse[i].startswith("<|") and reverse[i].endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types


def _sentencepiece_vocab(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """What convert_hf_to_gguf's _create_vocab_sentencepiece reads from a tokenizer.model, for a byte-fallback
    BPE tokenizer.json: pieces by id, scores that rank merged pieces in merge order, and piece types."""
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    tokens, scores, types = [], [], []
    for i in range(len(reverse)):
        token = reverse[i]
        tokens.append(token)
        if token == tokenizer.unk_token:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in tokenizer.added_tokens_decoder:
            types.append(gguf.TokenType.CONTROL)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i) if types[-1] == gguf.TokenType.NORMAL else 0.0)
    return tokens, scores, types


def write_gguf(
    path: Path,
    model: PreTrainedModel,
    tokenizer_dir: Path,
    *,
    name: str,
    pre: str = "default",
    types: dict[str, GGMLQuantizationType] | None = None,
    default_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    file_type: gguf.LlamaFileType = gguf.LlamaFileType.ALL_F32,
    sliding_window: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """Write `model` (with the tokenizer saved in tokenizer_dir) as a GGUF file the way llama.cpp's
    convert_hf_to_gguf.py names and lays it out, and return a copy of the model holding exactly the weights the
    file stores: each one round-tripped through its type (dequantized), so transformers' float32 model of that
    copy is the file's dequantized twin.

    types: GGUF base name ("token_embd", "attn_q", "ffn_down", "output", ...) -> type for matrices (others get
    default_type); vectors (norms, biases) are F32, as llama.cpp keeps them. F32/F16/BF16 and Q4_0 ... Q8_0 are
    gguf's quantization of the weight; K types are random blocks of the weight's spread. pre: the byte-level
    pre-tokenizer name (tokenizer.ggml.pre); a tokenizer with byte fallback is written as SentencePiece ("llama").
    sliding_window: written as {arch}.attention.sliding_window (llama.cpp's converter writes it for some
    architectures only; a file that says it is what the loader must honour).
    """
    config = model.config
    arch = _GGUF_ARCHITECTURES[type(model).__name__]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    twin = copy.deepcopy(model).eval()
    writer = gguf.GGUFWriter(path, arch_name)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if rope["rope_type"] == "llama3":  # convert_hf_to_gguf's generate_extra_tensors
        freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        context, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < context / high:
                factors.append(1)
            elif wavelen > context / low:
                factors.append(rope["factor"])
            else:
                smooth = (context / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    elif rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if "beta_fast" in rope:
            writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if "beta_slow" in rope:
            writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        if "attention_factor" in rope:
            writer.add_rope_scaling_yarn_attn_factor(rope["attention_factor"])
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:  # as LlamaModel.set_vocab
        writer.add_add_space_prefix(add_prefix_space)
    if json.loads(hf_tokenizer.backend_tokenizer.to_str())["model"].get("byte_fallback"):
        tokens, scores, token_types = _sentencepiece_vocab(hf_tokenizer)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        special_vocab = gguf.SpecialVocab(tokenizer_dir, n_vocab=len(tokens))
    else:
        tokens, token_types = _byte_level_vocab(hf_tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        special_vocab = gguf.SpecialVocab(tokenizer_dir, load_merges=True)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special_vocab.add_to_gguf(writer, quiet=True)

    rng = np.random.default_rng(seed)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = twin.state_dict()
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        weight = tensor.float().numpy()
        heads = {"q_proj.weight": config.num_attention_heads, "k_proj.weight": config.num_key_value_heads}
        permuted = next((n for key, n in heads.items() if hf_name.endswith(key)), None)
        if arch == gguf.MODEL_ARCH.LLAMA and permuted:
            weight = _llama_cpp_permute(weight, permuted)
        qtype = GGMLQuantizationType.F32
        if weight.ndim == 2:
            qtype = (types or {}).get(gguf_name.removeprefix("blk.").split(".")[-2], default_type)
        if qtype in _K_SCALES:
            data = _random_k_blocks(weight.shape, float(weight.std()), qtype, rng)
        elif qtype in _FLOAT_TYPES:
            data = weight.astype(np.float16 if qtype == GGMLQuantizationType.F16 else np.float32)
        else:
            data = gguf.quants.quantize(weight, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=None if qtype in _FLOAT_TYPES else qtype)
        stored = gguf.quants.dequantize(data.view(np.uint8), qtype).reshape(weight.shape)
        if arch == gguf.MODEL_ARCH.LLAMA and permuted:
            stored = _llama_cpp_permute(stored, permuted, inverse=True)
        state[hf_name].copy_(torch.from_numpy(np.ascontiguousarray(stored)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return twin
