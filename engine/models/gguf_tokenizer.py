"""The tokenizer a GGUF file describes in its metadata, as a transformers fast tokenizer.

transformers converts GGUF vocabularies itself (PreTrainedTokenizerFast(gguf_file=...), ~0.4 s for SmolLM2's
49k tokens): byte-level BPE (`tokenizer.ggml.model` gpt2: tokens, merges, token types) and SentencePiece BPE
(llama: tokens, scores -> merges, byte fallback, BOS by default), control tokens as special tokens, bos/eos/
unk/pad, add_bos/add_eos and `tokenizer.chat_template`. That is reused as it is, and corrected where it does not
tokenize as the model's own tokenizer (and llama.cpp) do:
- the pre-tokenizer follows `tokenizer.ggml.pre` for every name kvstudio's families use. transformers leaves
  `smollm` (digits split one by one) on GPT-2's regex, and drops Qwen2's NFC normalizer; a name outside the
  table is refused rather than tokenized some other way.
- a SentencePiece file with `tokenizer.ggml.add_space_prefix` false gets no "▁" prefix (transformers always
  adds one).
- Llama 3 and Tekken vocabularies take a word that is itself a token whole (ignore_merges, as their
  tokenizer.json and llama.cpp do), and add BOS when the file does not state add_bos_token, as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.models.hub import ModelLoadError

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), as the models' tokenizer.json files spell them
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp splits text for one `tokenizer.ggml.pre` name, in tokenizers' terms."""

    split: str | None = None  # the regex the text is split by, None for GPT-2's own (ByteLevel's)
    digits: bool = False  # digits one by one first (SmolLM)
    nfc: bool = False  # NFC-normalized first (Qwen2's tokenizer.json; llama.cpp skips it)
    llama3: bool = False  # llama.cpp's defaults for Llama 3 / Tekken: ignore_merges, and BOS unless the file says

    def build(self) -> pre_tokenizers.PreTokenizer:
        if self.split is not None:
            steps = [
                pre_tokenizers.Split(Regex(self.split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        else:
            digits = [pre_tokenizers.Digits(individual_digits=True)] if self.digits else []
            steps = [*digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        return pre_tokenizers.Sequence(steps)


_BYTE_LEVEL_PRE = {
    "default": _PreTokenizer(),
    "gpt-2": _PreTokenizer(),
    "smollm": _PreTokenizer(digits=True),
    "llama-bpe": _PreTokenizer(_LLAMA3_SPLIT, llama3=True),
    "llama3": _PreTokenizer(_LLAMA3_SPLIT, llama3=True),
    "llama-v3": _PreTokenizer(_LLAMA3_SPLIT, llama3=True),
    "smaug-bpe": _PreTokenizer(_LLAMA3_SPLIT, llama3=True),
    "tekken": _PreTokenizer(_TEKKEN_SPLIT, llama3=True),
    "qwen2": _PreTokenizer(_QWEN2_SPLIT, nfc=True),
    "deepseek-r1-qwen": _PreTokenizer(_QWEN2_SPLIT, nfc=True),
}
SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")


def build_tokenizer(path: Path, metadata: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The fast tokenizer (chat template and special tokens set) of the GGUF file at path, whose metadata
    (scalars and strings, as gguf.py reads them) is given."""
    model = metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise ModelLoadError(
            f"{path}: tokenizer model {model!r} is not supported "
            "(supported: gpt2, the byte-level BPE; llama, the SentencePiece BPE)"
        )
    options = {}
    if model == "gpt2":
        name = metadata.get("tokenizer.ggml.pre", "default")
        if name not in _BYTE_LEVEL_PRE:
            raise ModelLoadError(
                f"{path}: pre-tokenizer '{name}' is not supported (supported: {', '.join(sorted(_BYTE_LEVEL_PRE))})"
            )
        pre = _BYTE_LEVEL_PRE[name]
        if "tokenizer.ggml.add_bos_token" not in metadata:
            options["add_bos_token"] = pre.llama3
    try:
        tokenizer = PreTrainedTokenizerFast(name_or_path=str(path.parent), gguf_file=path.name, **options)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as error:
        raise ModelLoadError(f"{path}: cannot build the tokenizer from its metadata: {error}") from error
    backend = tokenizer.backend_tokenizer
    if model == "gpt2":
        backend.normalizer = normalizers.NFC() if pre.nfc else None
        backend.pre_tokenizer = pre.build()
        backend.model.ignore_merges = pre.llama3  # a word that is itself in the vocabulary is one token
    elif not metadata.get("tokenizer.ggml.add_space_prefix", True):
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
        # transformers' decoder also strips the one leading space its prefix added
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer
