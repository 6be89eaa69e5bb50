"""The source tokenizers of the GGUF tests, trained here on CORPUS in each family's style (Llama 3, Qwen2, SmolLM,
SentencePiece; byte_level_bpe and split build other byte-level ones), the TEXTS they must treat alike, and the tiny
sources GGUF files are written from: SIZES (the tiny models' shape), save_source and tiny_file (a tiny Llama as a
GGUF file with a given tokenizer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps keys and values in fixed-size blocks of the cache.",
    "Once upon a time a small model wrote one token after another.",
    "A scheduler batches requests; the block manager hands out blocks and takes them back.",
    "Hello world! Numbers: 0 1 2 3 4 5 6 7 8 9, 42 and 2024; punctuation: ( ) [ ] { } ; : ' \" ?",
    "I'm sure you're right: we've said it's done, they'll see.\n\n  Indented\tand tabbed text.",
    "Columns:  1  2  3\n  4  5  6",
]
# what the tokenizers must treat alike: spaces, digits, unicode outside the tiny vocabularies, specials
TEXTS = [
    "",
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\n\nand new lines  ",
    "Numbers: 12345 and 3.14159, 2024",
    "unicode: café naïve 東京 🦙 Привет",
    "I'm sure you're right; DON'T WE'LL",
]


# ---- tokenizers ----------------------------------------------------------------------------------------------

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _bos_template(bos: str, tok: Tokenizer) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )


def byte_level_bpe(
    pre_tokenizer, specials: list[str], *, normalizer=None, ignore_merges=False, added=(), bos=None
) -> Tokenizer:
    """A byte-level BPE trained on CORPUS: GPT-2 style, with the given pre-tokenizer and special tokens."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_tokens([AddedToken(token, special=False, normalized=False) for token in added])
    if bos is not None:
        tok.post_processor = _bos_template(bos, tok)
    return tok


def split(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = byte_level_bpe(split(_LLAMA3_SPLIT), specials, ignore_merges=True, bos="<|begin_of_text|>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE
    )


def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = byte_level_bpe(split(_QWEN2_SPLIT), specials, normalizer=normalizers.NFC())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )


def smollm_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM's pre-tokenizer (digits one by one, then GPT-2's regex), with Qwen3's <think> tokens added."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok = byte_level_bpe(pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], added=["<think>", "</think>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE
    )


def sentencepiece_tokenizer(add_prefix_space: bool = True) -> PreTrainedTokenizerFast:
    """Llama 2 / Mistral's layout: <unk> <s> </s>, the 256 byte pieces, then BPE pieces learned on CORPUS;
    "▁" for spaces (prefixed to the text unless add_prefix_space is False) and byte fallback."""
    words = Tokenizer(models.BPE(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    words.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = words.get_vocab()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    vocab |= {token: 259 + i for i, token in enumerate(sorted(learned, key=learned.get))}
    merges = [tuple(merge) for merge in json.loads(words.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    prepend = "first" if add_prefix_space else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * add_prefix_space)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = _bos_template("<s>", tok)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_prefix_space=add_prefix_space,
        chat_template=MISTRAL_TEMPLATE,
    )


# ---- tiny sources -------------------------------------------------------------------------------------------

SIZES = dict(num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-6, initializer_range=0.2)


def save_source(tokenizer: PreTrainedTokenizerFast, directory: Path) -> PreTrainedTokenizerFast:
    """Save the source tokenizer where the converter reads it from; return it as a user would load it."""
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def tiny_file(
    tmp_path: Path,
    gguf_writer,
    make_tokenizer: Callable[[], PreTrainedTokenizerFast],
    config: dict | None = None,
    edit: Callable[[PreTrainedModel], None] | None = None,
    **write,
) -> tuple[Path, PreTrainedTokenizerFast]:
    """A 2-layer Llama (LlamaConfig keyword arguments `config`, then `edit`) as a GGUF file with the given
    tokenizer (write: gguf_writer's options); returns the file and the source tokenizer."""
    source_dir, path = tmp_path / "source", tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    tokenizer = save_source(make_tokenizer(), source_dir)
    torch.manual_seed(0)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    model = LlamaForCausalLM(LlamaConfig(**SIZES, **(sizes | (config or {}))))
    if edit is not None:
        edit(model)
    gguf_writer(path, model, source_dir, **(dict(name="tiny", pre="llama-bpe") | write))
    return path, tokenizer
