from __future__ import annotations

import sqlite3
import threading

import pytest

from app import history as history_module
from app.history import (
    SCHEMA_VERSION,
    ChatHistory,
    Conversation,
    HistoryError,
    Message,
    NotFoundError,
    SaveError,
    title_from,
)


@pytest.fixture
def history(tmp_path):
    with ChatHistory(tmp_path / "history.sqlite3") as h:
        yield h


def ids(conversations: list[Conversation]) -> list[int]:
    return [c.id for c in conversations]


def test_conversation_and_messages_round_trip_through_the_file(tmp_path):
    path = tmp_path / "history.sqlite3"
    with ChatHistory(path) as h:
        conv = h.create_conversation("Paging", "Be brief.")
        user = h.add_message(conv.id, "user", "What is a KV block?")
        reply = h.add_message(
            conv.id,
            "assistant",
            "A fixed number of tokens' K/V.",
            stats={"tokens": 9, "tokens_per_s": 41.5, "ttft_s": 0.12, "finish_reason": "stop"},
        )
        stored = h.conversation(conv.id)
    assert (conv.title, conv.system_prompt) == ("Paging", "Be brief.")
    assert user == Message(user.id, conv.id, "user", "What is a KV block?", user.created, True, {})
    with ChatHistory(path) as h:
        assert h.conversation(conv.id) == stored
        assert h.messages(conv.id) == [user, reply]
        assert h.list_conversations() == [stored]


def test_setters_change_only_their_field(history):
    conv = history.create_conversation()
    assert (conv.title, conv.system_prompt) == ("New chat", "")
    history.rename(conv.id, "Renamed")
    assert (history.conversation(conv.id).title, history.conversation(conv.id).system_prompt) == ("Renamed", "")
    history.set_system_prompt(conv.id, "You are terse.")
    got = history.conversation(conv.id)
    assert (got.title, got.system_prompt) == ("Renamed", "You are terse.")
    assert got.created == conv.created


def test_every_write_moves_its_conversation_to_the_front(history):
    a, b, c = (history.create_conversation(t) for t in "abc")
    assert ids(history.list_conversations()) == [c.id, b.id, a.id]
    msg = history.add_message(a.id, "user", "hi")
    assert ids(history.list_conversations()) == [a.id, c.id, b.id]
    history.rename(b.id, "b2")
    assert ids(history.list_conversations()) == [b.id, a.id, c.id]
    history.set_system_prompt(c.id, "x")
    assert ids(history.list_conversations()) == [c.id, b.id, a.id]
    history.update_message(msg.id, "hello", True)
    assert ids(history.list_conversations()) == [a.id, c.id, b.id]
    history.rename(b.id, "b3")
    assert ids(history.list_conversations()) == [b.id, a.id, c.id]
    history.delete_messages_after(msg.id)
    assert ids(history.list_conversations()) == [a.id, b.id, c.id]
    updated = [conv.updated for conv in history.list_conversations()]
    assert updated == sorted(updated, reverse=True) and len(set(updated)) == 3


def test_messages_come_back_in_the_order_added(history):
    conv = history.create_conversation()
    other = history.create_conversation()
    for i in range(4):
        history.add_message(conv.id, "user" if i % 2 == 0 else "assistant", f"m{i}")
        history.add_message(other.id, "user", f"other{i}")
    assert [m.content for m in history.messages(conv.id)] == ["m0", "m1", "m2", "m3"]
    assert [m.role for m in history.messages(conv.id)] == ["user", "assistant", "user", "assistant"]


def test_search_matches_title_or_content_ignoring_case(history):
    by_title = history.create_conversation("Rope scaling notes")
    by_content = history.create_conversation("Untitled")
    history.add_message(by_content.id, "user", "first")
    history.add_message(by_content.id, "assistant", "Then ROPE theta goes up.")
    umlaut = history.create_conversation("ÄPFEL und Birnen")
    history.create_conversation("Nothing relevant")
    assert ids(history.list_conversations("rope")) == [by_content.id, by_title.id]
    assert ids(history.list_conversations("äpfel")) == [umlaut.id]
    assert history.list_conversations("no such words") == []
    assert len(history.list_conversations("")) == 4


def test_search_takes_like_wildcards_literally(history):
    percent = history.create_conversation("100% done")
    history.create_conversation("100 and done")
    underscore = history.create_conversation("t")
    history.add_message(underscore.id, "user", "call max_tokens now")
    history.add_message(history.create_conversation("u").id, "user", "call maxXtokens now")
    backslash = history.create_conversation(r"C:\models")
    history.create_conversation("C:models")
    assert ids(history.list_conversations("0%")) == [percent.id]
    assert ids(history.list_conversations("x_t")) == [underscore.id]
    assert ids(history.list_conversations("%")) == [percent.id]
    assert ids(history.list_conversations(":\\m")) == [backslash.id]


def test_delete_takes_the_conversations_messages_with_it(tmp_path):
    path = tmp_path / "history.sqlite3"
    with ChatHistory(path) as h:
        gone = h.create_conversation("gone")
        kept = h.create_conversation("kept")
        h.add_message(gone.id, "user", "a")
        h.add_message(kept.id, "user", "b")
        h.add_message(gone.id, "assistant", "c")
        h.delete(gone.id)
        assert ids(h.list_conversations()) == [kept.id]
        assert [m.content for m in h.messages(kept.id)] == ["b"]
        with pytest.raises(NotFoundError):
            h.messages(gone.id)
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT content FROM messages").fetchall() == [("b",)]
    raw.close()


def test_a_reply_streamed_before_a_crash_survives_unfinished(tmp_path):
    path = tmp_path / "history.sqlite3"
    live = ChatHistory(path)
    conv = live.create_conversation()
    live.add_message(conv.id, "user", "Count to three")
    reply = live.add_message(conv.id, "assistant", "", finished=False)
    for shown in ("One", "One, two", "One, two,"):
        live.update_message(reply.id, shown, finished=False)
    # No close: a second ChatHistory on the same file is what the app sees after it died and restarted.
    reopened = ChatHistory(path)
    partial = reopened.messages(conv.id)[-1]
    assert (partial.id, partial.content, partial.finished, partial.stats) == (reply.id, "One, two,", False, {})
    reopened.update_message(reply.id, "One, two, three.", True, {"tokens": 6, "finish_reason": "stop"})
    reopened.update_message(reply.id, "One, two, three!", True)  # no stats: the stored ones stay
    done = reopened.messages(conv.id)[-1]
    assert (done.content, done.finished, done.stats) == (
        "One, two, three!",
        True,
        {"tokens": 6, "finish_reason": "stop"},
    )
    live.close()
    reopened.close()


def test_a_streaming_reply_is_saved_with_one_update_another_connection_sees(tmp_path):
    path = tmp_path / "history.sqlite3"
    live = ChatHistory(path)
    conv = live.create_conversation()
    reply = live.add_message(conv.id, "assistant", "", finished=False)
    statements = []
    live._db.set_trace_callback(statements.append)
    live.save_streaming_text(reply.id, "Once upon")
    live._db.set_trace_callback(None)
    # the chat page saves before every redraw (20 a second): one statement, nothing read back
    assert [s for s in statements if s not in ("BEGIN ", "COMMIT")] == [
        "UPDATE messages SET content = 'Once upon' WHERE id = 1"
    ]
    with ChatHistory(path) as reopened:  # what a restart after kill -9 reads
        partial = reopened.messages(conv.id)[-1]
        assert (partial.content, partial.finished) == ("Once upon", False)
    with pytest.raises(NotFoundError, match=f"no message with id {reply.id + 1}"):
        live.save_streaming_text(reply.id + 1, "x")
    live.close()


def test_a_full_disk_fails_each_write_in_words_and_keeps_what_was_saved(tmp_path):
    path = tmp_path / "history.sqlite3"
    history = ChatHistory(path)
    conv = history.create_conversation("Kept")
    reply = history.add_message(conv.id, "assistant", "saved before", finished=False)
    # SQLite's own full-disk error (SQLITE_FULL): the file may not grow by a single page
    pages = history._db.execute("PRAGMA page_count").fetchone()[0]
    history._db.execute(f"PRAGMA max_page_count = {pages}")
    big = "x" * 20_000  # more than a page: the write must grow the file
    writes = [
        lambda: history.add_message(conv.id, "user", big),
        lambda: history.update_message(reply.id, big, finished=True),
        lambda: history.save_streaming_text(reply.id, big),
        lambda: history.create_conversation(big),
        lambda: history.rename(conv.id, big),
    ]
    said = f"cannot save to the chat history {path}: the disk is full; it keeps what it held before"
    for write in writes:
        with pytest.raises(SaveError) as err:
            write()
        assert str(err.value) == said and isinstance(err.value, HistoryError)
    with ChatHistory(path) as reopened:
        assert [c.title for c in reopened.list_conversations()] == ["Kept"]
        [kept] = reopened.messages(conv.id)
        assert (kept.content, kept.finished) == ("saved before", False)
    history._db.execute("PRAGMA max_page_count = 1073741823")  # space again: the same history writes on
    history.save_streaming_text(reply.id, big)
    assert history.messages(conv.id)[-1].content == big
    history.close()


def test_delete_messages_after_drops_that_message_and_later_ones_of_its_conversation(history):
    conv = history.create_conversation()
    other = history.create_conversation()
    u1 = history.add_message(conv.id, "user", "u1")
    history.add_message(other.id, "user", "other1")
    a1 = history.add_message(conv.id, "assistant", "a1")
    history.add_message(conv.id, "user", "u2")
    history.add_message(other.id, "user", "other2")
    last = history.add_message(conv.id, "assistant", "a2")
    history.delete_messages_after(a1.id)
    assert [m.content for m in history.messages(conv.id)] == ["u1"]
    assert [m.content for m in history.messages(other.id)] == ["other1", "other2"]
    again = history.add_message(conv.id, "assistant", "a1 regenerated")
    assert again.id > last.id  # ids are never reused, so a stale id cannot address the new message
    assert [m.id for m in history.messages(conv.id)] == [u1.id, again.id]
    with pytest.raises(NotFoundError, match=str(a1.id)):
        history.update_message(a1.id, "late token", False)


def test_roles_are_validated(history):
    conv = history.create_conversation()
    with pytest.raises(ValueError, match="role"):
        history.add_message(conv.id, "tool", "x")
    assert history.messages(conv.id) == []
    for role in ("system", "user", "assistant"):
        history.add_message(conv.id, role, role)
    assert [m.role for m in history.messages(conv.id)] == ["system", "user", "assistant"]


def test_unknown_ids_raise_a_typed_error_naming_the_id(history):
    msg = history.add_message(history.create_conversation().id, "user", "x")
    missing = msg.id + 1000
    calls = [
        lambda: history.conversation(missing),
        lambda: history.rename(missing, "t"),
        lambda: history.set_system_prompt(missing, "s"),
        lambda: history.delete(missing),
        lambda: history.messages(missing),
        lambda: history.add_message(missing, "user", "x"),
        lambda: history.update_message(missing, "x", True),
        lambda: history.save_streaming_text(missing, "x"),
        lambda: history.delete_messages_after(missing),
    ]
    for call in calls:
        with pytest.raises(HistoryError, match=f"id {missing}") as err:
            call()
        assert isinstance(err.value, LookupError)


def test_a_file_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "history.sqlite3"
    ChatHistory(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(HistoryError, match="newer") as err:
        ChatHistory(path)
    assert str(path) in str(err.value)


# A history file as version 1 wrote it: conversations kept a `params` column (sampling settings nobody read).
VERSION_1 = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL,
    params TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX conversations_by_updated ON conversations(updated);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created REAL NOT NULL,
    finished INTEGER NOT NULL,
    stats TEXT NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
INSERT INTO conversations VALUES (1, 'Old chat', 'Be brief.', '{"temperature": 0.7}', 100.0, 200.0);
INSERT INTO messages VALUES (1, 1, 'user', 'Hello', 150.0, 1, '{}');
INSERT INTO messages VALUES (2, 1, 'assistant', 'Hi there', 160.0, 1, '{"tokens": 3, "finish_reason": "stop"}');
PRAGMA user_version = 1;
"""


def test_a_file_from_version_1_opens_with_its_chats_and_is_brought_up_to_date(tmp_path):
    path = tmp_path / "history.sqlite3"
    raw = sqlite3.connect(path)
    raw.executescript(VERSION_1)
    raw.close()
    with ChatHistory(path) as h:
        [old] = h.list_conversations()
        assert old == Conversation(1, "Old chat", "Be brief.", 100.0, 200.0)
        assert [(m.role, m.content, m.stats) for m in h.messages(1)] == [
            ("user", "Hello", {}),
            ("assistant", "Hi there", {"tokens": 3, "finish_reason": "stop"}),
        ]
        h.add_message(1, "user", "Still here?")  # and it writes on
        new = h.create_conversation("New")
        assert ids(h.list_conversations()) == [new.id, 1] and new.id == 2
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert [row[1] for row in raw.execute("PRAGMA table_info(conversations)")] == [
        "id",
        "title",
        "system_prompt",
        "created",
        "updated",
    ]
    raw.close()
    with ChatHistory(path) as again:  # opened once more: nothing left to bring up to date
        assert [m.content for m in again.messages(1)] == ["Hello", "Hi there", "Still here?"]


def test_an_update_that_fails_halfway_is_refused_in_words_and_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "history.sqlite3"
    raw = sqlite3.connect(path)
    raw.executescript(VERSION_1)
    raw.close()
    # a later version whose second step fails: the first one (dropping params) must not stay done
    monkeypatch.setattr(history_module, "SCHEMA_VERSION", 3)
    monkeypatch.setitem(history_module._MIGRATIONS, 2, "ALTER TABLE conversations DROP COLUMN no_such_column")
    with pytest.raises(HistoryError, match=f"cannot update the chat history {path} from schema version 1 to 3"):
        ChatHistory(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone() == (1,)
    assert "params" in [row[1] for row in raw.execute("PRAGMA table_info(conversations)")]
    raw.close()


def test_a_file_that_is_not_sqlite_is_refused_by_name(tmp_path):
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"this is not a database, just some text that is long enough" * 20)
    with pytest.raises(HistoryError) as err:
        ChatHistory(path)
    assert str(path) in str(err.value)


def test_another_apps_sqlite_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "other.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE notes (body TEXT)")
    raw.close()
    with pytest.raises(HistoryError, match="not a kvstudio chat history") as err:
        ChatHistory(path)
    assert str(path) in str(err.value)
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    raw.close()


def test_new_files_use_wal_and_enforce_foreign_keys(history, tmp_path):
    raw = sqlite3.connect(tmp_path / "history.sqlite3")
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    raw.close()
    assert history._db.execute("PRAGMA foreign_keys").fetchone() == (1,)


def test_default_path_is_under_the_data_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    with ChatHistory() as h:
        assert h.path == tmp_path / "data" / "history.sqlite3"
        h.create_conversation("here")
    assert (tmp_path / "data" / "history.sqlite3").is_file()


def test_created_on_one_thread_used_on_another(history):
    conv = history.create_conversation()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                history.add_message(conv.id, "user", f"{n}-{i}")
        except BaseException as e:  # surfaced below: an exception in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    contents = [m.content for m in history.messages(conv.id)]
    assert sorted(contents) == sorted(f"{n}-{i}" for n in range(3) for i in range(20))
    for n in range(3):  # each thread's own messages stay in the order it wrote them
        assert [c for c in contents if c.startswith(f"{n}-")] == [f"{n}-{i}" for i in range(20)]


def test_title_from_a_first_message():
    assert title_from("How do I page a KV cache?") == "How do I page a KV cache?"
    assert title_from("\n\n  Summarise   this:\nlong text here") == "Summarise this:"
    assert title_from("   \n") == "New chat"
    long = "Explain how paged attention splits the KV cache into fixed-size blocks"
    assert title_from(long) == "Explain how paged attention splits the KV cache…"
    assert (
        title_from("Explain how paged attention splits the KV caches into blocks")
        == "Explain how paged attention splits the KV…"
    )
    assert title_from("x" * 100) == "x" * 47 + "…"
    assert all(len(title_from(t)) <= 48 for t in (long, "x" * 100, "word " * 30))
