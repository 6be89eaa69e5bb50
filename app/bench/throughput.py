"""Throughput benchmark: a workload of chat requests through kvstudio's engine, and through transformers'
`generate` on the same weights as a baseline.

Both runs get the same prompt token ids, greedy decoding and exactly max_tokens new tokens per request
(EOS ignored); each is timed from its first request to its last token, model loading excluded.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine import LLMEngine, SamplingParams
from engine.structured_output import StructuredOutputsParams

# W64 (see resources/bench/): 64 chat requests of 128 new tokens each.
BUILTIN_WORKLOAD = Path(__file__).resolve().parents[2] / "resources" / "bench" / "w64_prompts.jsonl"
# An answer, a confidence and keywords: what a script asks for with response_format (the --json-schema example).
EXAMPLE_SCHEMA = BUILTIN_WORKLOAD.with_name("w64_schema.json")
HF_BATCH_SIZE = 16


@dataclass(frozen=True)
class BenchRequest:
    messages: list[dict]
    max_tokens: int


@dataclass(frozen=True)
class BenchResult:
    name: str
    token_ids: list[list[int]]  # the new tokens of each request, in workload order
    seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(map(len, self.token_ids))

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    def summary(self) -> str:
        return (
            f"{self.name}: {self.generated_tokens} tokens in {self.seconds:.2f} s = "
            f"{self.tokens_per_s:.1f} tok/s ({len(self.token_ids)} requests)"
        )


def load_workload(path: Path, num_prompts: int | None = None, max_tokens: int | None = None) -> list[BenchRequest]:
    """Read a JSONL workload: one {"messages": [...], "max_tokens": N} per line.

    num_prompts keeps the first N requests; max_tokens replaces every request's own.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the workload {path}: {e.strerror}") from e
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from e
        messages = item.get("messages") if isinstance(item, dict) else None
        if not (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
        ):
            raise ValueError(f'{where}: expected "messages": a non-empty list of {{"role", "content"}}')
        tokens = item.get("max_tokens") if max_tokens is None else max_tokens
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f'{where}: expected "max_tokens": an integer >= 1, got {tokens!r}')
        requests.append(BenchRequest(messages, tokens))
    if not requests:
        raise ValueError(f"the workload {path} has no requests")
    if num_prompts is not None:
        if num_prompts > len(requests):
            raise ValueError(f"asked for {num_prompts} prompts but {path} has {len(requests)}")
        requests = requests[:num_prompts]
    return requests


def greedy_params(request: BenchRequest, json_schema: dict | None = None) -> SamplingParams:
    """Greedy, EOS ignored; with json_schema every reply is kept to it (it may then end before max_tokens, when
    the JSON is complete)."""
    structured = StructuredOutputsParams(json=json_schema) if json_schema is not None else None
    return SamplingParams(
        temperature=0.0, ignore_eos=True, max_tokens=request.max_tokens, structured_outputs=structured
    )


def load_json_schema(path: Path) -> dict:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the JSON schema {path}: {e}") from e
    if not isinstance(schema, dict):
        raise ValueError(f"{path} does not hold a JSON schema object")
    return schema


def run_engine(
    engine: LLMEngine, prompt_token_ids: list[list[int]], params: list[SamplingParams], progress: bool = True
) -> BenchResult:
    """Submit every request at once and step the engine until all finish (continuous batching)."""
    counts: dict[str, int] = {}  # tokens generated so far, per request
    finished: dict[str, list[int]] = {}
    total = sum(p.max_tokens for p in params)
    with tqdm(total=total, unit="tok", desc="kvstudio", disable=not progress, dynamic_ncols=True) as bar:
        start = time.perf_counter()
        for i, (ids, p) in enumerate(zip(prompt_token_ids, params)):
            engine.add_request(f"bench-{i}", {"prompt_token_ids": ids}, p)
        while engine.has_unfinished_requests():
            for out in engine.step():
                token_ids = out.outputs[0].token_ids
                bar.update(len(token_ids) - counts.get(out.request_id, 0))
                counts[out.request_id] = len(token_ids)
                if out.finished:
                    finished[out.request_id] = list(token_ids)
        seconds = time.perf_counter() - start
    return BenchResult("kvstudio", [finished[f"bench-{i}"] for i in range(len(params))], seconds)


def load_hf_model(model: str) -> tuple[torch.nn.Module, int]:
    """transformers' own model class for `model`, in float32, with the weights kvstudio's loader reads.

    Returns the model and the pad token id for left-padded batches.
    """
    from transformers import AutoModelForCausalLM

    from engine.models.loader import open_model

    source = open_model(model)
    # from_config writes the dtype into the config it is given: keep the source's untouched
    config = source.checkpoint.transformers_config() if source.format == "gguf" else copy.deepcopy(source.hf_config)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(dict(source.weights(torch.float32)), strict=False)
    if source.hf_config.tie_word_embeddings:
        hf.tie_weights()
        missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(
            f"{model}: weights do not match transformers' model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    pad = source.tokenizer.pad_token_id
    return hf.eval(), pad if pad is not None else source.eos_token_ids[0]


def run_hf_generate(
    model: torch.nn.Module,
    pad_token_id: int,
    prompt_token_ids: list[list[int]],
    max_tokens: int,
    batch_size: int = HF_BATCH_SIZE,
    progress: bool = True,
) -> BenchResult:
    """Static batches in workload order, left-padded, greedy, exactly max_tokens new tokens per prompt."""
    generated: list[list[int]] = []
    with (
        torch.inference_mode(),
        tqdm(
            total=len(prompt_token_ids) * max_tokens,
            unit="tok",
            desc="hf generate",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        start = time.perf_counter()
        for first in range(0, len(prompt_token_ids), batch_size):
            batch = prompt_token_ids[first : first + batch_size]
            width = max(len(ids) for ids in batch)
            # input_ids, attention_mask: [batch, width], prompts aligned to the right
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            # out: [batch, width + max_tokens]
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=pad_token_id,
            )
            generated.extend(out[:, width:].tolist())
            bar.update(out[:, width:].numel())
        seconds = time.perf_counter() - start
    return BenchResult(f"hf generate (batches of {batch_size})", generated, seconds)
