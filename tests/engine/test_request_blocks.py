"""LLMEngine.get_request_blocks: the KV blocks one request holds, each block once, and which of them are shared -
taken from the prefix cache at admission, or held by another sequence too (a fork, another request) - checked
against the block manager's own tables and ref counts at each step."""

from __future__ import annotations

import torch

from engine import RequestBlocks, SamplingParams
from engine.sequence import SequenceStatus

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def token_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    """Random prompts of the given lengths; ids from 2 up, so never BOS (0) or EOS (1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def sampled(seed: int, n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, top_k=50, seed=seed, max_tokens=24, ignore_eos=True)


def held_by(engine, request_id: str) -> tuple[set[int], set[int]]:
    """The device blocks request_id's running sequences hold, and those of them held more than once, read from
    the block tables and ref counts."""
    seqs = [s for s in engine.scheduler.running_seqs() if s.request_id == request_id]
    held = {b for s in seqs for b in s.block_table}
    return held, {b for b in held if engine.block_manager.blocks[b].ref_count > 1}


def test_a_request_alone_holds_its_table_and_shares_nothing(tiny_llama):
    engine = tiny_llama.llm(num_blocks=32, block_size=4, max_model_len=64).llm_engine
    (prompt,) = token_prompts([10], tiny_llama.config.vocab_size, seed=31)
    assert engine.get_request_blocks("alone") is None  # never added
    engine.add_request("alone", {"prompt_token_ids": prompt}, GREEDY)
    assert engine.get_request_blocks("alone") == RequestBlocks(0, 0, 0)  # waiting: nothing allocated yet
    engine.step()  # the prompt's 10 tokens written, the first output token sampled: 3 blocks
    assert engine.get_request_blocks("alone") == RequestBlocks(3, 0, 0)
    for _ in range(3):
        engine.step()  # tokens 11, 12 and 13 written: the 13th takes a fourth block
    assert engine.get_request_blocks("alone") == RequestBlocks(4, 0, 0)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_request_blocks("alone") is None  # finished: its blocks are back in the pool


def test_prefix_hits_are_shared_while_their_first_holder_runs_and_after_it_finished(tiny_llama):
    engine = tiny_llama.llm(num_blocks=32, block_size=4, max_model_len=64).llm_engine
    prefix, tail_a, tail_b, tail_c = token_prompts([8, 3, 3, 3], tiny_llama.config.vocab_size, seed=32)
    engine.add_request("first", {"prompt_token_ids": prefix + tail_a}, sampled(seed=1))
    engine.step()  # computes the prefix's two full blocks and caches them
    engine.add_request("second", {"prompt_token_ids": prefix + tail_b}, sampled(seed=2))
    engine.step()  # takes them from the prefix cache, while "first" still holds them
    held, twice = held_by(engine, "second")
    assert len(held) == 3 and len(twice) == 2
    assert engine.get_request_blocks("second") == RequestBlocks(3, 2, 2)
    assert engine.get_request_blocks("first") == RequestBlocks(3, 2, 0)  # it computed them; now held twice
    engine.abort_request("first")
    engine.abort_request("second")
    engine.add_request("third", {"prompt_token_ids": prefix + tail_c}, sampled(seed=3))
    engine.step()  # nobody holds the prefix now: taken from the cache, held once, still not computed here
    held, twice = held_by(engine, "third")
    assert len(held) == 3 and not twice
    assert engine.get_request_blocks("third") == RequestBlocks(3, 2, 2)


def test_forks_count_each_block_once_and_their_common_blocks_as_shared(tiny_llama):
    engine = tiny_llama.llm(num_blocks=32, block_size=4, max_model_len=64).llm_engine
    (prompt,) = token_prompts([10], tiny_llama.config.vocab_size, seed=33)
    engine.add_request("forked", {"prompt_token_ids": prompt}, sampled(seed=4, n=3))
    engine.step()  # the prompt's 3 blocks, held by all three samples
    assert engine.get_request_blocks("forked") == RequestBlocks(3, 3, 0)
    engine.step()  # two samples copy the partial block; the last one writes into it in place
    held, twice = held_by(engine, "forked")
    owners = {b for b, ids in engine.get_block_map().owners.items() if "forked" in ids}
    assert held == owners and len(held) == 5 and len(twice) == 2
    assert engine.get_request_blocks("forked") == RequestBlocks(5, 2, 0)


def test_without_prefix_caching_the_same_prompt_shares_nothing(tiny_llama):
    llm = tiny_llama.llm(num_blocks=32, block_size=4, max_model_len=64, enable_prefix_caching=False)
    engine = llm.llm_engine
    (prompt,) = token_prompts([10], tiny_llama.config.vocab_size, seed=34)
    engine.add_request("a", {"prompt_token_ids": prompt}, GREEDY)
    engine.step()
    engine.add_request("b", {"prompt_token_ids": prompt}, GREEDY)
    engine.step()
    assert engine.get_request_blocks("b") == RequestBlocks(3, 0, 0)


def test_a_swapped_out_request_holds_no_device_blocks(tiny_llama):
    engine = tiny_llama.llm(num_blocks=16, block_size=4, max_model_len=64, preemption_mode="swap").llm_engine
    prompts = token_prompts([9, 9, 9], tiny_llama.config.vocab_size, seed=35)
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", {"prompt_token_ids": p}, sampled(seed=i, n=3))
    for _ in range(40):
        engine.step()
        if engine.scheduler.swapped:
            break
    group = engine.scheduler.swapped[0]
    assert all(s.status is SequenceStatus.SWAPPED for s in group.seqs)
    assert engine.get_request_blocks(group.request_id) == RequestBlocks(0, 0, 0)
