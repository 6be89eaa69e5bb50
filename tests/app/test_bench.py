from __future__ import annotations

import json
import re

import pytest

from app.bench import throughput as bench
from app.cli import main as cli
from engine.models.loader import open_model


def write_workload(path, lines: list) -> None:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


def test_the_built_in_workload_is_w64():
    requests = bench.load_workload(bench.BUILTIN_WORKLOAD)
    assert len(requests) == 64
    assert {r.max_tokens for r in requests} == {128}
    assert all(r.messages[0]["role"] == "user" for r in requests)


def test_num_prompts_and_max_tokens_narrow_the_workload(tmp_path):
    path = tmp_path / "w.jsonl"
    write_workload(path, [{"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 10 + i} for i in range(3)])
    assert [r.max_tokens for r in bench.load_workload(path)] == [10, 11, 12]
    requests = bench.load_workload(path, num_prompts=2, max_tokens=5)
    assert [(r.messages[0]["content"], r.max_tokens) for r in requests] == [("q0", 5), ("q1", 5)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"w.jsonl:2: not JSON"),
        ({"messages": [], "max_tokens": 4}, r"w.jsonl:2: expected \"messages\""),
        ({"messages": [{"role": "user"}], "max_tokens": 4}, r"w.jsonl:2: expected \"messages\""),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, r"w.jsonl:2: expected \"max_tokens\""),
    ],
)
def test_a_bad_line_is_named(tmp_path, line, message):
    path = tmp_path / "w.jsonl"
    write_workload(path, [{"messages": [{"role": "user", "content": "fine"}], "max_tokens": 4}, line])
    with pytest.raises(ValueError, match=message):
        bench.load_workload(path)


def test_asking_for_more_prompts_than_the_file_has_is_an_error(tmp_path):
    path = tmp_path / "w.jsonl"
    write_workload(path, [{"messages": [{"role": "user", "content": "q"}], "max_tokens": 4}])
    with pytest.raises(ValueError, match=r"asked for 2 prompts but .* has 1"):
        bench.load_workload(path, num_prompts=2)


def test_bench_with_a_missing_file_exits_2(tmp_path, capsys):
    assert cli.main(["bench", "throughput", "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read the workload" in capsys.readouterr().err


def test_throughput_against_hf_generate(monkeypatch, capsys, smollm2_gguf):
    # Record what each run generated, to check that both ran the same greedy decoding on the same weights.
    results: list[bench.BenchResult] = []

    def recording(run):
        def recorded(*args, **kwargs):
            results.append(run(*args, **kwargs))
            return results[-1]

        return recorded

    for name in ("run_engine", "run_hf_generate"):
        monkeypatch.setattr(bench, name, recording(getattr(bench, name)))

    argv = [
        "bench",
        "throughput",
        "--model",
        str(smollm2_gguf),
        "--num-prompts",
        "4",
        "--max-tokens",
        "8",
        "--baseline",
        "hf",
        # The same weights on both sides: kept Q4_1 with int8 activations flips a near-tie within 8 tokens.
        "--quantization",
        "none",
    ]
    assert cli.main(argv) == 0

    out = capsys.readouterr().out
    assert re.search(r"^kvstudio: 32 tokens in [\d.]+ s = [\d.]+ tok/s \(4 requests\)$", out, re.M)
    assert re.search(r"^hf generate \(batches of 16\): 32 tokens in [\d.]+ s = [\d.]+ tok/s", out, re.M)
    assert re.search(r"^kvstudio / hf: [\d.]+x$", out, re.M)
    ours, theirs = results
    assert [len(ids) for ids in ours.token_ids] == [8] * 4
    assert ours.token_ids == theirs.token_ids


def test_throughput_with_a_json_schema_reports_both_rates(monkeypatch, capsys, smollm2_gguf):
    results: list[bench.BenchResult] = []
    real = bench.run_engine
    monkeypatch.setattr(bench, "run_engine", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    argv = ["bench", "throughput", "--model", str(smollm2_gguf), "--num-prompts", "2", "--max-tokens", "40"]
    assert cli.main([*argv, "--json-schema", str(bench.EXAMPLE_SCHEMA)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^kvstudio \+ JSON schema: \d+ tokens in [\d.]+ s = [\d.]+ tok/s \(2 requests\)$", out, re.M)
    assert re.search(r"^constrained / free: [\d.]+%$", out, re.M)
    free, constrained = results
    tokenizer = open_model(str(smollm2_gguf)).tokenizer
    for ids in constrained.token_ids:  # each reply is (a prefix of) the schema's JSON object
        assert tokenizer.decode(ids).lstrip().startswith("{") and len(ids) <= 40
    assert free.token_ids != constrained.token_ids


def test_a_json_schema_file_that_is_not_one_is_refused(tmp_path, capsys):
    bad = tmp_path / "schema.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="does not hold a JSON schema object"):
        bench.load_json_schema(bad)
