"""Batch inputs and outputs: each format parses to the rows it holds, each bad file names its place, and exports
round-trip (CSV quoting included) without leaving a temporary file behind."""

from __future__ import annotations

import csv
import json

import pytest

from app.batch_io import (
    BatchFileError,
    BatchResult,
    BatchRow,
    export_csv,
    export_jsonl,
    export_results,
    load_rows,
    parse_text,
)


def test_pasted_text_gives_one_prompt_per_non_empty_line():
    assert parse_text("  first \n\n\tsecond\r\n   \nthird") == [
        BatchRow("first"),
        BatchRow("second"),
        BatchRow("third"),
    ]
    assert parse_text("\n \n") == []


def test_txt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffHello\r\n\r\nWorld ünïcode\n".encode())  # a BOM and CRLF, as Notepad writes
    assert load_rows(path) == [BatchRow("Hello"), BatchRow("World ünïcode")]


def test_jsonl_file_with_prompts_messages_and_overrides(tmp_path):
    path = tmp_path / "p.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\u2028there"}]
    path.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "prompt": "a, b",
                        "temperature": 0,
                        "top_p": 0.5,
                        "top_k": 4,
                        "max_tokens": 7,
                        "seed": 3,
                        "stop": "\n",
                    }
                ),
                "",
                json.dumps({"messages": chat, "stop": ["x", "y"]}, ensure_ascii=False),
                json.dumps({"prompt": "again", "output": "old", "tokens": 2, "error": None}),  # an export, re-imported
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    rows = load_rows(path)
    assert rows == [
        BatchRow("a, b", temperature=0.0, top_p=0.5, top_k=4, max_tokens=7, seed=3, stop=["\n"]),
        BatchRow(messages=chat, stop=["x", "y"]),
        BatchRow("again"),
    ]
    assert rows[0].overrides() == {
        "temperature": 0.0,
        "top_p": 0.5,
        "top_k": 4,
        "max_tokens": 7,
        "seed": 3,
        "stop": ["\n"],
    }
    assert rows[1].overrides() == {"stop": ["x", "y"]} and rows[1].text == "Hi\u2028there"


def test_csv_file_with_override_columns(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "temperature", "max_tokens", "stop"])
        w.writerow(["plain", "", "", ""])
        w.writerow(['with "quotes", a comma\nand a newline', "0.25", "9", "END"])
    assert load_rows(path) == [
        BatchRow("plain"),
        BatchRow('with "quotes", a comma\nand a newline', temperature=0.25, max_tokens=9, stop=["END"]),
    ]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("p.doc", b"x", "p.doc: unknown file type '.doc'"),
        ("p.txt", b"", "p.txt: the file is empty"),
        ("p.txt", b" \n\n", "p.txt: the file is empty"),
        ("p.csv", b"prompt,seed\n", "p.csv: the file has no prompts"),
        ("p.txt", b"ok\nok\nbad \xff byte\n", "p.txt line 3: not UTF-8 text (byte 0xff)"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b",}\n', "p.jsonl line 2: bad JSON"),
        ("p.jsonl", b'{"prompt": "a"}\n["b"]\n', "p.jsonl line 2: expected a JSON object, got list"),
        ("p.jsonl", b'{"prompt": "a"}\n\n{"temperature": 1}\n', "p.jsonl line 3: missing 'prompt'"),
        ("p.jsonl", b'{"prompt": "  "}\n', "p.jsonl line 1: 'prompt' must be non-empty text"),
        ("p.jsonl", b'{"prompt": "a", "messages": []}\n', "p.jsonl line 1: needs exactly one of"),
        ("p.jsonl", b'{"messages": [{"role": "bot", "content": "x"}]}\n', "p.jsonl line 1: messages[0] must be"),
        ("p.jsonl", b'{"messages": [{"role": "system", "content": "x"}]}\n', "p.jsonl line 1: 'messages' has no user"),
        ("p.jsonl", b'{"prompt": "a", "temperature": "hot"}\n', "p.jsonl line 1: temperature must be a finite number"),
        ("p.jsonl", b'{"prompt": "a", "max_tokens": 2.5}\n', "p.jsonl line 1: max_tokens must be an integer"),
        ("p.jsonl", b'{"prompt": "a", "seed": true}\n', "p.jsonl line 1: seed must be an integer"),
        ("p.jsonl", b'{"prompt": "a", "stop": [""]}\n', "p.jsonl line 1: stop must be a non-empty string"),
        ("p.jsonl", b'{"prompt": "a", "top_p": 1.5}\n', "p.jsonl line 1: top_p must be in (0, 1]"),
        ("p.jsonl", b'{"prompt": "a", "temprature": 1}\n', "p.jsonl line 1: unknown field 'temprature'"),
        ("p.csv", b"text,seed\nhello,1\n", "p.csv row 1: the header needs a 'prompt' column (found 'text', 'seed')"),
        ("p.csv", b'prompt,top_k\n"two\nlines",4\nb,four\n', "p.csv row 3: top_k must be an integer, got 'four'"),
        ("p.csv", b"prompt,max_tokens\na,0\n", "p.csv row 2: max_tokens must be an integer >= 1"),
        ("p.csv", b"prompt\na\n,\n", "p.csv row 3: more cells than the header has columns"),
        ("p.csv", b"prompt,seed\na,1\n,2\n", "p.csv row 3: 'prompt' must be non-empty text"),
        ("p.csv", b"prompt,notes\na,x\n", "p.csv row 2: unknown column 'notes'"),
    ],
)
def test_every_problem_names_the_file_and_its_place(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BatchFileError) as e:
        load_rows(path)
    assert str(e.value).startswith(expected), str(e.value)


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(BatchFileError, match=r"^missing\.txt: cannot read the file"):
        load_rows(tmp_path / "missing.txt")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(BatchFileError, match=r"^dir\.csv: cannot read the file"):
        load_rows(tmp_path / "dir.csv")


RESULTS = [
    BatchResult(
        'a "quoted", comma\nnewline prompt', output="out, with\r\nbreaks", finish_reason="length", tokens=8, seconds=0.5
    ),
    BatchResult(
        "chat",
        output="ünïcode \u2028 sep",
        finish_reason="stop",
        tokens=3,
        seconds=1.25,
        messages=[{"role": "user", "content": "chat"}],
    ),
    BatchResult("failed", error="prompt too long: 600 tokens"),
]


def test_jsonl_export_round_trips(tmp_path):
    path = tmp_path / "out.jsonl"
    export_jsonl(RESULTS, path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    assert records == [
        {
            "prompt": RESULTS[0].prompt,
            "output": "out, with\r\nbreaks",
            "finish_reason": "length",
            "tokens": 8,
            "seconds": 0.5,
            "error": None,
        },
        {
            "messages": [{"role": "user", "content": "chat"}],
            "output": "ünïcode \u2028 sep",
            "finish_reason": "stop",
            "tokens": 3,
            "seconds": 1.25,
            "error": None,
        },
        {
            "prompt": "failed",
            "output": "",
            "finish_reason": None,
            "tokens": 0,
            "seconds": None,
            "error": "prompt too long: 600 tokens",
        },
    ]
    # An export is a valid input: re-importing it re-runs the same prompts (chats as chats).
    assert load_rows(path) == [
        BatchRow(RESULTS[0].prompt),
        BatchRow(messages=[{"role": "user", "content": "chat"}]),
        BatchRow("failed"),
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_csv_export_round_trips_with_quoting(tmp_path):
    path = tmp_path / "out.csv"
    export_csv(RESULTS, path)
    with path.open(newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    assert records == [
        ["prompt", "output", "finish_reason", "tokens", "seconds", "error"],
        [RESULTS[0].prompt, "out, with\r\nbreaks", "length", "8", "0.5", ""],
        ["chat", "ünïcode \u2028 sep", "stop", "3", "1.25", ""],
        ["failed", "", "", "0", "", "prompt too long: 600 tokens"],
    ]
    assert [r.prompt for r in load_rows(path)] == [RESULTS[0].prompt, "chat", "failed"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_export_picks_the_format_by_suffix_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "out.CSV"
    path.write_text("old contents")
    export_results(RESULTS[:1], path)
    assert path.read_text(encoding="utf-8").startswith("prompt,output,")
    with pytest.raises(BatchFileError, match=r"^out\.xlsx: cannot export to '\.xlsx'"):
        export_results(RESULTS, tmp_path / "out.xlsx")


def test_a_failed_export_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old contents")

    bad = BatchResult("p", output=object())  # json.dumps fails halfway through the file
    with pytest.raises(TypeError):
        export_jsonl([RESULTS[0], bad], path)
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    with pytest.raises(BatchFileError, match=r"^out\.csv: cannot write to .*nowhere"):
        export_csv(RESULTS, tmp_path / "nowhere" / "out.csv")
