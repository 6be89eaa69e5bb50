"""Turning a conversation into an engine prompt: the model's chat template, tokenized once."""

from __future__ import annotations


def chat_prompt(tokenizer, messages: list[dict]) -> dict:
    """The engine prompt for a conversation: the chat template's text and its token ids."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes the special tokens it wants itself; the tokenizer must not add a BOS of its own.
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
