"""The block pool down to exact block ids: allocation, freeing order, prefix hits, LRU eviction, hash chains."""

from __future__ import annotations

import pytest

from engine.block_manager import NO_COMPUTED_BLOCKS, BlockManager, ComputedBlocks, chain_hash
from engine.outputs import BlockState
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

_ids = iter(range(10**6))


def seq(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", 0, tokens, SamplingParams(), None)


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    """What the scheduler and runner do for a whole prompt: look up, allocate, compute, register."""
    computed = bm.get_computed_blocks(s)
    assert bm.allocate_slots(s, s.num_tokens - computed.num_tokens, computed)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)


def test_allocation_takes_blocks_in_order_and_grows_one_block_at_a_time():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))
    assert bm.allocate_slots(s, 10)
    assert s.block_table == [0, 1, 2]
    s.num_computed_tokens = 10
    assert bm.blocks_needed(s, 2) == 0  # 12 tokens still fit in 3 blocks
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
    a = seq(list(range(10)))  # blocks 0, 1 full (cached), block 2 partial
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
    b = seq(list(range(12)))  # same prompt: 3 full blocks, but only 2 may come from the cache
    computed = bm.get_computed_blocks(b)
    assert computed == ComputedBlocks((0, 1), 8)
    # The lookup is pure: nothing is taken until the allocation commits it.
    assert b.block_table == [] and bm.blocks[0].ref_count == 1 and bm.num_free_blocks == 7
    assert bm.allocate_slots(b, 4, computed) and b.block_table == [0, 1, 3]
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 2
    bm.record_prefix_lookup(b.num_tokens, computed.num_tokens)
    assert bm.prefix_hits == 8 and bm.prefix_queries == 12


def test_an_allocation_with_prefix_hits_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(9)))  # blocks 0, 1 cached, block 2 partial
    run_prefill(bm, a)
    bm.free(a)
    b = seq([*range(8), *range(100, 108)])  # hits blocks 0 and 1, then needs 2 new blocks for 8 tokens
    computed = bm.get_computed_blocks(b)
    assert computed.block_ids == (0, 1)
    # 4 free blocks, but taking the two hits out of the free queue leaves 2 for the new tokens: 12 tokens fit,
    # 13 do not, and a refusal takes nothing (no references, no table, the hits still cached and free).
    assert bm.blocks_needed(b, 9, computed) == 5
    assert not bm.allocate_slots(b, 9, computed)
    assert b.block_table == [] and bm.num_free_blocks == 4 and bm.blocks[0].ref_count == 0
    assert bm.get_computed_blocks(b) == computed
    assert bm.allocate_slots(b, 8, computed) and b.block_table == [0, 1, 2, 3] and bm.num_free_blocks == 0


def test_hash_chain_never_matches_a_different_prefix():
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Second block equal, first block different: the chain hash differs, so nothing is served.
    other = seq([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert bm.get_computed_blocks(other) == NO_COMPUTED_BLOCKS
    assert chain_hash(None, (1, 2, 3, 4)) != chain_hash(chain_hash(None, (1, 2, 3, 4)), (1, 2, 3, 4))


def test_a_hash_collision_is_caught_by_comparing_tokens(monkeypatch):
    bm = BlockManager(num_blocks=10, block_size=4)
    monkeypatch.setattr("engine.block_manager.chain_hash", lambda prev, tokens: 42)
    run_prefill(bm, seq([1, 2, 3, 4, 0]))
    s = seq([5, 6, 7, 8, 0])  # same (forced) hash, different tokens
    assert bm.get_computed_blocks(s) == NO_COMPUTED_BLOCKS


def test_cached_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq([1, 2, 3]), seq([4, 5, 6])
    run_prefill(bm, a)  # blocks 0 (cached [1,2]) and 1 (partial)
    run_prefill(bm, b)  # blocks 2 (cached [4,5]) and 3 (partial)
    bm.free(b)
    bm.free(a)
    # Free queue: partial blocks first (1, 3), then cached ones in the order they were freed (2, then 0).
    c = seq(list(range(100, 107)))
    assert bm.allocate_slots(c, 7)
    assert c.block_table == [1, 3, 2, 0]
    d = seq([4, 5, 6])
    assert bm.get_computed_blocks(d) == NO_COMPUTED_BLOCKS  # block 2 was evicted: its prefix is gone


def test_a_hit_on_a_freed_cached_block_revives_it():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3])
    run_prefill(bm, a)
    bm.free(a)
    b = seq([1, 2, 7])
    computed = bm.get_computed_blocks(b)
    assert computed.block_ids == (0,)
    assert bm.allocate_slots(b, 1, computed) and b.block_table == [0, 1]
    assert bm.blocks[0].ref_count == 1 and bm.num_free_blocks == 2


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    run_prefill(bm, seq(list(range(12))))
    b = seq(list(range(12)))
    assert bm.get_computed_blocks(b) == NO_COMPUTED_BLOCKS and bm.num_cached_free_blocks == 0


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_blocks_needed_matches_ceil_division(block_size):
    bm = BlockManager(num_blocks=100, block_size=block_size)
    s = seq([0])
    for n in range(1, 50):
        assert bm.blocks_needed(s, n) == -(-n // block_size)


# ---- sharing: forks and copy-on-write ------------------------------------------------------------------------


def forked(bm: BlockManager, parent: Sequence) -> Sequence:
    child = parent.fork(next(_ids), 1)
    bm.fork(parent, child)
    return child


def test_a_fork_shares_every_block_of_its_parent():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(list(range(10)))
    run_prefill(bm, a)
    b = forked(bm, a)
    assert a.block_table == b.block_table == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in (0, 1, 2)] == [2, 2, 2]
    assert bm.num_free_blocks == 5 and bm.num_shared_blocks == 3


def test_the_first_write_into_a_shared_block_copies_it_exactly_once():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(list(range(10)))  # blocks 0, 1 full; block 2 holds 2 of 4 tokens
    run_prefill(bm, a)
    b = forked(bm, a)
    a.token_ids.append(50)
    b.token_ids.append(60)
    assert bm.blocks_needed(a, 1) == 1  # the private copy of block 2
    assert bm.allocate_slots(a, 1)
    assert a.block_table == [0, 1, 3] and bm.take_copies() == [(2, 3)]
    assert bm.blocks[2].ref_count == 1  # b is now block 2's only holder: it writes in place
    assert bm.blocks_needed(b, 1) == 0
    assert bm.allocate_slots(b, 1) and b.block_table == [0, 1, 2] and bm.take_copies() == []
    a.num_computed_tokens = b.num_computed_tokens = 11
    a.token_ids.append(51)
    assert bm.allocate_slots(a, 1) and a.block_table == [0, 1, 3] and bm.take_copies() == []  # its own now


def test_a_fork_on_a_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(list(range(8)))
    run_prefill(bm, a)
    b = forked(bm, a)
    for s, t in ((a, 50), (b, 60)):
        s.token_ids.append(t)
        assert bm.allocate_slots(s, 1)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [0, 1, 3]) and bm.take_copies() == []


def test_freeing_a_fork_leaves_the_other_intact():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(list(range(10)))
    run_prefill(bm, a)
    b = forked(bm, a)
    bm.free(b)
    assert b.block_table == [] and a.block_table == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in (0, 1, 2)] == [1, 1, 1] and bm.num_free_blocks == 5
    a.token_ids.append(50)
    assert bm.allocate_slots(a, 1) and a.block_table == [0, 1, 2] and bm.take_copies() == []
    bm.free(a)
    assert bm.num_free_blocks == 8


def test_the_copy_is_only_made_when_the_pool_has_room_for_it():
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    a = seq(list(range(10)))
    run_prefill(bm, a)
    b = forked(bm, a)
    a.token_ids.append(50)
    assert not bm.allocate_slots(a, 1)
    assert a.block_table == b.block_table == [0, 1, 2] and bm.blocks[2].ref_count == 2 and bm.take_copies() == []


# ---- swapping ------------------------------------------------------------------------------------------------


def test_swap_out_moves_shared_blocks_once_and_swap_in_restores_the_sharing():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False, num_swap_blocks=6)
    a = seq(list(range(10)))
    run_prefill(bm, a)
    b = forked(bm, a)
    b.token_ids.append(60)
    assert bm.allocate_slots(b, 1) and bm.take_copies() == [(2, 3)]
    b.num_computed_tokens = 11
    pairs = bm.swap_out([a, b])
    # Device blocks 0, 1 (shared), 2 (a's), 3 (b's copy) go to swap blocks 0..3, each once.
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert a.block_table == [0, 1, 2] and b.block_table == [0, 1, 3]  # now swap block ids
    assert bm.num_free_blocks == 8 and bm.num_free_swap_blocks == 2
    other = seq(list(range(100, 108)))
    run_prefill(bm, other)  # the pool serves others meanwhile: device blocks 0, 1
    assert other.block_table == [0, 1]
    assert bm.swap_in_blocks_needed([a, b]) == 4 + 2
    pairs = bm.swap_in([a, b])
    # The free queue held 0, 1, 3, 2, 4, ... (freed blocks go in tail first); `other` took 0 and 1.
    assert pairs == [(0, 3), (1, 2), (2, 4), (3, 5)]
    assert a.block_table == [3, 2, 4] and b.block_table == [3, 2, 5]
    assert [bm.blocks[i].ref_count for i in (3, 2, 4, 5)] == [2, 2, 1, 1]
    assert bm.num_free_swap_blocks == 6


def test_swap_out_refuses_without_changes_when_the_swap_space_is_short():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False, num_swap_blocks=2)
    a = seq(list(range(10)))
    run_prefill(bm, a)
    assert bm.swap_out([a]) is None
    assert a.block_table == [0, 1, 2] and bm.num_free_blocks == 5 and bm.num_free_swap_blocks == 2


def test_a_swapped_sequence_freed_gives_its_swap_blocks_back():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False, num_swap_blocks=4)
    a = seq(list(range(10)))
    run_prefill(bm, a)
    b = forked(bm, a)
    bm.swap_out([a, b])
    bm.free_swapped(a)
    assert bm.num_free_swap_blocks == 1  # b still holds all three
    bm.free_swapped(b)
    assert bm.num_free_swap_blocks == 4


def test_block_states_show_free_used_shared_and_cached():
    FREE, USED, SHARED, CACHED = BlockState.FREE, BlockState.USED, BlockState.SHARED, BlockState.CACHED

    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq(list(range(10)))
    run_prefill(bm, a)  # 0, 1 full and registered; 2 partial
    b = forked(bm, a)
    c = seq(list(range(200, 205)))
    run_prefill(bm, c)  # 3 full and registered, 4 partial
    bm.free(c)
    bm.free(b)
    a.token_ids.append(9)
    assert bm.block_states() == bytes([USED, USED, USED, CACHED, FREE, FREE])
    d = forked(bm, a)
    assert bm.block_states() == bytes([SHARED, SHARED, SHARED, CACHED, FREE, FREE])
    assert d.block_table == [0, 1, 2]


def test_reset_prefix_cache_forgets_free_blocks_prefixes_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(list(range(9))), seq(list(range(100, 109)))
    run_prefill(bm, a)
    run_prefill(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.get_computed_blocks(seq(list(range(9)))) == NO_COMPUTED_BLOCKS  # a's blocks were free: forgotten
    assert bm.get_computed_blocks(seq(list(range(100, 109)))).block_ids == (b.block_table[0], b.block_table[1])
    assert bm.num_cached_free_blocks == 0 and bm.num_free_blocks == 8 - len(b.block_table)
