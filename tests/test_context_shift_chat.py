"""``scratchlm chat --context-shift``: the conversation is trimmed only when the prompt itself outgrows the window,
a reply goes on past the window, and a shift keeps the conversation's head (the system prompt) unless --keep says
otherwise."""

from __future__ import annotations

import io

import pytest

from conftest import tiny_llm
from scratchlm.chat_session import ChatSession
from scratchlm.generate import DecodeStats

pytestmark = pytest.mark.usefixtures("one_thread")
SYSTEM = "You answer in riddles."


def long_history(session: ChatSession, turns: int) -> None:
    for i in range(turns):
        session.history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]
    session.history.append({"role": "user", "content": "last question"})


def test_with_a_shift_only_a_prompt_that_does_not_fit_loses_exchanges():
    llm = tiny_llm()
    window = llm.config.context_length
    plain = ChatSession(llm, system=SYSTEM, sampling=dict(max_new_tokens=100))
    shifting = ChatSession(llm, system=SYSTEM, sampling=dict(max_new_tokens=100, context_shift=True))
    for session in (plain, shifting):
        long_history(session, 1)
    prompt = len(llm.encode_chat(shifting.messages()))
    assert prompt + 100 > window > prompt  # the reply budget does not fit beside the prompt; the prompt does
    assert plain.fit_history() == 1 and shifting.fit_history() == 0
    shifting.history = []
    long_history(shifting, 6)  # now the prompt alone outgrows the window
    full = list(shifting.history)
    assert len(llm.encode_chat(shifting.messages())) >= window
    dropped = shifting.fit_history()
    assert dropped > 0 and shifting.history == full[2 * dropped:]
    assert len(llm.encode_chat(shifting.messages())) < window and shifting.history[0]["role"] == "user"
    shifting.history = full[2 * dropped - 2:]
    assert len(llm.encode_chat(shifting.messages())) >= window  # one exchange fewer dropped would not fit


def test_a_reply_goes_past_the_window_keeping_the_system_prompt():
    llm = tiny_llm()
    stats = DecodeStats()
    session = ChatSession(llm, system=SYSTEM, sampling=dict(temperature=0, max_new_tokens=200, ignore_eos=True,
                                                            context_shift=True, stats=stats))
    head = session.head_tokens()
    system_only = llm.encode_chat([{"role": "system", "content": SYSTEM}], add_generation_prompt=False)
    prompt = llm.encode_chat(session.messages() + [{"role": "user", "content": "hello"}])
    assert prompt[: len(system_only)] == system_only and len(system_only) < head < len(prompt)
    assert session.options()["keep"] == head
    out = io.StringIO()
    answer = session.reply("hello", out)
    assert stats.generated == 200 and stats.shifts >= 2  # 200 tokens after the prompt: past the 128-token window
    want = llm.complete(prompt, temperature=0, max_new_tokens=200, ignore_eos=True, context_shift=True, keep=head)
    assert answer == want.text and out.getvalue() == want.text + "\n"
    # An explicit --keep wins over the head.
    session = ChatSession(llm, system=SYSTEM, sampling=dict(context_shift="rotate", keep=2))
    assert session.options()["keep"] == 2
