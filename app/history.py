"""Chat history: conversations and their messages in one SQLite file under kvstudio's data folder.

Every write commits at once, so a reply that is streaming when the app dies keeps what was already shown
(marked unfinished). A write SQLite refuses (the disk is full, the file turned read-only) rolls back whole and is
raised as SaveError in words: the file keeps what it held before. One ChatHistory may be created on one thread and
used from another; a lock serialises its calls. A file written by an earlier version is brought up to this one's
schema when it is opened (_MIGRATIONS), in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.library.model_store import data_dir

SCHEMA_VERSION = 3
ROLES = ("system", "user", "assistant")
DEFAULT_TITLE = "New chat"
TITLE_LIMIT = 48

# The JSON schema a conversation's replies keep to, for the conversations that have one (a table of its own, so a
# file without any keeps its conversations table as it was).
_JSON_SCHEMAS = """
CREATE TABLE json_schemas (
    conversation_id INTEGER PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
    schema TEXT NOT NULL
);"""
# AUTOINCREMENT so an id is never handed out twice: a stale id held by the UI (say, of a reply being
# streamed into a message that a regenerate just deleted) fails loudly instead of writing into a newer row.
_SCHEMA = f"""
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX conversations_by_updated ON conversations(updated);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN {ROLES}),
    content TEXT NOT NULL,
    created REAL NOT NULL,
    finished INTEGER NOT NULL,
    stats TEXT NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
{_JSON_SCHEMAS}
PRAGMA user_version = {SCHEMA_VERSION};
"""
# The statements that bring a file from version v to v + 1, by v.
_MIGRATIONS = {
    1: "ALTER TABLE conversations DROP COLUMN params",  # sampling settings per conversation, never read
    2: _JSON_SCHEMAS,
}
# A conversation and its JSON schema ("" for none), from `conversations c LEFT JOIN json_schemas s`.
_CONVERSATION_COLUMNS = "c.id, c.title, c.system_prompt, c.created, c.updated, COALESCE(s.schema, '')"
_CONVERSATIONS = "conversations c LEFT JOIN json_schemas s ON s.conversation_id = c.id"
_MESSAGE_COLUMNS = "id, conversation_id, role, content, created, finished, stats"


class HistoryError(RuntimeError):
    """The history file cannot be used, or an id names nothing in it."""


class NotFoundError(HistoryError, LookupError):
    """A conversation or message id that is not (or no longer) in the history."""


class SaveError(HistoryError):
    """A write failed (the disk is full, the file is read-only) and was rolled back: the file is as it was."""


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    system_prompt: str
    created: float  # seconds since the epoch
    updated: float  # seconds since the epoch; bumped by every write to the conversation or its messages
    json_schema: str = ""  # the JSON schema (its text) the replies keep to; "" for free text


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    role: str  # one of ROLES
    content: str
    created: float  # seconds since the epoch
    finished: bool  # False while a reply streams, and forever if the app died during it
    stats: dict[str, Any]  # e.g. tokens, tokens_per_s, ttft_s, finish_reason


def default_path() -> Path:
    return data_dir() / "history.sqlite3"


def title_from(text: str) -> str:
    """A short conversation title from a first user message: its first non-blank line, cut near TITLE_LIMIT."""
    line = next((" ".join(ln.split()) for ln in text.splitlines() if ln.strip()), "")
    if not line:
        return DEFAULT_TITLE
    if len(line) <= TITLE_LIMIT:
        return line
    cut = line[: TITLE_LIMIT - 1]  # one character left for the ellipsis
    # When the cut splits a word, end on the word before it, unless that throws away more than half the title.
    space = cut.rfind(" ")
    if line[len(cut)] != " " and space > TITLE_LIMIT // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


class ChatHistory:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise HistoryError(f"cannot open chat history {self.path}: {e}") from e
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise HistoryError(f"{self.path} is not a readable chat history database: {e}") from e
        except HistoryError:
            self._db.close()
            raise

    def _open(self) -> None:
        # The first statement is the one that finds out whether the file is a SQLite database at all. Both
        # checks come before any PRAGMA that would change a file that turns out not to be ours.
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} was written by a newer kvstudio (history schema version {version}; this version "
                f"reads up to {SCHEMA_VERSION})"
            )
        # Version 0 is what SQLite reports for any database without one: only an empty file is ours to fill.
        if version == 0 and self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            raise HistoryError(f"{self.path} is a SQLite database but not a kvstudio chat history")
        self._db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL survives an app crash (what streaming relies on) without an fsync per commit;
        # only a power cut can lose the last few commits.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.create_function("casefold", 1, _casefold, deterministic=True)
        if version == 0:
            self._db.executescript(_SCHEMA)
        elif version < SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        """Bring a file of an earlier schema `version` up to SCHEMA_VERSION, all or nothing: a failure (a full disk,
        a read-only file) leaves it as it was and says why."""
        try:
            with self._db:
                self._db.execute("BEGIN")  # sqlite3 opens no transaction before DDL by itself
                for step in range(version, SCHEMA_VERSION):
                    self._db.execute(_MIGRATIONS[step])
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise HistoryError(
                f"cannot update the chat history {self.path} from schema version {version} to {SCHEMA_VERSION}: {e}"
            ) from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ChatHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- conversations -------------------------------------------------------------------------------------

    def create_conversation(self, title: str = DEFAULT_TITLE, system_prompt: str = "") -> Conversation:
        with self._writing():
            now = self._now()
            cur = self._db.execute(
                "INSERT INTO conversations (title, system_prompt, created, updated) VALUES (?, ?, ?, ?)",
                (title, system_prompt, now, now),
            )
            return self._conversation(cur.lastrowid)

    def add_conversation(
        self,
        title: str,
        system_prompt: str,
        messages: list[tuple[str, str, dict[str, Any]]],
        json_schema: str = "",
    ) -> Conversation:
        """A whole conversation with its messages (role, content, stats), in one transaction: an import or a branch
        is saved whole or not at all."""
        for role, _, _ in messages:
            if role not in ROLES:
                raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        with self._writing():
            now = self._now()
            cid = self._db.execute(
                "INSERT INTO conversations (title, system_prompt, created, updated) VALUES (?, ?, ?, ?)",
                (title, system_prompt, now, now),
            ).lastrowid
            if json_schema:
                self._db.execute("INSERT INTO json_schemas (conversation_id, schema) VALUES (?, ?)", (cid, json_schema))
            self._db.executemany(
                "INSERT INTO messages (conversation_id, role, content, created, finished, stats)"
                " VALUES (?, ?, ?, ?, 1, ?)",
                [(cid, role, content, now, json.dumps(stats)) for role, content, stats in messages],
            )
            return self._conversation(cid)

    def branch(self, message_id: int) -> Conversation:
        """A new conversation holding this message's conversation up to and including it (its system prompt and
        JSON schema too), to go on from there another way; the original stays as it is."""
        with self._lock:
            source = self._conversation(self._message(message_id).conversation_id)
        kept = [m for m in self.messages(source.id) if m.id <= message_id]
        return self.add_conversation(
            f"{source.title} (branch)",
            source.system_prompt,
            [(m.role, m.content, m.stats) for m in kept],
            source.json_schema,
        )

    def conversation(self, conversation_id: int) -> Conversation:
        with self._lock:
            return self._conversation(conversation_id)

    def rename(self, conversation_id: int, title: str) -> None:
        self._set(conversation_id, "title", title)

    def set_system_prompt(self, conversation_id: int, text: str) -> None:
        self._set(conversation_id, "system_prompt", text)

    def set_json_schema(self, conversation_id: int, schema: str) -> None:
        """The JSON schema (its text) the conversation's replies keep to from now on; "" for free text again."""
        with self._writing():
            self._conversation(conversation_id)  # raises NotFoundError for an unknown id
            if schema:
                self._db.execute(
                    "INSERT OR REPLACE INTO json_schemas (conversation_id, schema) VALUES (?, ?)",
                    (conversation_id, schema),
                )
            else:
                self._db.execute("DELETE FROM json_schemas WHERE conversation_id = ?", (conversation_id,))
            self._touch(conversation_id, self._now())

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation; its messages go with it (ON DELETE CASCADE)."""
        with self._writing():
            cur = self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            if cur.rowcount == 0:
                raise NotFoundError(f"no conversation with id {conversation_id}")

    def list_conversations(self, search: str | None = None) -> list[Conversation]:
        """Conversations, most recently updated first; `search` keeps those whose title or any message contains
        it, ignoring case, with % and _ taken literally."""
        sql = f"SELECT {_CONVERSATION_COLUMNS} FROM {_CONVERSATIONS}"
        args: tuple[str, ...] = ()
        if search is not None:
            pattern = "%" + _escape_like(_casefold(search)) + "%"
            sql += (
                " WHERE casefold(c.title) LIKE ?1 ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m"
                " WHERE m.conversation_id = c.id AND casefold(m.content) LIKE ?1 ESCAPE '\\')"
            )
            args = (pattern,)
        sql += " ORDER BY c.updated DESC, c.id DESC"
        with self._lock:
            return [_to_conversation(row) for row in self._db.execute(sql, args)]

    # --- messages ------------------------------------------------------------------------------------------

    def add_message(
        self, conversation_id: int, role: str, content: str, finished: bool = True, stats: dict[str, Any] | None = None
    ) -> Message:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        with self._writing():
            self._conversation(conversation_id)  # raises NotFoundError for an unknown id
            now = self._now()
            cur = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, created, finished, stats)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, now, finished, json.dumps(stats or {})),
            )
            self._touch(conversation_id, now)
            return self._message(cur.lastrowid)

    def update_message(
        self, message_id: int, content: str, finished: bool, stats: dict[str, Any] | None = None
    ) -> None:
        """Replace a message's content, its finished flag and (unless `stats` is None) its stats."""
        with self._writing():
            conversation_id = self._message(message_id).conversation_id
            self._db.execute(
                "UPDATE messages SET content = ?, finished = ?, stats = COALESCE(?, stats) WHERE id = ?",
                (content, finished, None if stats is None else json.dumps(stats), message_id),
            )
            self._touch(conversation_id, self._now())

    def save_streaming_text(self, message_id: int, content: str) -> None:
        """Store the text of a reply that is streaming, before it is drawn (the chat page redraws up to 20 times a
        second). One UPDATE, which in WAL mode appends a page to the log without an fsync; the conversation's
        `updated` moves when the reply ends (update_message)."""
        with self._writing():
            cur = self._db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
            if cur.rowcount == 0:
                raise NotFoundError(f"no message with id {message_id}")

    def delete_messages_after(self, message_id: int) -> None:
        """Delete this message and every later one of its conversation (regenerate, edit and resend)."""
        with self._writing():
            conversation_id = self._message(message_id).conversation_id
            self._db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conversation_id, message_id)
            )
            self._touch(conversation_id, self._now())

    def messages(self, conversation_id: int) -> list[Message]:
        """A conversation's messages in the order they were added."""
        with self._lock:
            self._conversation(conversation_id)
            rows = self._db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
            )
            return [_to_message(row) for row in rows]

    # --- internals (callers hold the lock) -----------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction under the lock. SQLite rolls a failed write back whole, so the file keeps what it held;
        the failure is raised as SaveError saying why in words."""
        with self._lock:
            try:
                with self._db:
                    yield
            except sqlite3.DatabaseError as e:
                # SQLite reports a full disk (ENOSPC on the file or its log) as SQLITE_FULL
                full = (getattr(e, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
                reason = "the disk is full" if full else str(e)
                raise SaveError(
                    f"cannot save to the chat history {self.path}: {reason}; it keeps what it held before"
                ) from e

    def _now(self) -> float:
        # Strictly after every stored `updated`: with a coarse clock (about 16 ms on Windows) two writes could
        # otherwise tie, and "most recently updated first" would depend on ids instead of on the writes.
        latest = self._db.execute("SELECT MAX(updated) FROM conversations").fetchone()[0]
        now = time.time()
        return now if latest is None or now > latest else latest + 1e-6

    def _set(self, conversation_id: int, column: str, value: str) -> None:
        with self._writing():
            cur = self._db.execute(
                f"UPDATE conversations SET {column} = ?, updated = ? WHERE id = ?",
                (value, self._now(), conversation_id),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"no conversation with id {conversation_id}")

    def _touch(self, conversation_id: int, now: float) -> None:
        self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))

    def _conversation(self, conversation_id: int) -> Conversation:
        row = self._db.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM {_CONVERSATIONS} WHERE c.id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no conversation with id {conversation_id}")
        return _to_conversation(row)

    def _message(self, message_id: int) -> Message:
        row = self._db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no message with id {message_id}")
        return _to_message(row)


def _to_conversation(row: tuple) -> Conversation:
    return Conversation(*row)


def _to_message(row: tuple) -> Message:
    id_, conversation_id, role, content, created, finished, stats = row
    return Message(id_, conversation_id, role, content, created, bool(finished), json.loads(stats))


def _casefold(text: str | None) -> str | None:
    # SQLite's LIKE ignores case for ASCII only; folding both sides in Python covers "Ä" and "ä" too.
    return None if text is None else text.casefold()


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
