"""Where chat and batch requests go: one protocol, RequestTarget, that the in-process engine (LocalTarget, over its
engine thread) and a remote OpenAI-compatible endpoint (app.remote_client.RemoteClient) both implement. The bridge
holds the current target and forwards to it; the pages never know which one it is.

A target takes requests from any thread and answers each through its callback, on a thread of its own: TextUpdates
as the reply grows (the last one finished), or the exception that ended it. RequestRefused is the one that means
the target turned the request down before running it, so it produced nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

from app.engine_thread import EngineThread
from app.remote_client import TextUpdate, UpdateCallback
from engine import PromptType, RequestOutput, SamplingParams, render_chat


class RequestRefused(Exception):
    """The target refused the request before running it (a prompt too long, an empty one): it produced nothing."""


class RequestTarget(Protocol):
    def chat_templated(self) -> bool:
        """Whether chats can be sent: a remote endpoint applies its own template; a local model needs one."""
        ...

    def chat_route(self) -> tuple[str, str]:
        """How a chat reaches the model, in words: a short label, and the end of a sentence that begins "Each line
        is sent as a user message"."""
        ...

    def prepare_chat(self, messages: list[dict]) -> Any:
        """`messages` as this target's submit_chat takes them, made on the caller's thread (rendering a template
        there keeps the work off a busy engine thread). Raises the template's error when it cannot render them."""
        ...

    def submit_chat(self, chat: Any, params: SamplingParams, callback: UpdateCallback, request_id: str) -> None:
        """Queue a chat prepared by this target's prepare_chat. Raises at once when the target takes no request now
        (a full queue, an engine that stopped); a refusal found later arrives as RequestRefused."""
        ...

    def submit_completion(
        self, prompt: PromptType, params: SamplingParams, callback: UpdateCallback, request_id: str
    ) -> None:
        """Queue a raw-text prompt (the local engine also takes {"prompt_token_ids": [...]}), as submit_chat does."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request; its callback gets nothing more. Unknown ids are ignored."""
        ...


class LocalTarget:
    """The in-process engine as a request target: chats go through the model's chat template, replies come back
    as TextUpdates, and a request the engine refuses ends with RequestRefused."""

    def __init__(self, thread: EngineThread) -> None:
        self.thread = thread

    def chat_templated(self) -> bool:
        return bool(getattr(self.thread.engine.tokenizer, "chat_template", None))

    def chat_route(self) -> tuple[str, str]:
        return "Chat template", "through the model's chat template"

    def prepare_chat(self, messages: list[dict]) -> dict:
        return render_chat(self.thread.engine.tokenizer, messages)

    def submit_chat(self, chat: dict, params: SamplingParams, callback: UpdateCallback, request_id: str) -> None:
        # A chat's updates carry its KV blocks, for the chat page's context meter.
        self._submit(chat, params, callback, request_id, report_blocks=True)

    def submit_completion(
        self, prompt: PromptType, params: SamplingParams, callback: UpdateCallback, request_id: str
    ) -> None:
        self._submit(prompt, params, callback, request_id, report_blocks=False)

    def _submit(
        self, prompt: PromptType, params: SamplingParams, callback: UpdateCallback, request_id: str, report_blocks: bool
    ) -> None:
        def deliver(item: RequestOutput | BaseException) -> None:
            if isinstance(item, BaseException):
                callback(item)
                return
            completion = item.outputs[0]
            callback(
                TextUpdate(
                    completion.text,
                    len(completion.token_ids),
                    item.finished,
                    completion.finish_reason,
                    len(item.prompt_token_ids),
                    item.blocks,
                )
            )

        def refused(accepted) -> None:  # the engine's ValueError naming what is wrong with the request
            if accepted.exception() is not None:
                callback(RequestRefused(str(accepted.exception())))

        self.thread.submit(prompt, params, deliver, request_id, report_blocks).add_done_callback(refused)

    def abort(self, request_id: str) -> None:
        self.thread.abort(request_id)
