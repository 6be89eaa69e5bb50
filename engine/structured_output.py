"""Structured outputs: a reply kept to a JSON schema, a regular expression, a list of choices or a grammar, token
by token (vLLM's StructuredOutputsParams).

The grammar engine is llguidance: one dependency-free wheel for every Python, a token mask in about 0.1 ms, and
every kind vLLM offers (JSON schema, regex, choice, Lark and GBNF grammars); vLLM and llama.cpp both ship it as a
backend. Each constrained sequence holds a matcher: before sampling, the tokens its grammar forbids next are masked
to -inf (greedy and sampled rows, parallel samples and beams alike); after, the sampled token advances it.
Compiled grammars are cached by their source, so a batch that shares one schema compiles it once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Grammars kept compiled, least recently used dropped first.
_GRAMMAR_CACHE_SIZE = 256
# Whitespace JSON may have between tokens: none, a space, or a new line and an indent of up to 20 (llama.cpp's
# rule). Pretty-printed JSON fits; a weak model cannot pad a reply with whitespace until max_tokens runs out.
_JSON_WHITESPACE = r"( |\n[ \t]{0,20})?"
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: json (a JSON schema, as a dict or its text), regex, choice (the reply is one of these
    strings), grammar (Lark, or llama.cpp's GBNF), json_object (any JSON object). disable_any_whitespace: JSON
    without whitespace between tokens."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(given) or 'none'}"
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs choice must be a non-empty list of non-empty strings")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs json is not valid JSON: {e}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs json must be a JSON schema object, got {self.json!r}")
        if self.json is not None:
            # Not sorted: the grammar engine has properties written in the order the schema lists them.
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def source(self) -> tuple[str, str]:
        """(llguidance format, text): what the grammar compiles from, and its cache key."""
        if self.json is not None or self.json_object:
            schema = json.loads(self.json) if self.json is not None else {"type": "object"}
            whitespace = (
                {"whitespace_flexible": False}
                if self.disable_any_whitespace
                else {"whitespace_pattern": _JSON_WHITESPACE}
            )
            schema.setdefault("x-guidance", whitespace)  # a schema that sets its own options keeps them
            return "json_schema", json.dumps(schema)
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "grammar", self.grammar


def grammar_error(params: StructuredOutputsParams) -> str | None:
    """What is wrong with params' schema or grammar, in the grammar engine's words, or None when it compiles:
    the check StructuredOutputManager.compile makes, without a tokenizer (a schema can be checked where no
    model is loaded, as it is typed)."""
    import llguidance

    kind, text = params.source
    try:
        return llguidance.LLMatcher.validate_grammar(llguidance.grammar_from(kind, text)) or None
    except (ValueError, RuntimeError) as e:
        return str(e)


class StructuredOutputManager:
    """Compiles grammars for one tokenizer and builds matchers; its masks cover the model's vocabulary."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer = None  # built on first use (0.4 s for a 50k vocabulary)
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()

    def _ll(self):
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer)
        return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> str:
        """The grammar for params, compiled once; ValueError, in the grammar engine's words, when it is invalid."""
        import llguidance

        key = params.source
        grammar = self._grammars.get(key)
        if grammar is not None:
            self._grammars.move_to_end(key)
            return grammar
        kind, text = key
        try:
            grammar = llguidance.grammar_from(kind, text)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"structured_outputs: the {_name(kind)} cannot be compiled: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self._ll())
        if error:
            raise ValueError(f"structured_outputs: the {_name(kind)} cannot be compiled: {error}")
        self._grammars[key] = grammar
        if len(self._grammars) > _GRAMMAR_CACHE_SIZE:
            self._grammars.popitem(last=False)
        return grammar

    def matcher(self, params: StructuredOutputsParams) -> Any:
        import llguidance

        return llguidance.LLMatcher(self._ll(), self.compile(params))

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, Any]]) -> None:
        """Set logits[row, t] = -inf for every token t the row's matcher forbids next. logits: [B, vocab]."""
        ll_vocab = self._ll().vocab_size
        words = (ll_vocab + 31) // 32
        # Each matcher's bitmask: bit t of little-endian uint32 word t // 32 allows token t. [rows, words]
        packed = np.stack([np.frombuffer(m.compute_bitmask(), dtype=np.uint32)[:words] for _, m in rows])
        allowed = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :ll_vocab]  # [rows, ll_vocab]
        # Ids past the tokenizer's vocabulary (padding rows of the embedding) are never allowed.
        mask = torch.zeros((len(rows), logits.shape[1]), dtype=torch.bool)
        width = min(ll_vocab, logits.shape[1])
        mask[:, :width] = torch.from_numpy(allowed[:, :width].astype(bool))
        index = torch.tensor([row for row, _ in rows], device=logits.device)
        logits[index] = logits[index].masked_fill(~mask.to(logits.device), float("-inf"))


@dataclass
class GrammarMask:
    """The logits processor of the constrained rows: what each row's grammar forbids next is -inf."""

    manager: StructuredOutputManager
    rows: list[tuple[int, Any]]  # (row, matcher)

    def apply(self, logits: torch.Tensor) -> None:
        self.manager.mask(logits, self.rows)


def _name(kind: str) -> str:
    return {"json_schema": "JSON schema", "regex": "regular expression", "choice": "choice list"}.get(kind, "grammar")
