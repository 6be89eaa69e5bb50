"""OpenAI's response shapes from the engine's RequestOutputs: whole responses, streamed chunks, logprobs, usage.
Free of any HTTP library, like protocol.py."""

from __future__ import annotations

import time
from dataclasses import dataclass

from app.server.protocol import GenerationRequest, ModelInfo
from engine import CompletionOutput, RequestOutput

# OpenAI's (and vLLM's) floor for a logprob: -inf is not valid JSON.
_MIN_LOGPROB = -9999.0


# ---- responses ----------------------------------------------------------------------------------------------------


def _token_text(tokenizer, token_id: int) -> str:
    """The token as text (byte-level BPE symbols such as 'Ġ' turned back into what they stand for)."""
    return tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])


def _lp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def _ranked(entry: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])


def _completion_logprobs(
    tokenizer, token_ids: list[int], entries: list[dict[int, float] | None], offset: int
) -> tuple[dict, int]:
    """OpenAI's legacy shape; top_logprobs keeps the chosen token too (up to N + 1 entries, as OpenAI says). An
    entry of None (the first prompt token, which nothing scores) gives nulls. Returns the offset after the last."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, tid)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(None if entry is None else _lp(entry[tid]))
        out["top_logprobs"].append(
            None if entry is None else {_token_text(tokenizer, t): _lp(v) for t, v in _ranked(entry)}
        )
    return out, offset


def _chat_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], top_n: int) -> dict:
    def item(tid: int, value: float) -> dict:
        text = _token_text(tokenizer, tid)
        return {"token": text, "logprob": _lp(value), "bytes": list(text.encode())}

    # The engine's entry is the top-N plus the chosen token, so the top N of it are the model's top N.
    return {
        "content": [
            {**item(tid, entry[tid]), "top_logprobs": [item(t, v) for t, v in _ranked(entry)[:top_n]]}
            for tid, entry in zip(token_ids, entries)
        ]
    }


def _prompt_text(output: RequestOutput, tokenizer) -> str:
    return output.prompt if output.prompt is not None else tokenizer.decode(output.prompt_token_ids)


def _echo_logprobs(output: RequestOutput, tokenizer) -> dict:
    ids = output.prompt_token_ids
    return _completion_logprobs(tokenizer, ids, output.prompt_logprobs or [None] * len(ids), 0)[0]


def _joined(first: dict, then: dict) -> dict:
    return {key: first[key] + then[key] for key in first}


def _usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_response(
    req: GenerationRequest, request_id: str, outputs: list[RequestOutput], model: ModelInfo
) -> dict:
    tok, choices = model.tokenizer, []
    for p, output in enumerate(outputs):
        prompt_text = _prompt_text(output, tok)
        for c in output.outputs:
            logprobs = None
            if req.logprobs is not None:
                # text_offset counts from the prompt's start, echoed or not (OpenAI's convention).
                logprobs = _completion_logprobs(tok, c.token_ids, c.logprobs or [], len(prompt_text))[0]
                if req.echo:
                    logprobs = _joined(_echo_logprobs(output, tok), logprobs)
            choices.append(
                {
                    "index": p * req.params.n + c.index,
                    "text": prompt_text + c.text if req.echo else c.text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
            )
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
        for c in output.outputs:
            logprobs = (
                None
                if req.logprobs is None
                else _chat_logprobs(model.tokenizer, c.token_ids, c.logprobs or [], req.logprobs)
            )
            choices.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
            )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": _usage(outputs),
    }


@dataclass
class _Sent:
    """What one choice has streamed so far."""

    chars: int = 0
    tokens: int = 0
    offset: int = 0  # completions' text_offset of the next token
    started: bool = False  # chat: the role chunk went out; completions: the first text chunk did
    finished: bool = False


class StreamState:
    """Turns one prompt's successive RequestOutputs (cumulative: each holds everything so far) into the OpenAI
    chunks for what is new. A choice gets a chunk only when its text grows or it finishes, so tokens whose text
    the detokenizer holds back (a possible stop string) ride along with the chunk that shows their text."""

    def __init__(self, req: GenerationRequest, request_id: str, model: ModelInfo, prompt_index: int = 0) -> None:
        self.req, self.request_id, self.model, self.prompt_index = req, request_id, model, prompt_index
        self.created = int(time.time())
        self._sent: dict[int, _Sent] = {}
        self._prompt_text: str | None = None

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
            chunk["usage"] = None
        return chunk

    def chunks(self, output: RequestOutput) -> list[dict]:
        chat, out = self.req.kind == "chat", []
        for c in output.outputs:
            sent = self._sent.setdefault(c.index, _Sent())
            if sent.finished:
                continue
            if chat and not sent.started:
                out.append(
                    self._chunk(
                        [
                            {
                                "index": c.index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                )
                sent.started = True
            new_text = c.text[sent.chars :]
            finished = c.finish_reason is not None
            # An echo goes out with the first token, once the prompt's logprobs are all in.
            echo_due = self.req.echo and not sent.started and bool(c.token_ids)
            if not (new_text or finished or echo_due):
                continue
            choice = (
                self._chat_choice(c, sent, new_text) if chat else self._completion_choice(output, c, sent, new_text)
            )
            out.append(self._chunk([{**choice, "finish_reason": c.finish_reason}]))
            sent.chars, sent.tokens, sent.started, sent.finished = len(c.text), len(c.token_ids), True, finished
        return out

    def _chat_choice(self, c: CompletionOutput, sent: _Sent, new_text: str) -> dict:
        logprobs = (
            None
            if self.req.logprobs is None
            else _chat_logprobs(
                self.model.tokenizer, c.token_ids[sent.tokens :], (c.logprobs or [])[sent.tokens :], self.req.logprobs
            )
        )
        return {"index": c.index, "delta": {"content": new_text} if new_text else {}, "logprobs": logprobs}

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
                tok, c.token_ids[sent.tokens :], (c.logprobs or [])[sent.tokens :], sent.offset
            )
            if with_prompt:
                logprobs = _joined(_echo_logprobs(output, tok), logprobs)
        return {
            "index": self.prompt_index * self.req.params.n + c.index,
            "text": self._prompt_text + new_text if with_prompt else new_text,
            "logprobs": logprobs,
        }

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict:
        return {**self._chunk([]), "usage": _usage(outputs)}
