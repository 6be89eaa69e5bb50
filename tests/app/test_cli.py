from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from app.cli import main as cli
from app.cli import options, terminal_chat
from app.cli import parser as cli_parser
from engine import LLM, SamplingParams


class TerminalInput(io.StringIO):
    """Lines typed at a terminal: stdin that says it is a TTY."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def llm(smollm2_gguf) -> LLM:
    return LLM(str(smollm2_gguf))


@pytest.fixture
def loaded(monkeypatch, llm) -> list[str | None]:
    """Commands get the module's engine instead of loading the model again; records the model asked for."""
    asked: list[str | None] = []

    def load_llm(model: str | None, kwargs: dict) -> LLM:
        asked.append(model)
        return llm

    monkeypatch.setattr(options, "load_llm", load_llm)
    return asked


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "bench" in out


def test_bench_help_lists_throughput(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "throughput" in out and "sharing" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--max-tokens", "0", "hi"], "--max-tokens: must be an integer >= 1"),
        (["generate", "--dtype", "float8", "hi"], "--dtype: invalid choice: 'float8'"),
        (["generate", "--kv-cache-memory", "-1", "hi"], "--kv-cache-memory: must be a number > 0"),
        (["generate", "--swap-space", "-1", "hi"], "--swap-space: must be a number >= 0"),
        (["generate", "--preemption-mode", "drop", "hi"], "--preemption-mode: invalid choice: 'drop'"),
        (["bench", "throughput", "--baseline", "vllm"], "--baseline: invalid choice: 'vllm'"),
        (["bench"], "required"),
        (["serve", "--port", "x"], "--port: invalid int value: 'x'"),
        (["serve", "--max-queue", "0"], "--max-queue: must be an integer >= 1"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_values_only_the_engine_can_judge_exit_2_before_loading(monkeypatch, capsys):
    def load_llm(model, kwargs):
        raise AssertionError("the model was loaded for a command that was bound to fail")

    monkeypatch.setattr(options, "load_llm", load_llm)
    assert cli.main(["generate", "--top-p", "2", "hi"]) == 2
    assert "kvstudio: error: top_p must be in (0, 1], got 2.0" in capsys.readouterr().err


def test_engine_options_pass_only_what_was_given():
    args = cli_parser.build_parser().parse_args(
        [
            "generate",
            "--block-size",
            "32",
            "--no-prefix-caching",
            "--kv-cache-memory",
            "0.5",
            "--attention-backend",
            "torch",
            "--swap-space",
            "0",
            "--preemption-mode",
            "recompute",
            "hi",
        ]
    )
    assert options.engine_kwargs(args) == {
        "dtype": "auto",
        "kv_cache_dtype": "auto",
        "enable_prefix_caching": False,
        "quantization": "auto",
        "attention_backend": "torch",
        "block_size": 32,
        "kv_cache_memory": 0.5,
        "swap_space": 0.0,
        "preemption_mode": "recompute",
    }
    args = cli_parser.build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8", "--no-cuda-graphs", "hi"])
    assert options.engine_kwargs(args) == {
        "dtype": "auto",
        "kv_cache_dtype": "fp8",
        "enable_prefix_caching": True,
        "quantization": "auto",
        "attention_backend": "auto",
        "cuda_graphs": False,
    }


def test_generate_through_the_console_script(smollm2_gguf):
    kvstudio = Path(sys.executable).with_name("kvstudio")
    proc = subprocess.run(
        [
            str(kvstudio),
            "generate",
            "--model",
            str(smollm2_gguf),
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "Name the capital city of France.",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_stream_completion_writes_the_text_as_it_grows(llm):
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    text = terminal_chat.stream_completion(llm.llm_engine, "stream-test", "Once upon a time", params, Recorder())
    assert len([w for w in writes if w]) > 1
    assert "".join(writes) == text
    assert text.strip()


def test_generate_reads_the_prompt_from_stdin(monkeypatch, capsys, loaded):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name the capital city of France.\n"))
    assert cli.main(["generate", "--max-tokens", "8", "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_interactive_chat_keeps_the_conversation(monkeypatch, capsys, loaded):
    monkeypatch.setattr(sys, "stdin", TerminalInput("Hi, I am Ada.\nWhat is my name?\n/exit\n"))
    conversations: list[list[dict]] = []
    real_render_chat = engine.render_chat

    def render_chat(tokenizer, messages):
        conversations.append([dict(m) for m in messages])
        return real_render_chat(tokenizer, messages)

    monkeypatch.setattr(engine, "render_chat", render_chat)
    assert cli.main(["generate", "--max-tokens", "6", "--temperature", "0"]) == 0
    first, second = conversations
    assert first == [{"role": "user", "content": "Hi, I am Ada."}]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"].strip() and second[1]["content"] in capsys.readouterr().out


def test_kvstudio_alone_without_a_display_says_why_then_chats(monkeypatch, capsys, loaded):
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert cli.main([]) == 0
    reason = "the desktop window needs a display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    assert f"kvstudio: {reason}; starting a chat in the terminal instead." in capsys.readouterr().err
    assert loaded == [None]  # the default model


def test_speculative_config_is_a_json_object(capsys):
    args = cli_parser.build_parser().parse_args(["generate", "--speculative-config", '{"method": "ngram"}', "hi"])
    assert options.engine_kwargs(args)["speculative_config"] == {"method": "ngram"}
    for bad in ("ngram", "[1]"):
        with pytest.raises(SystemExit):
            cli_parser.build_parser().parse_args(["generate", "--speculative-config", bad, "hi"])
        assert "--speculative-config: must be a JSON object" in capsys.readouterr().err
