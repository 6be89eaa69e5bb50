"""OpenAI's response shapes from the engine's RequestOutputs: whole responses, streamed chunks, logprobs, usage.
Free of any HTTP library, like protocol.py."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from app.server import reply as replies
from app.server.protocol import GenerationRequest, ModelInfo
from engine import CompletionOutput, RequestOutput

# OpenAI's (and vLLM's) floor for a logprob: -inf is not valid JSON.
_MIN_LOGPROB = -9999.0


# ---- logprobs -----------------------------------------------------------------------------------------------------


def _token_text(tokenizer, token_id: int, as_id: bool = False) -> str:
    """The token as text (byte-level BPE symbols such as 'Ġ' turned back into what they stand for), or
    "token_id:<id>" (vLLM's return_tokens_as_token_ids: unambiguous where two tokens read alike)."""
    if as_id:
        return f"token_id:{token_id}"
    return tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])


def _lp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def _ranked(entry: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])


def _cut(entry: dict[int, float] | None, chosen: int, n: int) -> dict[int, float] | None:
    """An engine entry of the model's top N' > n (and the chosen token) cut to the top n and the chosen token."""
    if entry is None:
        return None
    top = dict(_ranked(entry)[:n])
    return {**top, chosen: entry[chosen]}


def _completion_logprobs(
    req: GenerationRequest, tokenizer, token_ids: list[int], entries: list[dict[int, float] | None], offset: int
) -> tuple[dict, int]:
    """OpenAI's legacy shape; top_logprobs keeps the chosen token too (up to N + 1 entries, as OpenAI says). An
    entry of None (the first prompt token, which nothing scores) gives nulls. Returns the offset after the last."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, tid)
        out["tokens"].append(_token_text(tokenizer, tid, req.tokens_as_ids))
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(None if entry is None else _lp(entry[tid]))
        out["top_logprobs"].append(
            None if entry is None else {_token_text(tokenizer, t, req.tokens_as_ids): _lp(v) for t, v in _ranked(entry)}
        )
    return out, offset


def _chat_logprobs(req: GenerationRequest, tokenizer, token_ids: list[int], entries: list[dict[int, float]]) -> dict:
    def item(tid: int, value: float) -> dict:
        text = _token_text(tokenizer, tid)
        return {
            "token": _token_text(tokenizer, tid, req.tokens_as_ids),
            "logprob": _lp(value),
            "bytes": list(text.encode()),
        }

    # The engine's entry is the top-N plus the chosen token, so the top N of it are the model's top N.
    return {
        "content": [
            {**item(tid, entry[tid]), "top_logprobs": [item(t, v) for t, v in _ranked(entry)[: req.logprobs]]}
            for tid, entry in zip(token_ids, entries)
        ]
    }


def _prompt_logprobs(req: GenerationRequest, output: RequestOutput, tokenizer) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token (None for the first), {token id: {logprob, rank, decoded_token}}
    for the top prompt_logprobs and the prompt's own token. A rank is the token's place in the model's ranking,
    null for a prompt token outside the top N (the engine reports no more of the ranking)."""
    out: list[dict | None] = []
    asked = req.params.prompt_logprobs  # what the engine was asked for (an echo may have asked for more)
    for tid, entry in zip(output.prompt_token_ids, output.prompt_logprobs or []):
        if entry is None:
            out.append(None)
            continue
        # The entry is the model's top `asked` tokens, best first, plus the prompt's token when it is not one.
        ranked = _ranked(entry)
        rank = {t: i + 1 for i, (t, _) in enumerate(ranked)}
        if len(entry) > asked:
            rank[tid] = None
        kept = {**dict(ranked[: req.prompt_logprobs]), tid: entry[tid]}
        out.append(
            {
                str(t): {"logprob": _lp(v), "rank": rank[t], "decoded_token": _token_text(tokenizer, t)}
                for t, v in kept.items()
            }
        )
    return out


# ---- responses ----------------------------------------------------------------------------------------------------


def _prompt_text(output: RequestOutput, tokenizer) -> str:
    return output.prompt if output.prompt is not None else tokenizer.decode(output.prompt_token_ids)


def _echo_logprobs(req: GenerationRequest, output: RequestOutput, tokenizer) -> dict:
    ids = output.prompt_token_ids
    entries = output.prompt_logprobs or [None] * len(ids)
    if req.prompt_logprobs is not None and req.prompt_logprobs > req.logprobs:  # the engine was asked for more
        entries = [_cut(entry, tid, req.logprobs) for tid, entry in zip(ids, entries)]
    return _completion_logprobs(req, tokenizer, ids, entries, 0)[0]


def _joined(first: dict, then: dict) -> dict:
    return {key: first[key] + then[key] for key in first}


def _usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choices(req: GenerationRequest, output: RequestOutput) -> list[CompletionOutput]:
    """The choices to return: with best_of, the n samples of highest cumulative logprob, indexed 0..n-1 (their
    logprobs, asked for only to rank them, left out unless the request wanted them)."""
    if req.params.n == req.n:
        return output.outputs
    best = sorted(output.outputs, key=lambda c: -(c.cumulative_logprob or 0.0))[: req.n]
    return [
        dataclasses.replace(c, index=i, logprobs=c.logprobs if req.logprobs is not None else None)
        for i, c in enumerate(best)
    ]


def completion_response(
    req: GenerationRequest, request_id: str, outputs: list[RequestOutput], model: ModelInfo
) -> dict:
    tok, choices = model.tokenizer, []
    for p, output in enumerate(outputs):
        prompt_text = _prompt_text(output, tok)
        for c in _choices(req, output):
            logprobs = None
            if req.logprobs is not None:
                # text_offset counts from the prompt's start, echoed or not (OpenAI's convention).
                logprobs = _completion_logprobs(req, tok, c.token_ids, c.logprobs or [], len(prompt_text))[0]
                if req.echo:
                    logprobs = _joined(_echo_logprobs(req, output, tok), logprobs)
            choice = {
                "index": p * req.n + c.index,
                "text": prompt_text + c.text if req.echo else c.text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _prompt_logprobs(req, output, tok)
            choices.append(choice)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": _usage(outputs),
    }


def chat_response(req: GenerationRequest, request_id: str, outputs: list[RequestOutput], model: ModelInfo) -> dict:
    choices = []
    for output in outputs:
        for c in _choices(req, output):
            logprobs = (
                None if req.logprobs is None else _chat_logprobs(req, model.tokenizer, c.token_ids, c.logprobs or [])
            )
            message, reply = replies.message(req.reply, c.text)
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": replies.finish_reason(reply, c.finish_reason),
                }
            )
    response = {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": _usage(outputs),
    }
    if req.prompt_logprobs is not None:
        response["prompt_logprobs"] = _prompt_logprobs(req, outputs[0], model.tokenizer)
    return response


@dataclass
class _Sent:
    """What one choice has streamed so far."""

    chars: int = 0
    tokens: int = 0
    offset: int = 0  # completions' text_offset of the next token
    started: bool = False  # chat: the role chunk went out; completions: the first text chunk did
    finished: bool = False
    message: replies.DeltaState | None = None  # chat: what the message's parts have sent


class StreamState:
    """Turns one prompt's successive RequestOutputs (cumulative: each holds everything so far) into the OpenAI
    chunks for what is new. A choice gets a chunk only when what it shows grows or it finishes, so tokens whose
    text the detokenizer holds back (a possible stop string), or a parser does (a possible tag), ride along with
    the chunk that shows their text."""

    def __init__(self, req: GenerationRequest, request_id: str, model: ModelInfo, prompt_index: int = 0) -> None:
        self.req, self.request_id, self.model, self.prompt_index = req, request_id, model, prompt_index
        self.created = int(time.time())
        self._sent: dict[int, _Sent] = {}
        self._prompt_text: str | None = None
        self._usage: dict | None = None  # continuous_usage_stats: the usage so far
        self._sent_prompt_logprobs = False  # chat: in the first chunk

    def _chunk(self, choices: list[dict]) -> dict:
        chat = self.req.kind == "chat"
        chunk = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.model.name,
            "choices": choices,
        }
        if self.req.include_usage:
            chunk["usage"] = self._usage
        return chunk

    def chunks(self, output: RequestOutput) -> list[dict]:
        if self.req.continuous_usage:
            self._usage = _usage([output])
        if self.req.kind == "chat":
            return [chunk for c in output.outputs for chunk in self._chat_chunks(output, c)]
        out = []
        for c in output.outputs:
            sent = self._sent.setdefault(c.index, _Sent())
            if sent.finished:
                continue
            new_text = c.text[sent.chars :]
            finished = c.finish_reason is not None
            # An echo goes out with the first token, once the prompt's logprobs are all in.
            echo_due = self.req.echo and not sent.started and bool(c.token_ids)
            if not (new_text or finished or echo_due):
                continue
            choice = self._completion_choice(output, c, sent, new_text)
            out.append(self._chunk([{**choice, "finish_reason": c.finish_reason}]))
            sent.chars, sent.tokens, sent.started, sent.finished = len(c.text), len(c.token_ids), True, finished
        return out

    def _chat_chunks(self, output: RequestOutput, c: CompletionOutput) -> list[dict]:
        sent = self._sent.setdefault(c.index, _Sent(message=replies.DeltaState(self.req.reply)))
        if sent.finished:
            return []
        out = []
        if not sent.started:
            role = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            out.append(self._chunk([{**role, "finish_reason": None}]))
            if self.req.prompt_logprobs is not None and not self._sent_prompt_logprobs:
                out[-1]["prompt_logprobs"] = _prompt_logprobs(self.req, output, self.model.tokenizer)
                self._sent_prompt_logprobs = True
            sent.started = True
        finished = c.finish_reason is not None
        deltas = sent.message.deltas(c.text, finished)
        if not deltas and not finished:
            return out
        logprobs = None
        if self.req.logprobs is not None:  # the step's tokens, with the first chunk of the step
            new = slice(sent.tokens, None)
            logprobs = _chat_logprobs(self.req, self.model.tokenizer, c.token_ids[new], (c.logprobs or [])[new])
        reason = replies.finish_reason(sent.message.reply, c.finish_reason)
        for i, delta in enumerate(deltas or [{}]):
            last = i == max(len(deltas), 1) - 1
            choice = {"index": c.index, "delta": delta, "logprobs": logprobs if i == 0 else None}
            out.append(self._chunk([{**choice, "finish_reason": reason if last else None}]))
        sent.tokens, sent.finished = len(c.token_ids), finished
        return out

    def _completion_choice(self, output: RequestOutput, c: CompletionOutput, sent: _Sent, new_text: str) -> dict:
        tok = self.model.tokenizer
        if self._prompt_text is None:
            self._prompt_text = _prompt_text(output, tok)
        with_prompt = self.req.echo and not sent.started
        logprobs = None
        if self.req.logprobs is not None:
            if not sent.started:
                sent.offset = len(self._prompt_text)
            logprobs, sent.offset = _completion_logprobs(
                self.req, tok, c.token_ids[sent.tokens :], (c.logprobs or [])[sent.tokens :], sent.offset
            )
            if with_prompt:
                logprobs = _joined(_echo_logprobs(self.req, output, tok), logprobs)
        choice = {
            "index": self.prompt_index * self.req.n + c.index,
            "text": self._prompt_text + new_text if with_prompt else new_text,
            "logprobs": logprobs,
        }
        if self.req.prompt_logprobs is not None and not sent.started:
            choice["prompt_logprobs"] = _prompt_logprobs(self.req, output, tok)
        return choice

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict:
        return {**self._chunk([]), "usage": _usage(outputs)}
