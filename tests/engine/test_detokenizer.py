"""IncrementalDetokenizer: streamed deltas add up to a full decode; stop strings cut and never leak."""

from __future__ import annotations

import functools
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello 😀 world! 👩‍👩‍👧 family",
    "世界你好，这是一个测试。日本語もあります",
    "café naïve résumé déjà vu — Ærøskøbing ÿ",
    "mixed: 🤖 robots 🦀 crabs, 中文 and ñ at the end ñ",
    "code:\n\tdef f(x):\n\t\treturn x  # ok\n\n",
]


@functools.lru_cache(maxsize=1)
def _build_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny Llama-style tokenizer: Metaspace "▁" words, BPE, byte fallback for what the vocab lacks."""
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, this is a café",
        "naïve résumé déjà vu",
        "stop strings end generation early",
    ] * 10
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    # Byte tokens are plain vocabulary (not special), as in SentencePiece models, so add them to the model.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def sp_tokenizer():
    return _build_sentencepiece_tokenizer()


class _PieceTokenizer:
    """Ids index a list of text pieces; decode joins them. Makes stop-string cases exact."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.decoded_lengths: list[int] = []

    def ids(self, *pieces: str) -> list[int]:
        return [self.pieces.index(p) for p in pieces]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        self.decoded_lengths.append(len(ids))
        return "".join(self.pieces[i] for i in ids)


def _stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    """Appends each chunk (stopping once a stop string fired) and finishes; returns every delta."""
    deltas = []
    for chunk in chunks:
        if detok.stop_reason is not None:
            break
        deltas.append(detok.append(chunk))
    deltas.append(detok.finish())
    return deltas


def _random_chunks(rng: random.Random, ids: list[int]) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        chunks.append(ids[i : i + n])
        i += n
    return chunks


# --- multi-byte characters and the full-decode invariant -------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_text_appears_as_soon_as_each_character_is_complete(smollm2_tokenizer, text):
    tok = smollm2_tokenizer
    prompt = tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    out = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    for k in range(1, len(out) + 1):
        delta = detok.append([out[k - 1]])
        assert "\ufffd" not in delta
        so_far = tok.decode(out[:k])
        if so_far.endswith("\ufffd"):  # the newest token ends inside a character: nothing of it shown yet
            assert so_far.startswith(detok.text) and len(detok.text) < len(so_far)
        else:
            assert detok.text == so_far
    assert detok.finish() == ""
    assert detok.text == text and detok.stop_reason is None


def test_smollm2_emoji_split_over_two_tokens_is_emitted_once_whole(smollm2_tokenizer):
    tok = smollm2_tokenizer
    out = tok.encode("Hi 😀", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in out]
    assert any("\ufffd" in p for p in pieces), "expected the emoji to span tokens with this tokenizer"
    detok = IncrementalDetokenizer(tok, tok.encode("Say hi"))
    deltas = [detok.append([i]) for i in out]
    assert "".join(deltas) == "Hi 😀"
    assert deltas == ["Hi", "", " 😀"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_smollm2_random_token_sequences_stream_to_the_full_decode(smollm2_tokenizer, skip_special_tokens):
    tok = smollm2_tokenizer
    rng = random.Random(1234 + skip_special_tokens)
    special_ids = list(range(17))
    prompt = tok.encode("<|im_start|>assistant\n")
    for _ in range(150):
        # Mostly arbitrary vocabulary (byte fragments included), sometimes special tokens.
        out = [
            rng.choice(special_ids) if rng.random() < 0.1 else rng.randrange(len(tok))
            for _ in range(rng.randint(1, 40))
        ]
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
        deltas = _stream(detok, _random_chunks(rng, out))
        expected = tok.decode(out, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == detok.text == expected, out


def test_smollm2_special_tokens_kept_only_when_not_skipped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    out = tok.encode("Done.<|im_end|>", add_special_tokens=False)
    for skip, expected in [(True, "Done."), (False, "Done.<|im_end|>")]:
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        assert "".join(_stream(detok, [[i] for i in out])) == expected


def _sp_random_output(rng: random.Random, tok) -> list[int]:
    """Random words and special tokens, and the byte tokens of whole characters the vocabulary lacks."""
    byte_base = tok.convert_tokens_to_ids("<0x00>")
    out = []
    for _ in range(rng.randint(1, 30)):
        r = rng.random()
        if r < 0.1:
            out.append(rng.choice(tok.all_special_ids))
        elif r < 0.3:
            out += [byte_base + b for b in rng.choice("😀世界🦀ÿ").encode()]
        else:
            out.append(rng.randrange(3, byte_base))
    return out


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sentencepiece_random_sequences_stream_like_a_full_decode(sp_tokenizer, skip_special_tokens):
    tok = sp_tokenizer
    rng = random.Random(99 + skip_special_tokens)
    prompt = tok.encode("the lazy dog", add_special_tokens=False)
    prompt_text = tok.decode(prompt, skip_special_tokens=skip_special_tokens)
    for _ in range(200):
        out = _sp_random_output(rng, tok)
        # Without a prompt the output's leading "▁" is stripped as in decode(output) ...
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip_special_tokens)
        deltas = _stream(detok, _random_chunks(rng, out))
        assert "".join(deltas) == tok.decode(out, skip_special_tokens=skip_special_tokens), out
        # ... and after a prompt it reads as the continuation of the prompt's text.
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
        deltas = _stream(detok, _random_chunks(rng, out))
        full = tok.decode(prompt + out, skip_special_tokens=skip_special_tokens)
        assert full.startswith(prompt_text)
        assert "".join(deltas) == full[len(prompt_text) :], out


def test_sentencepiece_keeps_the_word_boundary_after_the_prompt(sp_tokenizer):
    tok = sp_tokenizer
    out = tok.encode("hello 😀 world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("the fox", add_special_tokens=False))
    deltas = [detok.append([i]) for i in out]
    assert "".join(deltas) == " hello 😀 world"
    assert all("\ufffd" not in d for d in deltas)


def test_decoding_work_per_call_is_bounded_by_the_window():
    tok = _PieceTokenizer([" word", "s", ".", "\n"])
    detok = IncrementalDetokenizer(tok, [0] * 1000)
    for i in range(2000):
        detok.append([i % 4])
    assert max(tok.decoded_lengths) <= 6
    assert len(detok.text) == 500 * len(" words.\n")


# --- stop strings ---------------------------------------------------------------------------------------------

PIECES = ["Hel", "lo", " wo", "rld", "!", " w", "ow", "wor", "ld\n", "xy"]


def test_stop_string_spanning_tokens_is_cut_and_never_shown():
    tok = _PieceTokenizer(PIECES)
    detok = IncrementalDetokenizer(tok, [], stop=["world"])
    assert detok.append(tok.ids("Hel", "lo")) == "Hello"
    assert detok.append(tok.ids(" wo")) == " "  # "wo" may begin "world": held back
    assert detok.stop_reason is None
    assert detok.append(tok.ids("rld", "!")) == ""
    assert (detok.text, detok.stop_reason) == ("Hello ", "world")
    assert detok.finish() == ""
    with pytest.raises(RuntimeError, match="finished"):
        detok.append(tok.ids("!"))


def test_stop_string_kept_with_include_stop_str_in_output_needs_no_hold_back():
    tok = _PieceTokenizer(PIECES)
    detok = IncrementalDetokenizer(tok, [], stop=["world"], include_stop_str_in_output=True)
    deltas = _stream(detok, [tok.ids("Hel", "lo", " wo"), tok.ids("rld", "!")])
    assert deltas == ["Hello wo", "rld", ""]  # the cut comes after "world", so "wo" could be shown at once
    assert (detok.text, detok.stop_reason) == ("Hello world", "world")


def test_held_text_is_released_when_it_turns_out_not_to_be_a_stop():
    tok = _PieceTokenizer(PIECES)
    detok = IncrementalDetokenizer(tok, [], stop=["world"])
    assert detok.append(tok.ids(" w")) == " "
    assert detok.append(tok.ids("ow")) == "wo"  # the last "w" may begin "world" again
    assert detok.append(tok.ids("!")) == "w!"
    assert detok.append(tok.ids(" wo")) == " "
    assert detok.finish() == "wo"  # generation ended: the partial stop is plain text
    assert (detok.text, detok.stop_reason) == (" wow! wo", None)


def test_without_hold_back_the_partial_stop_is_shown_then_cut_from_text():
    tok = _PieceTokenizer(PIECES)
    detok = IncrementalDetokenizer(tok, [], stop=["world"], hold_back_partial_stop=False)
    assert detok.append(tok.ids("Hel", "lo", " wo")) == "Hello wo"
    assert detok.append(tok.ids("rld")) == ""
    assert (detok.text, detok.stop_reason) == ("Hello ", "world")


def test_earliest_stop_in_the_text_wins_over_list_order():
    tok = _PieceTokenizer(PIECES)
    detok = IncrementalDetokenizer(tok, [], stop=["ld", "Hello w"])
    _stream(detok, [tok.ids("Hel", "lo", " wo", "rld")])
    assert (detok.text, detok.stop_reason) == ("", "Hello w")


def test_stop_strings_are_ignored_before_min_tokens():
    tok = _PieceTokenizer(PIECES)
    detok = IncrementalDetokenizer(tok, [], stop=["world", "xy"], min_tokens=5)
    assert detok.append(tok.ids("Hel", "lo", " wo")) == "Hello "
    assert detok.append(tok.ids("rld")) == "world"  # the 4th id completes "world", too early to stop
    assert detok.stop_reason is None
    assert detok.append(tok.ids("xy")) == ""  # the 5th may stop
    assert (detok.text, detok.stop_reason) == ("Hello world", "xy")


@pytest.mark.parametrize("stop", [["ok", ""], "ok"])
def test_stop_must_be_a_list_of_non_empty_strings(stop):
    with pytest.raises(ValueError, match="non-empty strings"):
        IncrementalDetokenizer(_PieceTokenizer(PIECES), [], stop=stop)


def _reference_stop(chunks: list[str], stops: list[str], include: bool) -> tuple[str, str | None]:
    """Whole-text search after each chunk: the first chunk that completes a stop, earliest start in it."""
    text = ""
    for chunk in chunks:
        text += chunk
        found = [(text.find(s), k, s) for k, s in enumerate(stops) if s in text]
        if found:
            start, _, stop = min(found)
            return text[: start + (len(stop) if include else 0)], stop
    return text, None


@pytest.mark.parametrize("include", [False, True])
def test_random_streams_match_a_whole_text_stop_search_and_never_leak(include):
    rng = random.Random(7 + include)
    tok = _PieceTokenizer(["a", "b", "c", "ab", "ba", "abc"])
    for _ in range(500):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        chunks = _random_chunks(rng, [rng.randrange(len(tok.pieces)) for _ in range(rng.randint(1, 25))])
        expected_text, expected_stop = _reference_stop(
            ["".join(tok.pieces[i] for i in c) for c in chunks], stops, include
        )
        detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
        shown = ""
        for chunk in chunks:
            if detok.stop_reason is not None:
                break
            shown += detok.append(chunk)
            assert expected_text.startswith(shown), (stops, chunks)  # nothing past the cut, ever
            assert shown == detok.text
        shown += detok.finish()
        assert (shown, detok.text, detok.stop_reason) == (expected_text, expected_text, expected_stop)

        # Without hold-back the deltas may run ahead, but the final text and reason are the same.
        detok = IncrementalDetokenizer(
            tok, [], stop=stops, include_stop_str_in_output=include, hold_back_partial_stop=False
        )
        _stream(detok, chunks)
        assert (detok.text, detok.stop_reason) == (expected_text, expected_stop)


def test_smollm2_chat_turn_stop_string(smollm2_tokenizer):
    tok = smollm2_tokenizer
    out = tok.encode("Sure! The answer is 42 😀.\n\nUser: thanks", add_special_tokens=False)
    for include, expected in [(False, "Sure! The answer is 42 😀."), (True, "Sure! The answer is 42 😀.\n\nUser:")]:
        detok = IncrementalDetokenizer(
            tok, tok.encode("Question?"), stop=["\n\nUser:"], include_stop_str_in_output=include
        )
        deltas = _stream(detok, [[i] for i in out])
        assert "".join(deltas) == detok.text == expected
        assert detok.stop_reason == "\n\nUser:"


def test_a_stop_string_shown_before_min_tokens_does_not_stop_generation_later():
    tok = _PieceTokenizer(["a", "\n", "b", "c", "END!"])
    detok = IncrementalDetokenizer(tok, [], stop=["\n", "END!"], min_tokens=4)
    deltas = [detok.append([i]) for i in tok.ids("a", "\n", "b", "c")]
    # The "\n" came at token 2, while stop strings were off; token 4 must not turn it into a stop.
    assert detok.stop_reason is None and detok.text == "a\nbc" and "".join(deltas) == "a\nbc"
    detok.append(tok.ids("END!"))
    assert (detok.text, detok.stop_reason) == ("a\nbc", "END!")
