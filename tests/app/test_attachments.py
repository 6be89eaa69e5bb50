"""Files attached to a chat message: text read and fenced under its name, counted by the model's tokenizer (or
estimated), and every file that cannot go in refused with its name and the reason."""

from __future__ import annotations

import os

import pytest

from app import attachments
from app.attachments import (
    ESTIMATE,
    Attachment,
    AttachmentError,
    TokenCounter,
    as_block,
    compose,
    estimate_tokens,
    read_attachment,
)


@pytest.fixture
def counter(smollm2_tokenizer) -> TokenCounter:
    return TokenCounter(lambda text: len(smollm2_tokenizer.encode(text, add_special_tokens=False)), True, 512)


def test_a_text_file_is_fenced_under_its_name_and_counted_by_the_tokenizer(tmp_path, counter, smollm2_tokenizer):
    path = tmp_path / "notes.py"
    path.write_bytes(b"\xef\xbb\xbfdef f():\r\n    return 1\r\n")  # a BOM and Windows line ends
    a = read_attachment(path, counter)
    assert a.name == "notes.py" and a.text == "def f():\n    return 1\n"
    assert a.block == "File: notes.py\n```py\ndef f():\n    return 1\n```"
    assert a.tokens == len(smollm2_tokenizer.encode(a.block, add_special_tokens=False)) and a.exact


def test_the_fence_outlasts_any_backticks_in_the_text_and_odd_suffixes_name_no_language():
    assert as_block("README.md", "a\n````\nb") == "File: README.md\n`````md\na\n````\nb\n`````"
    assert as_block("Makefile", "all:\n") == "File: Makefile\n```\nall:\n```"
    assert as_block("x.c++", "int") == "File: x.c++\n```\nint\n```"


def test_without_a_tokenizer_the_count_is_an_estimate(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x" * 100)
    a = read_attachment(path, ESTIMATE)
    assert not a.exact and a.tokens == estimate_tokens(a.block) == -(-len(a.block) // 4)


def test_the_message_holds_each_file_then_what_was_typed(tmp_path):
    one = Attachment(tmp_path / "a.txt", "A", "File: a.txt\n```txt\nA\n```", 9, True)
    two = Attachment(tmp_path / "b.txt", "B", "File: b.txt\n```txt\nB\n```", 9, True)
    assert compose([one, two], "Compare them.") == f"{one.block}\n\n{two.block}\n\nCompare them."
    assert compose([one], "") == one.block
    assert compose([], "Hi") == "Hi"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.mkdir(), "item: a folder; attach the files in it"),
        (lambda p: None, "item: cannot read the file: No such file or directory"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "item: a binary file, not text"),
        (lambda p: p.write_bytes(b"caf\xe9\nline two\n"), "item: not UTF-8 text (byte 0xe9 on line 1)"),
        (lambda p: p.write_bytes(b"one\ntwo\n\xff"), "item: not UTF-8 text (byte 0xff on line 3)"),
        (lambda p: p.write_text(" \n\n"), "item: the file is empty"),
    ],
)
def test_what_cannot_be_attached_is_refused_naming_the_file(tmp_path, counter, make, reason):
    path = tmp_path / "item"
    make(path)
    with pytest.raises(AttachmentError) as e:
        read_attachment(path, counter)
    assert str(e.value) == reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused(tmp_path, counter):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    with pytest.raises(AttachmentError, match=r"^secret.txt: cannot read the file: Permission denied$"):
        read_attachment(path, counter)


def test_a_file_too_large_for_the_context_is_refused_with_its_count_and_the_context(tmp_path, counter):
    path = tmp_path / "long.txt"
    path.write_text("word " * 600)
    tokens = counter.count(as_block("long.txt", "word " * 600))
    with pytest.raises(AttachmentError) as e:
        read_attachment(path, counter)
    assert str(e.value) == f"long.txt: {tokens:,} tokens, more than the model's context of 512 tokens"

    # One that fits alone, but not beside what is attached already.
    short = tmp_path / "short.txt"
    short.write_text("word " * 50)
    fits = read_attachment(short, counter)
    with pytest.raises(AttachmentError) as e:
        read_attachment(short, counter, attached_tokens=500)
    assert str(e.value) == (
        f"short.txt: {fits.tokens} tokens; with the 500 tokens attached already that is more than the model's "
        "context of 512 tokens"
    )


def test_a_file_past_the_size_limit_is_refused_unread(tmp_path, counter, monkeypatch):
    monkeypatch.setattr(attachments, "MAX_BYTES", 1024)
    path = tmp_path / "big.log"
    path.write_text("x" * 2048)
    with pytest.raises(AttachmentError, match=r"^big.log: 2 KiB, too large to attach \(at most 1 KiB\)$"):
        read_attachment(path, counter)
