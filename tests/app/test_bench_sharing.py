"""`kvstudio bench sharing` on SmolLM2 with small, capped length mixes: the table's rows, the paper's figures
beside them, and savings that follow from how the blocks are shared."""

from __future__ import annotations

import re

import pytest
import torch

from app.bench import sharing as bs
from app.cli import main as cli
from engine import LLM


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    return LLM(str(smollm2_gguf), max_model_len=256, kv_cache_memory=0.25, enable_prefix_caching=False).llm_engine


def test_lengths_are_seeded_capped_and_shaped_like_the_dataset():
    a = bs.MIXES["sharegpt"].draw(2000, torch.Generator().manual_seed(1), 4096, 4096)
    b = bs.MIXES["sharegpt"].draw(2000, torch.Generator().manual_seed(1), 4096, 4096)
    assert a == b
    prompts, outputs = zip(*a)
    assert sum(prompts) / len(prompts) == pytest.approx(161.31, rel=0.1)
    assert sum(outputs) / len(outputs) == pytest.approx(337.99, rel=0.1)
    capped = bs.MIXES["sharegpt"].draw(200, torch.Generator().manual_seed(1), 64, 32)
    assert max(p for p, _ in capped) == 64 and max(o for _, o in capped) == 32 and min(min(x) for x in capped) >= 4


def test_one_sample_per_request_shares_nothing_and_more_share_more(engine):
    mix = bs.MIXES["alpaca"]
    one = bs.measure_sharing(engine, mix, "parallel sampling", 1, 3, 0, 48, 12)
    assert one.blocks_used == one.blocks_unshared > 0 and one.saved == 0.0
    four = bs.measure_sharing(engine, mix, "parallel sampling", 4, 3, 0, 48, 12)
    beams = bs.measure_sharing(engine, mix, "beam search", 4, 3, 0, 48, 12)
    # The same prompts: with 4 samples the prompt blocks are held once instead of four times.
    assert four.blocks_unshared == 4 * one.blocks_unshared
    assert 0 < four.saved < beams.saved
    assert engine.get_stats().num_blocks_used == 0


def test_block_sharing_is_measured_with_prefix_caching_off(smollm2_gguf):
    cached = LLM(str(smollm2_gguf), max_model_len=128, kv_cache_memory=0.05).llm_engine
    with pytest.raises(ValueError, match="prefix caching off"):
        bs.measure_sharing(cached, bs.MIXES["alpaca"], "beam search", 2, 1, 0, 16, 4)


def test_the_command_prints_both_tables(smollm2_gguf, capsys):
    argv = [
        "bench",
        "sharing",
        "--model",
        str(smollm2_gguf),
        "--workload",
        "alpaca",
        "--num-requests",
        "2",
        "--max-prompt-len",
        "24",
        "--max-output-len",
        "6",
        "--prefix-requests",
        "2",
        "--max-model-len",
        "512",
        "--kv-cache-memory",
        "0.25",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = re.findall(
        r"^alpaca +(parallel sampling|beam search) +(\d) .* ([\d.]+)% +(6\.1-9\.8%|37\.6-55\.2%) ", out, re.M
    )
    assert [(kind, int(w)) for kind, w, _, _ in rows] == [
        ("parallel sampling", 2),
        ("parallel sampling", 4),
        ("parallel sampling", 6),
        ("beam search", 2),
        ("beam search", 4),
        ("beam search", 6),
    ]
    assert all(float(saved) > 0 for _, _, saved, _ in rows)
    # Two short prefills are too quick for their times to say anything here: the saving may even come out negative.
    prefix = re.findall(r"^(\d-shot) +(\d+) .* (-?[\d.]+)% +(\d+) +(\d+)$", out, re.M)
    assert [name for name, *_ in prefix] == ["1-shot", "5-shot"]
    for _, tokens, _, computed_off, computed_on in prefix:
        # The second request takes the prefix's full 16-token blocks from the cache instead of computing them.
        assert int(computed_off) - int(computed_on) == int(tokens) // 16 * 16
