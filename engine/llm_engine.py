"""LLMEngine: add_request / step / abort on one thread, synchronously.

It wires the parts together and does no more: the input processor turns a request into a SequenceGroup, the
scheduler picks each step's work, the model runner executes it, the sampler draws tokens, the output processor
applies them and reports RequestOutputs, and the stats collector keeps the figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from engine.beam_search import BeamSearchParams
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.draft_model import DraftModelProposer
from engine.input_processor import InputProcessor
from engine.model_builder import build_model
from engine.model_runner import ModelRunner, StepResult
from engine.output_processor import OutputProcessor, SamplingPlan, StepSamples
from engine.outputs import BlockMap, EngineStats, RequestBlocks, RequestOutput
from engine.prompts import PromptType
from engine.rejection_sampler import verify
from engine.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import SequenceGroup, SequenceStatus
from engine.spec_decode import NgramProposer, Proposer, can_speculate
from engine.stats import StatsCollector
from engine.structured_output import StructuredOutputManager

# Tokens per step when max_num_batched_tokens is not given: large enough that prefill matmuls are efficient.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# Decode batch sizes beyond this run eagerly: more graphs would cost start-up time and memory for little gain.
MAX_GRAPH_BATCH = 256


class LLMEngine:
    def __init__(self, config: EngineConfig, *, on_load_stage: Callable[[str], None] | None = None) -> None:
        """on_load_stage, when given, is called on this thread with a short sentence as each stage of the load
        begins (a window shows them: a first load can take a minute while kernels compile)."""
        stage = on_load_stage or (lambda _: None)
        self.config = config
        device = self.device = config.torch_device
        built = build_model(config.model, config, stage)
        self.tokenizer = built.source.tokenizer
        self.eos_token_ids = frozenset(built.source.eos_token_ids)
        self.model_config = built.model_config
        max_model_len = self.model_config.max_model_len
        self.weight_bytes = built.weight_bytes
        bs = config.block_size

        self.max_num_batched_tokens = config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        # Before the target's KV pool: on a GPU that pool takes the memory the draft leaves.
        self.proposer = self._proposer(config, stage)
        self.runner = ModelRunner(built.model, built.backend, self.model_config, bs, device)
        stage("Allocating the KV pool")
        size = self.runner.init_kv_cache(config, self.max_num_batched_tokens)
        if device.type == "cuda" and config.cuda_graphs and built.backend.fused_kernels:
            stage("Warming up: capturing the decode step's CUDA graphs")
            self.runner.capture_cuda_graphs(min(config.max_num_seqs, MAX_GRAPH_BATCH))
        if device.type == "cpu" and config.cpu_fused_decode:
            stage("Warming up: building the fused decode step")
            self.runner.build_fused_decode()
        self.block_manager = BlockManager(size.num_blocks, bs, config.enable_prefix_caching, size.num_swap_blocks)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, self.max_num_batched_tokens, config.preemption_mode
        )
        self.sampler = Sampler(torch.Generator(device).manual_seed(config.seed))
        self._requests: dict[str, SequenceGroup] = {}
        seq_ids = itertools.count()
        self.structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size)
        self.input_processor = InputProcessor(
            self.tokenizer,
            self.model_config,
            config.max_num_seqs,
            self.eos_token_ids,
            device,
            seq_ids,
            self.structured,
        )
        self.output_processor = OutputProcessor(
            self._requests,
            self.scheduler,
            self.block_manager,
            self.tokenizer,
            self.eos_token_ids,
            max_model_len,
            seq_ids,
        )
        self.stats = StatsCollector(self.block_manager, self.scheduler)

    def _proposer(self, config: EngineConfig, stage: Callable[[str], None]) -> Proposer | None:
        spec = config.speculative
        if spec is None:
            return None
        if spec.method == "ngram":
            return NgramProposer(spec, self.model_config.max_model_len)
        stage(f"Loading the draft model {spec.model}")
        try:
            draft = build_model(spec.model, config, lambda _: None, max_model_len=self.model_config.max_model_len)
        except ValueError as error:
            raise ValueError(f"the draft model: {error}") from error
        return DraftModelProposer(
            draft, config, spec.num_speculative_tokens, self.model_config.vocab_size, self.max_num_batched_tokens
        )

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams | None = None
    ) -> None:
        """Queue a request. SamplingParams(n=N) gives N samples sharing the prompt's blocks; BeamSearchParams runs
        a beam search whose beams share blocks, and whose output lists the beams best first."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        group = self.input_processor.process(request_id, prompt, params or SamplingParams())
        self._requests[request_id] = group
        self.scheduler.add(group)

    def abort_request(self, request_id: str) -> None:
        group = self._requests.pop(request_id, None)
        if group is None:
            return
        for seq in group.seqs + group.pending_forks:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.free_seq(seq)
        group.pending_forks = []
        if group.beam is not None:
            group.beam.done = True
        self.scheduler.remove(group)

    def reset_prefix_cache(self) -> None:
        """Forget the cached prefixes of the blocks no request holds (vLLM's reset_prefix_cache): what runs next
        computes its prompts afresh, e.g. a benchmark's second run."""
        self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def has_request(self, request_id: str) -> bool:
        """Whether request_id is queued or running (not finished, aborted, or aborted by a failed step)."""
        return request_id in self._requests

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> sample -> process: one forward pass over the scheduled tokens; returns the
        outputs of the requests that moved."""
        if self.proposer is not None:
            self._propose_drafts()
        out = self.scheduler.schedule()
        if out.is_empty and not (out.swap_out or out.swap_in):
            # Capacity was checked at start-up (one max_model_len sequence always fits), so an empty step with
            # work pending and no preemption to recover from means a broken invariant, not a busy pool.
            if self.scheduler.has_unfinished() and not out.preempted:
                raise RuntimeError("the scheduler could not schedule any pending request")
            return []
        try:
            result = self.runner.execute(out)
            self.scheduler.on_step_done(out)
            plan = self.output_processor.plan_sampling(result.sample_seqs)
            samples = self._sample(result, plan)
            outputs = self.output_processor.process(result.prompt_logits, plan, samples)
        except Exception:
            self._abort_scheduled(out)
            raise
        for output in outputs:
            if output.finished:
                self.scheduler.remove(self._requests.pop(output.request_id))
        self.stats.record_step(out.num_prefill_tokens, samples.num_tokens)
        if out.spec_decodes:
            self.stats.record_speculation(
                sum(n - 1 for _, n in out.spec_decodes), sum(v.num_accepted for _, v in samples.verified)
            )
        return outputs

    def _propose_drafts(self) -> None:
        """Draft tokens for every running sequence about to decode one token that may speculate."""
        running, eligible = [], []
        for group in self.scheduler.running:
            for seq in group.seqs:
                seq.spec_token_ids = []
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                running.append(seq)
                if seq.num_uncomputed_tokens == 1 and group.beam is None and can_speculate(seq):
                    eligible.append(seq)
        for seq, drafts in zip(eligible, self.proposer.propose(eligible, running)):
            seq.spec_token_ids = drafts

    def _sample(self, result: StepResult, plan: SamplingPlan) -> StepSamples:
        """result.logits: [len(result.sample_seqs), vocab] float32 -> tokens for the plan's samples and log-softmax
        rows for its beams; the speculative decodes' drafts verified."""
        logits = result.logits
        samples = StepSamples()
        if plan.samples:
            seqs = [seq for seq, _ in plan.samples]
            batch = SamplingBatch.from_sequences(
                seqs, list(self.eos_token_ids), self.model_config.vocab_size, self.device, self.structured
            )
            samples.sampled = self.sampler(logits[[row for _, row in plan.samples]], batch)
        if plan.beams:
            beam_logits = logits[[row for _, row in plan.beams]]
            constrained = [(i, seq.matcher) for i, (seq, _) in enumerate(plan.beams) if seq.matcher is not None]
            if constrained:  # beams kept to a grammar rank only the continuations it allows
                self.structured.mask(beam_logits, constrained)
            samples.beam_logprobs = torch.log_softmax(beam_logits, dim=-1)
        if result.spec_logits:
            verified = verify(
                self.sampler, result.spec_logits, list(self.eos_token_ids), self.model_config.vocab_size, self.device
            )
            samples.verified = [(seq, v) for (seq, _), v in zip(result.spec_logits, verified)]
        return samples

    def _abort_scheduled(self, out: SchedulerOutput) -> None:
        """A failed step: retrying the same batch would fail the same way, so its requests are aborted (their
        blocks freed) and the engine stays usable for the others."""
        for rid in {seq.request_id for seq, _ in out.scheduled()}:
            self.abort_request(rid)

    # ---- stats --------------------------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        return self.stats.snapshot()

    def get_request_blocks(self, request_id: str) -> RequestBlocks | None:
        """The KV blocks request_id holds now and how many of them are shared (RequestBlocks); None once it has
        finished or was aborted (its blocks are back in the pool), or for an id never added."""
        group = self._requests.get(request_id)
        if group is None:
            return None
        return self.block_manager.request_blocks(group.seqs)

    def get_block_map(self) -> BlockMap:
        """Each KV block's state, holding requests and prefix hash, for the monitor's block map."""
        return self.stats.block_map()
