"""Sharing benchmark: KV blocks saved by sharing for parallel sampling and beam search, and prefill time saved
by prefix caching, after the PagedAttention paper's section 6.3-6.4 (its Figures 15 and 17).

Block savings: requests with prompt and output lengths drawn (seeded) to the shape of Alpaca or ShareGPT run
through the engine with prefix caching off, so the only sharing is within a request. After every step, the
blocks in use are compared with what the running sequences' block tables add up to, which is what they would
hold had every sequence its own copy of every block. The saving is 1 - used / unshared, both summed over the
run's steps (a time average, as the paper reports it). Outputs run to their drawn length (EOS ignored).

Prefix caching: requests made of one shared k-shot prefix and their own suffix; the wall time of their prefill
(one new token each) with the prefix cache on and off, in the same run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from engine import BeamSearchParams, LLMEngine, SamplingParams


@dataclass(frozen=True)
class LengthMix:
    """Prompt and output lengths, log-normal around the dataset's means (paper, Figure 11)."""

    name: str
    prompt_mean: float
    output_mean: float
    sigma: float
    paper_parallel: str  # the paper's savings for parallel sampling and beam search on this dataset
    paper_beam: str

    def draw(self, count: int, generator: torch.Generator, max_prompt: int, max_output: int) -> list[tuple[int, int]]:
        def lengths(mean: float, cap: int) -> list[int]:
            # A log-normal with this sigma has mean exp(mu + sigma^2 / 2).
            mu = math.log(mean) - self.sigma**2 / 2
            draws = torch.empty(count).log_normal_(mu, self.sigma, generator=generator)
            return [min(cap, max(4, round(x))) for x in draws.tolist()]

        return list(zip(lengths(self.prompt_mean, max_prompt), lengths(self.output_mean, max_output)))


MIXES = {
    "alpaca": LengthMix("alpaca", 19.31, 58.45, 0.6, "6.1-9.8%", "37.6-55.2%"),
    "sharegpt": LengthMix("sharegpt", 161.31, 337.99, 0.9, "16.2-30.5%", "44.3-66.3%"),
}
WIDTHS = (2, 4, 6)
# The paper's translation prompts (its Figure 16/17): a 1-shot prefix of 80 tokens and a 5-shot one of 341.
SHOT_PREFIXES = (("1-shot", 80), ("5-shot", 341))


@dataclass(frozen=True)
class SharingResult:
    mix: str
    kind: str  # "parallel sampling" or "beam search"
    width: int  # n or beam width
    blocks_used: int  # summed over steps
    blocks_unshared: int  # summed over steps
    peak_used: int
    preemptions: int

    @property
    def saved(self) -> float:
        return 1.0 - self.blocks_used / self.blocks_unshared if self.blocks_unshared else 0.0


@dataclass(frozen=True)
class PrefixResult:
    name: str
    prefix_tokens: int
    seconds_off: float
    seconds_on: float
    computed_off: int  # prompt tokens run through the model
    computed_on: int

    @property
    def saved(self) -> float:
        return 1.0 - self.seconds_on / self.seconds_off


def random_prompt(length: int, vocab: int, generator: torch.Generator) -> list[int]:
    # Ids from the upper half of the vocabulary: ordinary tokens, never BOS/EOS or other specials at the start.
    return torch.randint(vocab // 2, vocab, (length,), generator=generator).tolist()


def measure_sharing(
    engine: LLMEngine,
    mix: LengthMix,
    kind: str,
    width: int,
    num_requests: int,
    seed: int,
    max_prompt: int,
    max_output: int,
) -> SharingResult:
    """Run num_requests requests of the mix with n=width samples or beam_width=width beams."""
    if engine.config.enable_prefix_caching:
        raise ValueError("measure block sharing with prefix caching off: shared prompts would blur it")
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    preempted = engine.scheduler.num_preemptions
    for i, (p_len, o_len) in enumerate(mix.draw(num_requests, gen, max_prompt, max_output)):
        prompt = {"prompt_token_ids": random_prompt(p_len, vocab, gen)}
        if kind == "beam search":
            params = BeamSearchParams(beam_width=width, max_tokens=o_len, ignore_eos=True)
        else:
            params = SamplingParams(n=width, temperature=1.0, seed=seed + i, max_tokens=o_len, ignore_eos=True)
        engine.add_request(f"sharing-{i}", prompt, params)
    used = unshared = peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.get_stats()
        used += stats.num_blocks_used
        unshared += stats.num_blocks_without_sharing
        peak = max(peak, stats.num_blocks_used)
    return SharingResult(mix.name, kind, width, used, unshared, peak, engine.scheduler.num_preemptions - preempted)


def measure_prefix_caching(make_engine, name: str, prefix_tokens: int, num_requests: int, seed: int) -> PrefixResult:
    """Prefill num_requests prompts (shared prefix + 16-48 own tokens) with the prefix cache off, then on.
    make_engine(enable_prefix_caching) builds an engine; each is warmed up first on unrelated prompts."""
    seconds, computed = {}, {}
    for caching in (False, True):
        engine = make_engine(caching)
        gen = torch.Generator().manual_seed(seed)
        vocab = engine.model_config.vocab_size
        prefix = random_prompt(prefix_tokens, vocab, gen)
        prompts = [
            prefix + random_prompt(int(torch.randint(16, 49, (), generator=gen)), vocab, gen)
            for _ in range(num_requests)
        ]
        _prefill(engine, [random_prompt(len(p), vocab, gen) for p in prompts[:4]], "warmup")
        before = engine.get_stats().prompt_tokens_total
        start = time.perf_counter()
        _prefill(engine, prompts, "prefix")
        seconds[caching] = time.perf_counter() - start
        computed[caching] = engine.get_stats().prompt_tokens_total - before
        del engine
    return PrefixResult(name, prefix_tokens, seconds[False], seconds[True], computed[False], computed[True])


def _prefill(engine: LLMEngine, prompts: list[list[int]], tag: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=1)
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    while engine.has_unfinished_requests():
        engine.step()


def sharing_table(results: list[SharingResult]) -> str:
    lines = [
        "KV blocks saved by sharing (time average over the steps; prefix caching off)",
        f"{'workload':<9} {'sharing':<18} {'n/width':>7} {'used':>9} {'unshared':>9} {'saved':>6}  "
        f"{'paper':<11} {'peak':>5} {'preempt':>7}",
    ]
    for r in results:
        mix = MIXES[r.mix]
        paper = mix.paper_beam if r.kind == "beam search" else mix.paper_parallel
        lines.append(
            f"{r.mix:<9} {r.kind:<18} {r.width:>7} {r.blocks_used:>9} {r.blocks_unshared:>9} "
            f"{r.saved:>6.1%}  {paper:<11} {r.peak_used:>5} {r.preemptions:>7}"
        )
    return "\n".join(lines)


def prefix_table(results: list[PrefixResult], num_requests: int) -> str:
    lines = [
        f"Prefill of {num_requests} requests sharing a k-shot prefix: prefix cache off vs on",
        f"{'prefix':<7} {'tokens':>6} {'off':>8} {'on':>8} {'saved':>6} {'computed off':>12} {'computed on':>11}",
    ]
    for r in results:
        lines.append(
            f"{r.name:<7} {r.prefix_tokens:>6} {r.seconds_off:>7.2f}s {r.seconds_on:>7.2f}s "
            f"{r.saved:>6.1%} {r.computed_off:>12} {r.computed_on:>11}"
        )
    return "\n".join(lines)
