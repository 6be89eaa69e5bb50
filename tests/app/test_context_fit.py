"""What of a conversation fits the model's context (app/context_fit.py): the fewest oldest turns left out, whole
turns only, the system prompt and the last message kept, and a clear error when even those do not fit. The counter
here counts words plus a few tokens a message, as a chat template adds its role markers."""

from __future__ import annotations

import pytest

from app.context_fit import CannotFit, ContextCheck, drop_oldest_turns, reply_room

PER_MESSAGE = 4


def count(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) + PER_MESSAGE for m in messages)


def turn(i: int, words: int) -> list[dict]:
    return [
        {"role": "user", "content": " ".join([f"q{i}"] * words)},
        {"role": "assistant", "content": " ".join([f"a{i}"] * words)},
    ]


def conversation(turns: int, words: int, system: str | None = "be brief") -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for i in range(turns):
        messages += turn(i, words)
    return [*messages, {"role": "user", "content": "last question"}]


def test_a_check_says_whether_prompt_and_reply_fit_and_what_they_need():
    assert ContextCheck(90, 10, 100).fits and not ContextCheck(91, 10, 100).fits
    assert ContextCheck(99, 10, 100).prompt_fits and not ContextCheck(100, 10, 100).prompt_fits
    assert ContextCheck(95, 10, 100).sentence() == (
        "This conversation is 95 tokens; with up to 10 for the reply it needs 105, more than the model's context "
        "of 100."
    )


def test_the_reply_is_given_its_max_tokens_but_at_most_an_eighth_of_the_context():
    assert reply_room(512, 8192) == 512
    assert reply_room(512, 512) == 64
    assert reply_room(12, 512) == 12


@pytest.mark.parametrize("system", ["be brief", None])
def test_the_fewest_oldest_turns_are_left_out_and_the_system_prompt_stays(system):
    messages = conversation(turns=6, words=10, system=system)  # each turn: 2 * (10 + 4) = 28 tokens
    whole = count(messages)
    context = whole - 28 - 1 + 5  # one turn too many, with 5 for the reply
    trimmed = drop_oldest_turns(messages, count, 5, context)
    head = [{"role": "system", "content": system}] if system else []
    assert trimmed.num_dropped == 4  # two turns: one is not enough (the reply's room)
    assert trimmed.messages == head + messages[len(head) + 4 :]
    assert trimmed.check == ContextCheck(whole - 2 * 28, 5, context) and trimmed.check.fits
    # one turn more room: one turn fewer left out; room for it all: nothing left out
    assert drop_oldest_turns(messages, count, 5, context + 28).num_dropped == 2
    assert drop_oldest_turns(messages, count, 5, whole + 5).num_dropped == 0


def test_a_reply_is_never_sent_without_the_message_it_answers():
    # a conversation that starts with the assistant's greeting, then uneven turns
    messages = [{"role": "assistant", "content": "hello " * 30}, *turn(1, 3), *turn(2, 50)]
    messages.append({"role": "user", "content": "last"})
    for context in range(10, count(messages) + 10):
        try:
            trimmed = drop_oldest_turns(messages, count, 2, context)
        except CannotFit:
            continue
        assert trimmed.messages[0]["role"] == "user" or trimmed.num_dropped == 0
        assert trimmed.messages == messages[trimmed.num_dropped :] and trimmed.check.fits
        if trimmed.num_dropped:  # the fewest: keeping the turn before would not fit
            starts = [i for i, m in enumerate(messages) if m["role"] == "user" and i < trimmed.num_dropped]
            assert count(messages[max(starts, default=0) :]) + 2 > context


def test_when_even_the_last_message_does_not_fit_it_says_so_and_what_to_do():
    messages = [*conversation(turns=2, words=5), {"role": "user", "content": "x " * 200}]
    with pytest.raises(
        CannotFit,
        match=r"^The last message alone is 210 tokens with the system prompt; .*"
        r"more than the model's context of 150\. Shorten it, lower Max tokens",
    ):
        drop_oldest_turns(messages, count, 10, 150)
