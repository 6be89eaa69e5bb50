"""The block pool down to exact block ids: allocation, freeing order, prefix hits, LRU eviction, hash chains."""
from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, chain_hash
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

_ids = iter(range(10**6))


def seq(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", 0, tokens, SamplingParams(), None)


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    """What the scheduler and runner do for a whole prompt: match, allocate, compute, register."""
    bm.match_prefix(s)
    assert bm.allocate_slots(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)


def test_allocation_takes_blocks_in_order_and_grows_one_block_at_a_time():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))
    assert bm.allocate_slots(s, 10)
    assert s.block_table == [0, 1, 2]
    s.num_computed_tokens = 10
    assert bm.blocks_needed(s, 2) == 0      # 12 tokens still fit in 3 blocks
    assert bm.blocks_needed(s, 3) == 1
    assert bm.allocate_slots(s, 3) and s.block_table == [0, 1, 2, 3]
    assert bm.num_free_blocks == 4


def test_allocation_fails_without_side_effects_when_the_pool_is_short():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(list(range(9)))
    assert not bm.allocate_slots(s, 9)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_free_returns_every_block_and_uncached_ones_are_reused_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq(list(range(10)))          # blocks 0, 1 full (cached), block 2 partial
    run_prefill(bm, a)
    assert a.block_table == [0, 1, 2]
    bm.free(a)
    assert bm.num_free_blocks == 6 and a.block_table == []
    b = seq([100 + i for i in range(4)])
    assert bm.allocate_slots(b, 4)
    # The partial block 2 holds nothing reusable: it goes out before any block that still caches a prefix.
    assert b.block_table == [2]


def test_prefix_hit_shares_blocks_and_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(list(range(12)))
    run_prefill(bm, a)
    b = seq(list(range(12)))          # same prompt: 3 full blocks, but only 2 may come from the cache
    bm.match_prefix(b)
    assert b.block_table == [0, 1] and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 2
    assert bm.allocate_slots(b, 4) and b.block_table == [0, 1, 3]
    bm.count_lookup(b)
    assert bm.prefix_hits == 8 and bm.prefix_queries == 12


def test_hash_chain_never_matches_a_different_prefix():
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Second block equal, first block different: the chain hash differs, so nothing is served.
    other = seq([9, 9, 9, 9, 5, 6, 7, 8, 9])
    bm.match_prefix(other)
    assert other.block_table == [] and other.num_computed_tokens == 0
    assert chain_hash(None, (1, 2, 3, 4)) != chain_hash(chain_hash(None, (1, 2, 3, 4)), (1, 2, 3, 4))


def test_a_hash_collision_is_caught_by_comparing_tokens(monkeypatch):
    bm = BlockManager(num_blocks=10, block_size=4)
    monkeypatch.setattr("engine.block_manager.chain_hash", lambda prev, tokens: 42)
    run_prefill(bm, seq([1, 2, 3, 4, 0]))
    s = seq([5, 6, 7, 8, 0])            # same (forced) hash, different tokens
    bm.match_prefix(s)
    assert s.block_table == [] and s.num_computed_tokens == 0


def test_cached_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq([1, 2, 3]), seq([4, 5, 6])
    run_prefill(bm, a)                  # blocks 0 (cached [1,2]) and 1 (partial)
    run_prefill(bm, b)                  # blocks 2 (cached [4,5]) and 3 (partial)
    bm.free(b)
    bm.free(a)
    # Free queue: partial blocks first (1, 3), then cached ones in the order they were freed (2, then 0).
    c = seq(list(range(100, 107)))
    assert bm.allocate_slots(c, 7)
    assert c.block_table == [1, 3, 2, 0]
    d = seq([4, 5, 6])
    bm.match_prefix(d)                  # block 2 was evicted: its prefix is gone
    assert d.num_computed_tokens == 0


def test_a_hit_on_a_freed_cached_block_revives_it():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3])
    run_prefill(bm, a)
    bm.free(a)
    b = seq([1, 2, 7])
    bm.match_prefix(b)
    assert b.block_table == [0] and bm.blocks[0].ref_count == 1
    assert bm.num_free_blocks == 3
    assert bm.allocate_slots(b, 1) and b.block_table == [0, 1]


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    run_prefill(bm, seq(list(range(12))))
    b = seq(list(range(12)))
    bm.match_prefix(b)
    assert b.block_table == [] and bm.num_cached_free_blocks == 0


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_blocks_needed_matches_ceil_division(block_size):
    bm = BlockManager(num_blocks=100, block_size=block_size)
    s = seq([0])
    for n in range(1, 50):
        assert bm.blocks_needed(s, n) == -(-n // block_size)
