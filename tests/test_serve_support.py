"""Helpers for the serving tests: a scripted model whose replies are known in advance, and engine drivers.

The scripted model honours the same cache contract as ``Transformer`` (it writes each fed token into the
KV cache at its row's position and advances ``lengths``), so the engine cannot tell it apart; its "logits"
pick the next character of a fixed script, counted from the last ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import torch
from torch import nn

from conftest import byte_tokenizer
from scratchlm.config import ModelConfig
from scratchlm.llm import LLM
from scratchlm.model import KVCache

IM_START, IM_END = 257, 258
ASSISTANT_OPENER = len("assistant\n") + 1  # tokens from <|im_start|> to the first reply token


class ScriptedModel(nn.Module):
    """Replies with ``script`` (then <|im_end|>), sleeping ``delay`` seconds per decode step."""

    def __init__(self, script: str, delay: float = 0.0):
        super().__init__()
        self.config = ModelConfig(vocab_size=260, context_length=1024, d_model=260, n_layers=1, n_heads=1,
                                  n_kv_heads=1, d_ff=4, positions="learned", norm="layernorm", mlp="gelu",
                                  name="scripted")
        self.script = list(script.encode("utf-8")) + [IM_END]
        self.delay = delay
        self.anchor = nn.Parameter(torch.zeros(1))  # the engine reads dtype and device from a parameter

    def hidden_states(self, ids, cache: KVCache | None = None, rows=None, input_lengths=None):
        B, T = ids.shape
        out = torch.zeros(B, T, self.config.vocab_size)
        if cache is None:
            return out
        if T == 1 and self.delay:
            time.sleep(self.delay)
        rows = torch.arange(cache.batch_size) if rows is None else rows
        start = cache.lengths[rows].clone()
        for b in range(B):
            row = int(rows[b])
            for t in range(T):
                pos = int(start[b]) + t
                cache.k[0, row, 0, pos, 0] = float(ids[b, t])  # the token history lives in the cache
                history = cache.k[0, row, 0, : pos + 1, 0].long().tolist()
                opener = max((i for i, tok in enumerate(history) if tok == IM_START), default=0)
                g = pos + 1 - (opener + ASSISTANT_OPENER)
                out[b, t, self.script[min(max(g, 0), len(self.script) - 1)]] = 30.0
        cache.lengths[rows] = start + (input_lengths if input_lengths is not None else T)
        return out

    def logits(self, hidden):
        return hidden


def scripted_llm(script: str, delay: float = 0.0) -> LLM:
    return LLM(ScriptedModel(script, delay).eval(), byte_tokenizer(), name="scripted")


def run_jobs(engine, jobs, timeout: float = 120.0) -> dict[int, dict]:
    """Submit jobs and wait for all of them; per choice index: text, finish_reason, tokens, logprobs."""
    events: dict[int, list] = defaultdict(list)
    done, lock = threading.Event(), threading.Lock()
    remaining = [len(jobs)]

    def sink(event):
        with lock:
            events[event.index].append(event)
            if event.finish_reason is not None:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    engine.submit(jobs, sink)
    assert done.wait(timeout), "the engine did not finish the jobs"
    out = {}
    for index, evs in events.items():
        out[index] = {"text": "".join(e.text for e in evs), "finish_reason": evs[-1].finish_reason,
                      "completion_tokens": evs[-1].completion_tokens, "prompt_tokens": evs[-1].prompt_tokens,
                      "logprobs": [lp for e in evs for lp in e.logprobs],
                      "prompt_logprobs": next((e.prompt_logprobs for e in evs if e.prompt_logprobs), None),
                      "events": len(evs)}
    return out


def test_scripted_model_replies_with_its_script():
    llm = scripted_llm("Hi <b>there</b>")
    assert llm.chat([{"role": "user", "content": "hello"}], temperature=0) == "Hi <b>there</b>"
    two_turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Hi"},
                 {"role": "user", "content": "b"}]
    assert llm.chat(two_turns, temperature=0, max_new_tokens=2) == "Hi"


def test_an_event_whose_text_holds_unicode_line_separators_stays_one_line():
    """httpx's iter_lines (str.splitlines) breaks on U+0085/U+2028/U+2029, which JSON leaves raw: they are escaped."""
    import json

    from scratchlm.serve.answers import sse

    text = "a\x85b\u2028c\u2029d é ✓"
    event = sse({"choices": [{"text": text}]})
    assert event.endswith("\n\n") and len(event.strip().splitlines()) == 1 and "é ✓" in event
    assert json.loads(event[len("data: "):])["choices"][0]["text"] == text
