"""From engine events to OpenAI answers: one JSON body, or server-sent events ending in ``data: [DONE]``.

Streams follow OpenAI's chunk shapes: chat streams open every choice with ``delta: {"role": "assistant"}``,
send text as ``delta: {"content": ...}`` and close each choice with an empty delta and its
``finish_reason``; with ``stream_options.include_usage`` every chunk carries ``"usage": null`` and a last
chunk with no choices carries the usage.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from scratchlm.serve.engine import Event
from scratchlm.serve.schemas import (
    ChatCompletionRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    usage,
)
from scratchlm.serve.tool_calls import tool_plan
from scratchlm.tool_stream import ToolStream
from scratchlm.tools import parse_reply


class _Choice:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list = []
        self.prompt_logprobs: list | None = None
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.started = False
        self.tool_stream = None  # a ToolStream when the request may call tools


class Answer:
    """Collects the events of one request's choices and writes them in the shape of ``kind``."""

    def __init__(self, state, kind: str, body, prompts: list[list[int]], items: list | None):
        self.kind, self.body, self.prompts = kind, body, prompts
        self.tokenizer = state.llm.tokenizer
        self.model = body.model  # the base model's name or an adapter's (checked by the route)
        self.id = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        self.created = now()
        self.chat = isinstance(body, ChatCompletionRequest)
        self.want_logprobs = body.logprobs if self.chat else body.logprobs is not None
        self.echo = not self.chat and body.echo
        # The prompt's own text, put before the completion with echo (ids are decoded).
        # (also where logprobs' text_offset starts counting: offsets are positions in prompt + completion).
        self.prompt_texts = [it if isinstance(it, str) else self.tokenizer.decode(p)
                             for it, p in zip(items or [None] * len(prompts), prompts)
                             ] if not self.chat and (self.echo or self.want_logprobs) else []
        self.choices = {i: _Choice() for i in range(len(prompts) * body.n)}
        # With tools the reply is scratchlm.tools' generic JSON: read back into content or tool_calls.
        self.tools = self.chat and tool_plan(body) is not None
        for c in self.choices.values() if self.tools else ():
            c.tool_stream = ToolStream()
        self.error: str | None = None
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None

    # ---- accumulating -------------------------------------------------------------------------------
    def add(self, event: Event) -> None:
        choice = self.choices[event.index]
        if event.error:
            self.error = event.error
        if event.text and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        choice.text.append(event.text)
        choice.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            choice.prompt_logprobs = event.prompt_logprobs
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            choice.completion_tokens = event.completion_tokens
            choice.cached_tokens = event.cached_tokens

    def usage(self) -> dict:
        # Each prompt counts once, however many choices it has; its cached tokens are those every choice reused.
        n = self.body.n
        cached = sum(min(self.choices[i * n + j].cached_tokens for j in range(n)) for i in range(len(self.prompts)))
        return usage(sum(len(p) for p in self.prompts), sum(c.completion_tokens for c in self.choices.values()),
                     cached)

    def log_fields(self) -> dict:
        fields = {"id": self.id, "completion_tokens": self.usage()["completion_tokens"],
                  "finish_reasons": sorted({c.finish_reason or "cancelled" for c in self.choices.values()})}
        if self.first_token_at is not None:
            fields["ttft_ms"] = round((self.first_token_at - self.started_at) * 1000, 1)
        return fields

    # ---- logprob blocks -----------------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        """A token's text; one that is not whole UTF-8 characters is written ``bytes:\\xe2\\x80`` as OpenAI
        does, which keeps distinct tokens distinct in the ``top_logprobs`` dictionaries."""
        raw = self.tokenizer.bytes_of(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _logprobs(self, index: int, entries: list, prompt_entries: list | None, offset: int) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries, self._token_text, self.tokenizer.bytes_of)
        return completion_logprobs((prompt_entries or []) + entries, self._token_text, offset, self.tokenizer,
                                   len(prompt_entries or []))

    def _prompt_text(self, index: int) -> str:
        return self.prompt_texts[index // self.body.n] if self.prompt_texts else ""

    def _echo(self, index: int) -> str:
        return self._prompt_text(index) if self.echo else ""

    # ---- the whole answer ---------------------------------------------------------------------------
    def response(self) -> dict:
        choices = []
        for i, c in sorted(self.choices.items()):
            text = "".join(c.text)
            offset = 0 if self.echo else len(self._prompt_text(i))
            block = self._logprobs(i, c.logprobs, c.prompt_logprobs if self.echo else None, offset)
            if self.chat:
                message, finish = {"role": "assistant", "content": text, "refusal": None}, c.finish_reason
                if self.tools:
                    message["content"], calls = parse_reply(text)
                    if calls:
                        message["tool_calls"] = calls
                        finish = "tool_calls" if finish == "stop" else finish
                choices.append({"index": i, "message": message, "logprobs": block, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": self._echo(i) + text, "logprobs": block,
                                "finish_reason": c.finish_reason})
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, "usage": self.usage()}

    # ---- stream chunks ------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.body.include_usage():
            chunk["usage"] = None
        return chunk

    def opening_chunks(self) -> list[dict]:
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in sorted(self.choices)]

    def event_chunks(self, event: Event) -> list[dict]:
        c = self.choices[event.index]
        first = not c.started
        c.started = True
        chunks = []
        if self.chat and self.tools:
            return self._tool_chunks(event, c)
        if self.chat:
            if event.text or event.logprobs:
                block = self._logprobs(event.index, event.logprobs, None, 0)
                chunks.append(self._chunk([{"index": event.index, "delta": {"content": event.text},
                                            "logprobs": block, "finish_reason": None}]))
            if event.finish_reason:
                chunks.append(self._chunk([{"index": event.index, "delta": {}, "logprobs": None,
                                            "finish_reason": event.finish_reason}]))
            return chunks
        echo = self._echo(event.index) if first else ""
        prompt_entries = event.prompt_logprobs if (first and self.echo) else None
        offset = 0 if prompt_entries is not None else len(self._prompt_text(event.index)) + sum(
            len(t) for t in c.text[:-1])
        block = self._logprobs(event.index, event.logprobs, prompt_entries, offset)
        return [self._chunk([{"index": event.index, "text": echo + event.text, "logprobs": block,
                              "finish_reason": event.finish_reason}])]

    def _tool_chunks(self, event: Event, c: _Choice) -> list[dict]:
        """OpenAI's tool-call deltas (or content deltas for an answer) from the generic reply's growing text."""
        deltas = c.tool_stream.feed(event.text) if event.text else []
        block = self._logprobs(event.index, event.logprobs, None, 0) if event.logprobs else None
        if block is not None and not deltas:
            deltas = [{}]
        chunks = [self._chunk([{"index": event.index, "delta": d, "logprobs": block if k == 0 else None,
                                "finish_reason": None}]) for k, d in enumerate(deltas)]
        if event.finish_reason:
            finish = event.finish_reason
            if finish == "stop" and c.tool_stream.ids:
                finish = "tool_calls"
            chunks.append(self._chunk([{"index": event.index, "delta": {}, "logprobs": None,
                                        "finish_reason": finish}]))
        return chunks

    def usage_chunk(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = self.usage()
        return chunk


# Characters that JSON leaves unescaped but that clients splitting lines with str.splitlines() (httpx's iter_lines,
# for one) take for line breaks, cutting an event in two; a random or multilingual model can produce them.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict | str) -> str:
    """One server-sent event: ``data: JSON`` and a blank line (UTF-8 kept, line-breaking characters escaped)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


async def stream_events(run, answer: Answer, log: dict) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer. Closing this generator (the client left) cancels the
    request's jobs, which frees their batch slots before the engine's next step."""
    try:
        for chunk in answer.opening_chunks():
            yield sse(chunk)
        async for event in run.events():
            answer.add(event)
            if event.error:
                yield sse(error_body(event.error, type="server_error"))
                break
            for chunk in answer.event_chunks(event):
                yield sse(chunk)
        else:
            if answer.body.include_usage():
                yield sse(answer.usage_chunk())
        yield sse("[DONE]")
    finally:
        run.close()
        log.update(answer.log_fields())
