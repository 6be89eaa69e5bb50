"""The offline API: LLM(model).generate(prompts, params) / .chat(conversations, params) / .beam_search(prompts,
params), vLLM names."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from tqdm.auto import tqdm

from engine.beam_search import BeamSearchParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.prompts import PromptType, render_chat
from engine.sampling_params import SamplingParams


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated tokens (vLLM's layout)
    text: str  # the generated text
    cum_logprob: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first (length-penalised score)


class LLM:
    def __init__(self, model: str, *, on_load_stage: Callable[[str], None] | None = None, **engine_options) -> None:
        """on_load_stage: see LLMEngine; engine_options are EngineConfig's fields."""
        self.llm_engine = LLMEngine(EngineConfig(model=model, **engine_options), on_load_stage=on_load_stage)
        self._ids = itertools.count()

    def reset_prefix_cache(self) -> None:
        self.llm_engine.reset_prefix_cache()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs come back in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = [
            render_chat(tok, conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(
        self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt; its beams share KV blocks in the engine. Returns beam_width beams per
        prompt, best first."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        outputs = self._run(prompts, [params] * len(prompts), use_tqdm)
        return [
            BeamSearchOutput(
                [
                    BeamSearchSequence(
                        out.prompt_token_ids + c.token_ids, c.text, c.cumulative_logprob, c.finish_reason
                    )
                    for c in out.outputs
                ]
            )
            for out in outputs
        ]

    def _run(
        self, prompts: list[PromptType], params: list[SamplingParams | BeamSearchParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                engine.add_request(rid, prompt, p)
        except ValueError:
            for rid in ids:  # all or nothing: a bad prompt leaves no half-submitted batch behind
                engine.abort_request(rid)
            raise
        finished: dict[str, RequestOutput] = {}
        pending = set(ids)
        try:
            with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
                while pending:
                    for out in engine.step():
                        # Only this call's requests count: another caller's may share the engine.
                        if out.finished and out.request_id in pending:
                            pending.discard(out.request_id)
                            finished[out.request_id] = out
                            bar.update(1)
        except BaseException:  # an error or Ctrl-C: leave no request of this call running in the engine
            for rid in pending:
                engine.abort_request(rid)
            raise
        return [finished[rid] for rid in ids]
