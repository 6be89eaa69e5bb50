"""JSON reply formats outside the server: a conversation's JSON schema in the chat history (kept, cleared, gone with
the conversation, and a file of the previous schema version brought up to date), and a batch row's
response_format in .jsonl and .csv imports."""

from __future__ import annotations

import json
import sqlite3

import pytest

from app.batch_io import BatchFileError, load_rows, response_format
from app.history import SCHEMA_VERSION, ChatHistory
from engine.structured_output import StructuredOutputsParams, grammar_error

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"]}


# ---- the chat history ---------------------------------------------------------------------------------------------


def test_a_conversation_keeps_its_json_schema(tmp_path):
    path = tmp_path / "history.sqlite3"
    with ChatHistory(path) as h:
        conv = h.create_conversation("Structured")
        other = h.create_conversation("Free")
        assert conv.json_schema == ""
        h.set_json_schema(conv.id, json.dumps(SCHEMA))
        assert json.loads(h.conversation(conv.id).json_schema) == SCHEMA
        assert [(c.title, bool(c.json_schema)) for c in h.list_conversations()] == [
            ("Structured", True),
            ("Free", False),
        ]
        assert [c.title for c in h.list_conversations("struct")] == ["Structured"]  # search still works
    with ChatHistory(path) as h:  # kept across a restart
        assert json.loads(h.conversation(conv.id).json_schema) == SCHEMA
        h.set_json_schema(conv.id, "")
        assert h.conversation(conv.id).json_schema == ""
        h.set_json_schema(other.id, json.dumps(SCHEMA))
        h.delete(other.id)
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT COUNT(*) FROM json_schemas").fetchone() == (0,)  # gone with its conversation
    raw.close()


def test_a_file_of_schema_version_2_gets_the_json_schemas_table(tmp_path):
    path = tmp_path / "history.sqlite3"
    raw = sqlite3.connect(path)
    raw.executescript(
        """
        CREATE TABLE conversations (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL,
            system_prompt TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
        CREATE INDEX conversations_by_updated ON conversations(updated);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')), content TEXT NOT NULL,
            created REAL NOT NULL, finished INTEGER NOT NULL, stats TEXT NOT NULL);
        CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
        INSERT INTO conversations VALUES (1, 'Old chat', '', 100.0, 200.0);
        PRAGMA user_version = 2;
        """
    )
    raw.close()
    with ChatHistory(path) as h:
        assert h.conversation(1).json_schema == ""
        h.set_json_schema(1, json.dumps(SCHEMA))
        assert h.conversation(1).json_schema
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (3,)
    raw.close()


# ---- batch rows ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, want",
    [
        ("json_object", StructuredOutputsParams(json_object=True)),
        ({"type": "json_object"}, StructuredOutputsParams(json_object=True)),
        (SCHEMA, StructuredOutputsParams(json=SCHEMA)),
        (json.dumps(SCHEMA), StructuredOutputsParams(json=SCHEMA)),  # a CSV cell
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}, StructuredOutputsParams(json=SCHEMA)),
    ],
)
def test_response_format_forms(value, want):
    assert response_format(value) == want


@pytest.mark.parametrize("value", ["json", "[1]", 5, {"type": "strung"}, {"type": "json_schema"}])
def test_response_format_refusals(value):
    with pytest.raises(ValueError):
        response_format(value)


def test_grammar_error_says_what_the_engine_would():
    assert grammar_error(StructuredOutputsParams(json=SCHEMA)) is None
    assert "strung" in grammar_error(StructuredOutputsParams(json={"type": "strung"}))
    assert grammar_error(StructuredOutputsParams(regex="(")) is not None


def test_jsonl_and_csv_rows_carry_a_response_format(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"prompt": "A person", "response_format": SCHEMA},
                {"prompt": "Anything", "response_format": "json_object"},
                {"prompt": "Free"},
            )
        )
    )
    rows = load_rows(jsonl)
    assert [r.response_format for r in rows] == [
        StructuredOutputsParams(json=SCHEMA),
        StructuredOutputsParams(json_object=True),
        None,
    ]
    assert rows[0].overrides() == {"structured_outputs": StructuredOutputsParams(json=SCHEMA)}
    csv = tmp_path / "rows.csv"
    cell = json.dumps(SCHEMA).replace('"', '""')
    csv.write_text(f'prompt,response_format,max_tokens\nA person,"{cell}",50\nFree,,\nAny,json_object,\n')
    rows = load_rows(csv)
    assert [r.response_format for r in rows] == [
        StructuredOutputsParams(json=SCHEMA),
        None,
        StructuredOutputsParams(json_object=True),
    ]
    assert rows[0].max_tokens == 50


def test_a_bad_response_format_names_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "bad", "response_format": {"type": "strung"}}\n')
    with pytest.raises(BatchFileError, match=r"rows.jsonl line 2: response_format is not a JSON schema .*strung"):
        load_rows(path)
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,response_format\nfine,json_object\nbad,{not json\n")
    with pytest.raises(BatchFileError, match=r"rows.csv row 3: response_format must be"):
        load_rows(csv)
