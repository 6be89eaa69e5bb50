"""A request in, a SequenceGroup out: tokenize the prompt, check it and the parameters against the model, and
build the sequences (vLLM v1's InputProcessor). Nothing here touches the scheduler or the KV pool."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engine.beam_search import BeamSearchParams, BeamSearchState
from engine.config import ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.logits_processors import bad_words_token_ids
from engine.prompts import PromptType
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceGroup
from engine.structured_output import StructuredOutputManager


class InputProcessor:
    def __init__(
        self,
        tokenizer,
        model_config: ModelConfig,
        max_num_seqs: int,
        eos_token_ids: frozenset[int],
        device: torch.device,
        seq_ids: Iterator[int],
        structured: StructuredOutputManager,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.seq_ids = seq_ids  # shared with the output processor, whose beam forks take ids from it too
        self.structured = structured

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams) -> SequenceGroup:
        """Raises ValueError, naming what is wrong, for a prompt or parameters this model cannot run."""
        text, token_ids = self._tokenize(prompt)
        self._check_prompt(token_ids)
        width = params.beam_width if isinstance(params, BeamSearchParams) else params.n
        if width > self.max_num_seqs:
            what = "beam_width" if isinstance(params, BeamSearchParams) else "n"
            raise ValueError(f"{what}={width} exceeds max_num_seqs={self.max_num_seqs}")
        if isinstance(params, BeamSearchParams):
            return self._beam_group(request_id, text, token_ids, params)
        return self._sampling_group(request_id, text, token_ids, params)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list | tuple) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(
            f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', got {type(prompt).__name__}"
        )

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        max_len = self.model_config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, which leaves no room to generate within "
                f"max_model_len={max_len}"
            )

    def _sampling_group(
        self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams
    ) -> SequenceGroup:
        vocab = self.model_config.vocab_size
        params.check_vocab(vocab)
        bad_words = bad_words_token_ids(params.bad_words, self.tokenizer) if params.bad_words else []
        if any(t >= vocab for word in bad_words for t in word):
            raise ValueError(f"bad_words encode to token ids beyond the model's vocabulary of {vocab}")
        seqs = []
        for i in range(params.n):
            # Sample i draws from seed + i, so it equals what a request with that seed alone would produce.
            gen = None
            if params.seed is not None:
                gen = torch.Generator(self.device).manual_seed(params.seed + i)
            detok = IncrementalDetokenizer(
                self.tokenizer,
                token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=list(params.stop_strings),
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
            seq = Sequence(next(self.seq_ids), request_id, i, token_ids, params, detok, gen)
            seq.bad_words_token_ids = bad_words
            if params.structured_outputs is not None:  # a bad grammar fails here, before anything is queued
                seq.matcher = self.structured.matcher(params.structured_outputs)
            seqs.append(seq)
        return SequenceGroup(request_id, text, token_ids, params, seqs[:1], pending_forks=seqs[1:])

    def _beam_group(
        self, request_id: str, text: str | None, token_ids: list[int], params: BeamSearchParams
    ) -> SequenceGroup:
        # Beams never reach the sampler or the stop checks: the beam search picks their tokens and ends them.
        seq_params = SamplingParams(temperature=0.0, max_tokens=params.max_tokens)
        seq = Sequence(next(self.seq_ids), request_id, 0, token_ids, seq_params, None)
        if params.structured_outputs is not None:
            seq.matcher = self.structured.matcher(params.structured_outputs)
        beam = BeamSearchState(params, self.eos_token_ids)
        return SequenceGroup(request_id, text, token_ids, seq_params, [seq], beam=beam)
