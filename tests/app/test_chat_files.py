"""A conversation exported to JSON and imported again is the same conversation (and a branch holds its messages up
to the chosen one); Markdown puts each message under its role; a malformed file is refused in words naming what is
wrong, with nothing saved."""

from __future__ import annotations

import json

import pytest

from app.chat_files import ConversationFileError, export_conversation, import_conversation
from app.history import ChatHistory


@pytest.fixture
def history(tmp_path):
    with ChatHistory(tmp_path / "history.sqlite3") as h:
        yield h


@pytest.fixture
def conversation(history):
    conv = history.create_conversation("Sea haiku", system_prompt="Answer in verse.")
    history.set_json_schema(conv.id, '{"type": "object"}')
    history.add_message(conv.id, "user", "Write a haiku about the sea.")
    history.add_message(conv.id, "assistant", "Waves fold into foam\n```py\nprint('ä')\n```", stats={"tokens": 12})
    history.add_message(conv.id, "user", "Another, please.")
    return history.conversation(conv.id)


def test_json_export_then_import_gives_the_same_conversation(history, conversation, tmp_path):
    path = tmp_path / "sea.json"
    export_conversation(history, conversation.id, path)
    copy = import_conversation(history, path)
    assert copy.id != conversation.id
    assert (copy.title, copy.system_prompt, copy.json_schema) == (
        conversation.title,
        conversation.system_prompt,
        conversation.json_schema,
    )
    before = [(m.role, m.content, m.stats) for m in history.messages(conversation.id)]
    assert [(m.role, m.content, m.stats) for m in history.messages(copy.id)] == before
    assert len(history.list_conversations()) == 2
    assert not list(tmp_path.glob(".sea.json.*"))  # the temporary file went into place


def test_markdown_export_puts_each_message_under_its_role(history, conversation, tmp_path):
    path = tmp_path / "sea.md"
    export_conversation(history, conversation.id, path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Sea haiku\n")
    assert "## System prompt\n\nAnswer in verse." in text
    # in the order they were said, each right after its role's heading
    expected = [("User", "Write a haiku about the sea."), ("Assistant", "Waves fold"), ("User", "Another, please.")]
    at = 0
    for role, content in expected:
        at = text.index(f"## {role}\n\n{content}", at) + 1


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not JSON"),
        ('["a list"]', "not a kvstudio conversation"),
        ('{"version": 1, "title": "t", "messages": []}', "not a kvstudio conversation"),
        ({"version": 2, "title": "t", "messages": []}, "version 2"),
        ({"version": 1, "messages": []}, "title is missing"),
        ({"version": 1, "title": 3, "messages": []}, "title must be text"),
        ({"version": 1, "title": "t"}, "messages must be a list"),
        ({"version": 1, "title": "t", "messages": ["hi"]}, "messages[0] must be an object"),
        ({"version": 1, "title": "t", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({"version": 1, "title": "t", "messages": [{"role": "user"}]}, "messages[0].content is missing"),
        ({"version": 1, "title": "t", "messages": [{"role": "user", "content": "x", "stats": []}]}, "stats"),
        ({"version": 1, "title": "t", "json_schema": "{x", "messages": []}, "json_schema is not JSON"),
    ],
)
def test_a_malformed_file_is_refused_in_words_and_nothing_is_saved(history, tmp_path, content, words):
    if isinstance(content, dict):  # a conversation file with one thing wrong
        content = json.dumps({"format": "kvstudio-conversation", **content})
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConversationFileError) as refused:
        import_conversation(history, path)
    assert "bad.json" in str(refused.value) and words in str(refused.value)
    assert history.list_conversations() == []


def test_a_branch_holds_the_messages_up_to_and_including_the_chosen_one(history, conversation):
    messages = history.messages(conversation.id)
    branch = history.branch(messages[1].id)
    assert branch.id != conversation.id and branch.title == "Sea haiku (branch)"
    assert (branch.system_prompt, branch.json_schema) == (conversation.system_prompt, conversation.json_schema)
    assert [(m.role, m.content, m.stats) for m in history.messages(branch.id)] == [
        (m.role, m.content, m.stats) for m in messages[:2]
    ]
    assert history.messages(conversation.id) == messages  # the original is untouched
