"""A conversation to and from a file: Markdown to read or share, JSON to import again (here or on another computer).

The JSON file holds the title, the system prompt, the JSON schema the replies keep to ("" for none) and the
messages in order (role, content, stats). An import reads and checks the whole file first and saves it in one
transaction (ChatHistory.add_conversation): a malformed file is refused in words naming what is wrong, and nothing
is saved. Writes go through batch_io.write_atomically, so a failed export leaves the earlier file (or none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.batch_io import BatchFileError, write_atomically
from app.history import ROLES, ChatHistory, Conversation, HistoryError

FORMAT = "kvstudio-conversation"
VERSION = 1
ROLE_HEADINGS = {"system": "System", "user": "User", "assistant": "Assistant"}


class ConversationFileError(ValueError):
    """A conversation file that cannot be written, read, or is not a conversation this version can import."""


def to_json(history: ChatHistory, conversation_id: int) -> str:
    conv = history.conversation(conversation_id)
    data = {
        "format": FORMAT,
        "version": VERSION,
        "title": conv.title,
        "system_prompt": conv.system_prompt,
        "json_schema": conv.json_schema,
        "messages": [
            {"role": m.role, "content": m.content, "stats": m.stats} for m in history.messages(conversation_id)
        ],
    }
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def to_markdown(history: ChatHistory, conversation_id: int) -> str:
    """The title as the heading, then the system prompt and each message under a heading naming its role."""
    conv = history.conversation(conversation_id)
    parts = [f"# {conv.title}"]
    if conv.system_prompt:
        parts.append(f"## {ROLE_HEADINGS['system']} prompt\n\n{conv.system_prompt}")
    parts += [f"## {ROLE_HEADINGS[m.role]}\n\n{m.content}" for m in history.messages(conversation_id)]
    return "\n\n".join(parts) + "\n"


def export_conversation(history: ChatHistory, conversation_id: int, path: Path) -> None:
    """Write the conversation to `path`: Markdown for a .md file, JSON for any other."""
    path = Path(path)
    text = to_markdown(history, conversation_id) if path.suffix.lower() == ".md" else to_json(history, conversation_id)
    try:
        write_atomically(path, lambda out: out.write(text))
    except BatchFileError as e:
        raise ConversationFileError(str(e)) from e


def import_conversation(history: ChatHistory, path: Path) -> Conversation:
    """Read a JSON file written by export_conversation into a new conversation, all or nothing."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConversationFileError(f"{path.name}: cannot read the file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConversationFileError(f"{path.name}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ConversationFileError(f"{path.name}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    try:
        title, system_prompt, json_schema, messages = _checked(data)
    except ValueError as e:
        raise ConversationFileError(f"{path.name}: {e}") from e
    try:
        return history.add_conversation(title, system_prompt, messages, json_schema)
    except HistoryError as e:
        raise ConversationFileError(f"{path.name}: {e}") from e


def _checked(data: Any) -> tuple[str, str, str, list[tuple[str, str, dict[str, Any]]]]:
    """The parts of a conversation file, or ValueError naming the first thing wrong with it."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f'not a kvstudio conversation (a JSON object with "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise ValueError(f"conversation file version {data.get('version')!r}; this version reads {VERSION}")
    title = _text(data, "title", "title")
    if not title.strip():
        raise ValueError("title is empty")
    system_prompt = _text(data, "system_prompt", "system_prompt", "")
    json_schema = _text(data, "json_schema", "json_schema", "")
    if json_schema:
        try:
            json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not JSON ({e.msg})") from e
    raw = data.get("messages")
    if not isinstance(raw, list):
        raise ValueError("messages must be a list")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object with a role and content")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        stats = m.get("stats", {})
        if not isinstance(stats, dict):
            raise ValueError(f"{where}.stats must be an object")
        messages.append((role, _text(m, "content", f"{where}.content"), stats))
    return title, system_prompt, json_schema, messages


def _text(data: dict, key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if value is None:
        raise ValueError(f"{where} is missing")
    if not isinstance(value, str):
        raise ValueError(f"{where} must be text, got {type(value).__name__}")
    return value
