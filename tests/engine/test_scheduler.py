"""Scheduling decisions without a model: budgets, decode-first, chunked prefill, admission, preemption."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceGroup, SequenceStatus

_ids = iter(range(10**6))


def seq(n_tokens: int, first: int = 0) -> Sequence:
    return Sequence(next(_ids), "r", 0, list(range(first, first + n_tokens)), SamplingParams(), None)


def group(s: Sequence) -> SequenceGroup:
    return SequenceGroup(s.request_id, None, s.prompt_token_ids, s.params, [s])


def add(sched: Scheduler, *seqs: Sequence) -> list[SequenceGroup]:
    groups = [group(s) for s in seqs]
    for g in groups:
        sched.add(g)
    return groups


def waiting_seqs(sched: Scheduler) -> list[Sequence]:
    return [s for g in sched.waiting for s in g.seqs]


def finish(sched: Scheduler, s: Sequence) -> None:
    sched.free_seq(s)
    sched.remove(next(g for g in sched.running if s in g.seqs))


def step(sched: Scheduler, sample_token: int = 7):
    """One engine step without a model: advance, then append a token to every sequence that reached its end."""
    out = sched.schedule()
    sched.on_step_done(out)
    for s, _ in out.scheduled():
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sample_token)
    return out


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, caching=False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs, budget)


def test_new_requests_join_between_steps_and_decodes_come_first():
    sched = make()
    a = seq(6)
    add(sched, a)
    out = step(sched)
    assert out.prefills == [(a, 6)] and out.decodes == []
    b = seq(5, first=100)
    add(sched, b)
    out = step(sched)
    assert out.decodes == [a] and out.prefills == [(b, 5)]
    out = step(sched)
    assert out.decodes == [a, b] and out.prefills == []


def test_chunked_prefill_splits_a_long_prompt_under_the_token_budget():
    sched = make(budget=8)
    a = seq(20)
    add(sched, a)
    chunks = [step(sched).prefills for _ in range(3)]
    assert chunks == [[(a, 8)], [(a, 8)], [(a, 4)]]
    assert a.num_output_tokens == 1  # only the last chunk samples


def test_budget_is_shared_decodes_first_then_the_remaining_prefill():
    sched = make(budget=8)
    a, b = seq(3), seq(12, first=50)
    add(sched, a)
    step(sched)
    add(sched, b)
    out = step(sched)
    assert out.decodes == [a] and out.prefills == [(b, 7)]


def test_max_num_seqs_caps_the_running_set():
    sched = make(max_num_seqs=2)
    seqs = [seq(3, first=10 * i) for i in range(3)]
    for s in seqs:
        add(sched, s)
    out = step(sched)
    assert [s for s, _ in out.prefills] == seqs[:2]
    assert waiting_seqs(sched) == [seqs[2]]


def test_preemption_recomputes_the_latest_sequence_and_it_resumes_first():
    sched = make(num_blocks=4, block_size=2, budget=64)
    a, b = seq(3), seq(3, first=20)  # each takes 2 blocks after prefill (3 tokens + room for the 4th)
    add(sched, a)
    add(sched, b)
    step(sched)  # both prefilled into 2 blocks each; each sampled a 4th token
    assert sched.block_manager.num_free_blocks == 0
    out = step(sched)  # the 4th tokens still fit in the second blocks
    assert out.decodes == [a, b] and not out.preempted
    out = step(sched)  # a's 5th token needs a third block: b (admitted last) is preempted
    assert [g.seqs for g in out.preempted] == [[b]] and out.decodes == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == [7, 7]  # its output so far is kept and will be recomputed
    assert sched.num_preemptions == 1
    finish(sched, a)
    out = step(sched)
    assert out.prefills == [(b, 5)]  # prompt + its output tokens are recomputed in one chunk


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_alone():
    sched = make(num_blocks=2, block_size=2, budget=64)
    a = seq(3)
    add(sched, a)
    step(sched)
    step(sched)
    out = step(sched)  # the 5th token needs a 3rd block; nothing else to preempt
    assert [g.seqs for g in out.preempted] == [[a]] and out.is_empty


def test_finish_frees_blocks_at_once():
    sched = make()
    a = seq(9)
    add(sched, a)
    step(sched)
    assert sched.block_manager.num_free_blocks == 64 - 3
    finish(sched, a)
    assert sched.block_manager.num_free_blocks == 64 and not sched.has_unfinished()


def test_requests_sharing_a_prefix_wait_one_step_to_take_it_from_the_cache():
    sched = make(block_size=4, caching=True)
    shared = list(range(100, 108))  # two full blocks of a common "system prompt"
    a = Sequence(next(_ids), "a", 0, [*shared, 1, 2, 3], SamplingParams(), None)
    b = Sequence(next(_ids), "b", 0, [*shared, 4, 5], SamplingParams(), None)
    c = Sequence(next(_ids), "c", 0, [7, 7, 7, 7, 7], SamplingParams(), None)
    for s in (a, b, c):
        add(sched, s)
    out = step(sched)
    # b would compute a's blocks again in the same step: it waits (and, first come first served, so does c).
    assert out.prefills == [(a, 11)] and waiting_seqs(sched) == [b, c]
    out = step(sched)
    assert out.decodes == [a] and out.prefills == [(b, 2), (c, 5)]
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    bm = sched.block_manager
    assert (bm.prefix_queries, bm.prefix_hits) == (11 + 10 + 5, 8)


def test_without_prefix_caching_nobody_waits():
    sched = make(block_size=4, caching=False)
    a, b = seq(9), seq(9)
    add(sched, a)
    add(sched, b)
    assert [s for s, _ in step(sched).prefills] == [a, b]
