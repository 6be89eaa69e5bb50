"""`kvstudio bench serve`: percentiles, and the command against kvstudio's own endpoint on a tiny model."""

from __future__ import annotations

import re

from app.bench import serve as bench_serve
from app.cli import main as cli


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert bench_serve.percentiles(values) == [50.0, 90.0, 99.0]
    assert bench_serve.percentiles([3.0]) == [3.0, 3.0, 3.0]


def test_the_command_reports_each_concurrency_level(tiny_chat_model, capsys):
    argv = [
        "bench",
        "serve",
        "--model",
        str(tiny_chat_model),
        "--num-prompts",
        "6",
        "--max-tokens",
        "8",
        "--concurrency",
        "1",
        "3",
        "--max-model-len",
        "512",
        "--kv-cache-memory",
        "0.02",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^ +(\d+) +(\d+) +([\d/]+) +([\d./]+) +([\d.]+)$", out, re.M)
    assert [(int(c), int(n)) for c, n, *_ in rows] == [(1, 6), (3, 6)]
    for *_, ttft, _itl, tok_s in rows:
        p50, p90, p99 = map(float, ttft.split("/"))
        assert 0 < p50 <= p90 <= p99
        assert float(tok_s) > 0


def test_a_workload_with_mixed_lengths_needs_max_tokens(tmp_path, capsys):
    path = tmp_path / "w.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "a"}], "max_tokens": 4}\n'
        '{"messages": [{"role": "user", "content": "b"}], "max_tokens": 5}\n'
    )
    assert cli.main(["bench", "serve", "--prompts", str(path), "--url", "http://127.0.0.1:9/v1"]) == 2
    assert "give --max-tokens" in capsys.readouterr().err
