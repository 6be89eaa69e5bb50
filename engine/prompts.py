"""What a prompt is, and turning a conversation into one through the model's chat template.

A prompt is text (the engine tokenizes it) or token ids (used as they are; the text, when given, is reported back
in the outputs). Chat templates are rendered here only: the offline API, the HTTP server, the command line and the
desktop window all render a conversation the same way.
"""

from __future__ import annotations

from typing import Any, NotRequired, Required, TypedDict

from jinja2 import TemplateError


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: Required[list[int]]
    prompt: NotRequired[str | None]  # the text the ids were made from, reported back in the outputs


PromptType = str | TextPrompt | TokensPrompt


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: the model has no chat template, or its template refused the messages."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat_text(
    tokenizer,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The conversation as the chat template writes it, special tokens included, not yet tokenized: a caller can
    look at (or refuse) the text before paying for its tokenization."""
    if chat_template is None and not has_chat_template(tokenizer):
        raise ChatTemplateError("this model has no chat template: send the prompt as plain text instead")
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            **(chat_template_kwargs or {}),
        )
    except (TemplateError, TypeError, ValueError, KeyError) as e:  # templates raise on roles they do not take
        raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> TokensPrompt:
    """The engine prompt for a conversation: the template's text and its token ids, tokenized once.

    The template writes the special tokens it wants (BOS and the like) itself, so the tokenizer adds none.
    """
    text = render_chat_text(
        tokenizer,
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs,
    )
    return TokensPrompt(prompt_token_ids=tokenizer.encode(text, add_special_tokens=False), prompt=text)
