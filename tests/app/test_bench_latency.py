"""`kvstudio bench latency`: each engine in a child process of its own; the table's medians and ratios."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from app.bench import latency
from app.cli import main as cli


def test_the_kvstudio_child_measures_one_stream(tiny_chat_model):
    chat = latency.chat_text(str(tiny_chat_model))
    assert chat.startswith("<|im_start|>system")  # the model's own template, given to every engine alike
    result = latency.run_child(
        "kvstudio",
        str(tiny_chat_model),
        1,
        16,
        200,
        sys.executable,
        {"max_model_len": 512, "kv_cache_memory": 0.01},
        chat,
    )
    assert result.engine == "kvstudio" and result.long_prompt_tokens == 200
    assert result.short_prompt_tokens > 10 and result.ttft_s > 0 and result.long_ttft_s > 0
    assert result.decode_tok_s > 0 and result.peak_rss_mib >= result.rss_mib > 0


def test_the_code_edit_workload_is_the_prompt_both_engines_get(tiny_chat_model):
    """Both engines decode the same rendered text: the kvstudio child tokenizes the text it is given (its prompt
    length follows the workload), with prompt-lookup speculation on as the workload is meant to be run."""
    code = latency.chat_text(str(tiny_chat_model), "code-edit")
    assert "def summarize(orders, tax_rate):" in code and "running_total" in code
    assert len(code) > len(latency.chat_text(str(tiny_chat_model))) + 400
    options = {
        "max_model_len": 512,
        "kv_cache_memory": 0.01,
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2},
    }
    chat = latency.run_child(
        "kvstudio", str(tiny_chat_model), 1, 8, 20, sys.executable, options, latency.chat_text(str(tiny_chat_model))
    )
    edit = latency.run_child("kvstudio", str(tiny_chat_model), 1, 8, 20, sys.executable, options, code)
    assert edit.short_prompt_tokens > chat.short_prompt_tokens + 100


def test_a_failing_child_says_why(tiny_chat_model):
    with pytest.raises(RuntimeError, match="the kvstudio run failed"):
        latency.run_child("kvstudio", str(tiny_chat_model), 1, 4, 10, sys.executable, {"max_model_len": 10**9})


def result(engine, decode, long_ttft, rss):
    return latency.LatencyResult(engine, 1.0, 40, 0.1, decode, 2000, long_ttft, rss, rss + 10)


def test_medians_and_the_ratio_row():
    runs = [result("kvstudio", d, t, r) for d, t, r in ((10, 4.0, 300), (30, 2.0, 100), (20, 3.0, 200))]
    med = latency.median_result(runs)
    assert (med.decode_tok_s, med.long_ttft_s, med.rss_mib) == (20, 3.0, 200)
    table = latency.format_table([med, result("llama.cpp", 10, 6.0, 100)])
    assert "decode 2.00x, long TTFT 2.00x (>1: kvstudio faster), resident 2.00x" in table


def test_the_baseline_needs_a_gguf_file(tiny_chat_model, capsys):
    assert cli.main(["bench", "latency", "--model", str(tiny_chat_model), "--baseline", "llama.cpp"]) == 2
    assert "--baseline llama.cpp reads GGUF files" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_the_llama_cpp_child_reads_the_same_gguf(smollm2_gguf):
    chat = latency.chat_text(str(smollm2_gguf))
    result = latency.run_child("llama.cpp", str(smollm2_gguf), 1, 8, 100, sys.executable, {}, chat)
    assert result.engine == "llama.cpp" and result.decode_tok_s > 0
