"""The heartbeat benchmark's figures from tick times, without Qt: gaps, nearest-rank percentiles, the verdict."""

from __future__ import annotations

import pytest

from app.bench.heartbeat import MAX_GAP_MS, heartbeat_report, percentile


def test_percentile_is_the_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert [percentile(values, q) for q in (1, 50, 99, 100)] == [1.0, 50.0, 99.0, 100.0]
    assert percentile([7.0], 50) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_the_report_takes_its_gaps_between_ticks_and_judges_the_largest():
    # 99 gaps of 10 ms and one of 250 ms: the stall shows in the max (and the p99 of 100 gaps is still a 10 ms one)
    ticks = [i * 0.010 for i in range(100)]
    ticks.append(ticks[-1] + 0.250)
    report = heartbeat_report(ticks, 0.010, prompts=4, done=3, tokens=120, seconds=2.0)
    assert report.ticks == 101 and report.interval_ms == 10.0
    assert report.max_gap_ms == pytest.approx(250.0)
    assert report.p99_gap_ms == pytest.approx(10.0) and report.p50_gap_ms == pytest.approx(10.0)
    assert report.tokens_per_s == 60.0 and not report.smooth
    assert "3 of 4 prompts done, 120 tokens in 2.00 s = 60.0 tok/s" in report.summary()
    assert "max 250.0 ms (too long" in report.summary()

    smooth = heartbeat_report([0.0, 0.010, 0.010 + (MAX_GAP_MS - 1) / 1000], 0.010, 1, 1, 5, 1.0)
    assert smooth.smooth and smooth.max_gap_ms == pytest.approx(MAX_GAP_MS - 1) and "(ok)" in smooth.summary()


def test_too_few_ticks_or_no_time_are_refused_in_words():
    with pytest.raises(ValueError, match="ticked 1 time"):
        heartbeat_report([0.0], 0.010, 1, 1, 1, 1.0)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        heartbeat_report([0.0, 0.01], 0.010, 1, 1, 1, 0.0)
