"""`kvstudio bench cancel-storm`: the plan, the report's verdict, and a short storm on the tiny model that must leave
the server answering with nothing running and no KV block held."""

from __future__ import annotations

import dataclasses
import re

import pytest

from app.bench import cancel_storm as cs
from app.cli import main as cli
from app.engine_thread import EngineThread
from app.server.app import ServerConfig
from app.server.run import BackgroundServer, model_info
from engine import LLM

ENGINE_ARGS = {"max_model_len": 512, "kv_cache_memory": 0.02}  # room for a prompt and FIM_MAX_TOKENS


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    """The tiny model behind kvstudio's endpoint: (server, engine thread, model id)."""
    engine = LLM(str(tiny_chat_model), **ENGINE_ARGS).llm_engine
    thread = EngineThread(engine).start()
    info = model_info(engine)
    server = BackgroundServer(thread, info, ServerConfig(port=0)).start()
    yield server, thread, info.name
    server.stop()
    thread.stop()


def test_the_plan_is_the_same_for_a_seed_and_mixes_the_three_kinds():
    shots = cs.plan(300, seed=7)
    assert shots == cs.plan(300, seed=7) and shots != cs.plan(300, seed=8)
    kinds = [s.kind for s in shots]
    assert kinds.count(cs.Kind.DROP) > kinds.count(cs.Kind.DROP_AT_ONCE) > 0 and kinds.count(cs.Kind.CHAT) > 0
    assert all(0 <= s.drop_after <= cs.MAX_DROP_S for s in shots)
    assert all(len(cs.CODE[s.code]) // 4 <= s.cursor < 3 * len(cs.CODE[s.code]) // 4 for s in shots)


def test_the_files_being_edited_come_whole_from_the_resources():
    assert cs.EDITOR_FILES.is_file() and len(cs.CODE) == 3
    for code in cs.CODE:
        compile(code, "<an editor's file>", "exec")  # whole Python files, not cut at a separator or run together
        assert code.endswith("\n") and "###" not in code


def test_a_completion_is_the_code_around_the_cursor():
    shot = next(s for s in cs.plan(50, seed=1) if s.kind is cs.Kind.DROP)
    code = cs.CODE[shot.code]
    fim = cs.body(shot, "m", fim=True)
    assert fim["prompt"] + fim["suffix"] == code and len(fim["prompt"]) == shot.cursor
    assert "suffix" not in cs.body(shot, "m", fim=False)
    assert fim["stream"] and fim["logprobs"] == 0  # logprobs: one entry per token received, to count them


def test_a_short_storm_leaves_the_server_answering_with_nothing_running_and_no_block_held(served):
    server, thread, model = served
    report = cs.run(server, thread, model, requests=20, clients=8, seed=3)
    assert report.problems == []
    # Every request is accounted for: each planned one has an outcome of its kind, finished or dropped.
    assert [o.kind for o in report.outcomes] == [s.kind for s in cs.plan(20, seed=3)]
    assert not any(o.failed for o in report.outcomes)
    assert all(o.finished for o in report.outcomes if o.kind is cs.Kind.CHAT)
    after = report.after
    assert after.num_blocks_used == after.num_running == after.num_waiting == after.num_swapped == 0
    assert report.server.problem is None and report.server.requests == (0, 0)
    # Clients cannot receive more than the engine generated.
    received = sum(o.tokens for o in report.outcomes)
    assert after.generation_tokens_total - report.before.generation_tokens_total >= received > 0
    assert thread.num_unfinished == 0


def test_the_report_fails_on_a_held_block_a_request_left_or_a_server_that_does_not_answer(served):
    server, thread, model = served
    report = cs.run(server, thread, model, requests=4, clients=2, seed=0)
    assert report.passed
    held = dataclasses.replace(report, after=dataclasses.replace(report.after, num_blocks_used=3))
    assert held.problems == ["3 KV blocks were still held"]
    assert not dataclasses.replace(report, after=None, unfinished=2).passed
    assert not dataclasses.replace(report, server=cs.ServerCheck(None, (1, 0))).passed
    down = dataclasses.replace(report, server=cs.ServerCheck("/health answered 503"))
    assert down.problems == ["the server does not answer: /health answered 503"] and "FAIL" in down.table()
    failed = dataclasses.replace(report, outcomes=[cs.Outcome(cs.Kind.CHAT, False, 0, error="HTTP 500")])
    assert not failed.passed


def test_the_command_prints_the_table_and_exits_0(tiny_chat_model, capsys):
    argv = ["bench", "cancel-storm", "--model", str(tiny_chat_model), "--requests", "10", "--clients", "4"]
    argv += ["--max-model-len", "512", "--kv-cache-memory", "0.02", "--seed", "5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {kind: re.search(rf"^{re.escape(kind.value)} +(\d+) +(\d+) +(\d+) +(\d+)", out, re.M) for kind in cs.Kind}
    assert sum(int(row.group(1)) for row in rows.values()) == 10
    assert out.rstrip().endswith("PASS") and "KV blocks held           0 of" in out
