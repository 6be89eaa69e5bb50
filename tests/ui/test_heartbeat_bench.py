"""`kvstudio bench ui-heartbeat` on the tiny model with a few prompts: the window runs them through the Batch page
with the Monitor shown, and the report's figures hang together. How long the gaps are is the benchmark's to say
(it is a measurement of this machine), never the test's: only the figures' consistency is checked."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from app.bench import throughput
from app.cli import main as cli
from ui import heartbeat_bench, launcher

pytestmark = pytest.mark.timeout(600)


def test_the_benchmark_runs_the_prompts_through_the_window_and_reports_consistent_figures(
    qtbot, tiny_chat_model, load_options
):
    requests = throughput.load_workload(throughput.BUILTIN_WORKLOAD, num_prompts=3, max_tokens=4)
    report = heartbeat_bench.measure(str(tiny_chat_model), load_options, requests)
    assert report.prompts == 3 and report.done == 3 and 3 <= report.tokens <= 12
    assert report.interval_ms == heartbeat_bench.HEARTBEAT_MS and report.ticks >= 2
    assert report.max_gap_ms >= report.p99_gap_ms >= report.p50_gap_ms > 0
    assert report.seconds > 0 and report.tokens_per_s == report.tokens / report.seconds


def test_the_command_prints_the_report_and_fails_exactly_when_the_largest_gap_is_too_long(
    qtbot, capsys, tiny_chat_model
):
    argv = ["bench", "ui-heartbeat", "--model", str(tiny_chat_model), "--num-prompts", "2", "--max-tokens", "3"]
    status = launcher.main([*argv, "--max-model-len", "512", "--kv-cache-memory", "0.02"])
    out = capsys.readouterr().out
    assert re.search(r"batch: 2 of 2 prompts done, \d+ tokens in [\d.]+ s = [\d.]+ tok/s", out)
    gaps = re.search(r"heartbeat every 10 ms, \d+ ticks: gap p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms", out)
    assert gaps is not None
    p50, p99, largest = map(float, gaps.groups())
    assert largest >= p99 >= p50 > 0
    assert status == (0 if largest < 100 else 1)


def test_the_command_line_alone_refuses_it_and_never_imports_qt():
    """app/ never imports Qt: parsing the subcommand there loads no PySide6, and without the launcher's handler
    the benchmark is refused in words."""
    code = (
        "import sys; from app.cli import main; "
        "main.build_parser().parse_args(['bench', 'ui-heartbeat', '--num-prompts', '2']); "
        "print('PySide6' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert cli.main(["bench", "ui-heartbeat"]) == 2
