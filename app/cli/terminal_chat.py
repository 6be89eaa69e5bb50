"""Text in the terminal: one request streamed to stdout as it grows, and the chat loop of `kvstudio generate`
without a prompt (and of `kvstudio` without a display)."""

from __future__ import annotations

import itertools
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from engine import LLM, LLMEngine, PromptType, SamplingParams

CHAT_HELP = "Chat with the model: /reset starts a new conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply."


def use_chat_template(wanted: bool | None, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if wanted and not has_template:
        raise ValueError("this model has no chat template; leave out --chat to send the prompt as it is")
    return has_template if wanted is None else wanted


def stream_completion(
    engine: LLMEngine, request_id: str, prompt: PromptType, params: SamplingParams, out: TextIO
) -> str:
    """Run one request, writing its text to `out` as it grows; returns the whole text."""
    engine.add_request(request_id, prompt, params)
    text = ""
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id == request_id:
                    # outputs carry the cumulative text: write the part not written yet
                    new_text = output.outputs[0].text
                    out.write(new_text[len(text) :])
                    out.flush()
                    text = new_text
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        raise
    return text


def chat_loop(llm: LLM, params: SamplingParams, out: TextIO | None = None) -> None:
    """Read user turns from stdin until /exit or end of input; the conversation is kept across turns."""
    from engine import render_chat

    out = out or sys.stdout
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    use_chat_template(True, tokenizer)
    print(CHAT_HELP, file=sys.stderr)
    messages: list[dict] = []
    request_ids = (f"chat-{n}" for n in itertools.count())
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            out.write("\n")
            return
        if line == "/exit":
            return
        if line == "/reset":
            messages.clear()
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = stream_completion(engine, next(request_ids), render_chat(tokenizer, messages), params, out)
        except KeyboardInterrupt:
            messages.pop()
            out.write("\n[reply stopped]\n")
            continue
        except ValueError as e:  # the conversation no longer fits in max_model_len
            messages.pop()
            print(f"kvstudio: {e}. /reset starts a new conversation.", file=sys.stderr)
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})
