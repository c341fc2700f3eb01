"""OpenAI API request types (validated with pydantic, so ``/openapi.json`` describes them) and the JSON
shapes of the answers, field for field as https://platform.openai.com/docs/api-reference gives them.

Requests accept fields we do not implement without failing, unless ignoring them would change the answer:
see ``unsupported`` below and the "Serving" section of README.md.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed accepts

TokenIds = list[int]
PromptInput = str | list[str] | TokenIds | list[TokenIds]


class Strict(BaseModel):
    """Base of the request models: unknown fields are ignored (not rejected), as most servers do."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str = Field(description="the served model's id, as /v1/models lists it")
    max_tokens: int | None = Field(None, ge=0, description="most tokens to generate")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension: keep the k best tokens (0 or -1 = off)")
    min_p: float | None = Field(None, ge=0, le=1, description="extension: drop tokens below min_p x the best")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="extension: CTRL penalty, 1 = off")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end the text")
    ignore_eos: bool = Field(False, description="extension: keep going past the end-of-sequence token")
    seed: int | None = Field(None, **SEED_RANGE)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    user: str | None = Field(None, description="accepted and ignored")
    grammar: str | None = Field(None, description="extension: a GBNF grammar the output must match "
                                                   "(docs/structured-output.md)")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: PromptInput = Field(description="text, list of texts, token ids, or list of token id lists")
    echo: bool = Field(False, description="put the prompt before the completion (and score it with logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    best_of: int | None = Field(None, ge=1, description="only equal to n (or 1) is supported")
    suffix: str | None = Field(None, description="not supported: must be empty")
    response_format: ResponseFormat | None = Field(None, description="extension: as on /v1/chat/completions")


class ContentPart(Strict):
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant turn's calls (OpenAI's shape)")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")


class ResponseFormat(Strict):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}`` (structured output: scratchlm.structured)."""

    type: str = "text"
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(None, description="functions the model may call (docs/tools.md)")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty (use tools)")
    tool_choice: str | dict[str, Any] | None = Field(None, description="none, auto, required, a function "
                                                     "{type, function: {name}} or allowed_tools")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per reply")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    modalities: list[str] | None = Field(None, description="only ['text']")
    audio: dict[str, Any] | None = Field(None, description="not supported")


class EmbeddingRequest(Strict):
    """POST /v1/embeddings."""

    model: str
    input: PromptInput = Field(description="text, list of texts, token ids, or list of token id lists")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's hidden size")
    user: str | None = None


def unsupported(body: SamplingRequest) -> str | None:
    """The first field set to something this server cannot honour, as an error message (or None)."""
    checks: list[tuple[str, bool]] = [("logit_bias", bool(body.logit_bias))]
    if isinstance(body, CompletionRequest):
        checks += [("suffix", bool(body.suffix)), ("best_of", body.best_of not in (None, 1, body.n))]
    if isinstance(body, ChatCompletionRequest):
        checks += [
            ("functions", bool(body.functions)),
            ("modalities", body.modalities not in (None, ["text"])), ("audio", body.audio is not None),
        ]
    for name, bad in checks:
        if bad:
            return f"{name} is not supported by this server (see its README, section Serving)"
    return None


# ---- answers ---------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage block; ``prompt_tokens_details.cached_tokens`` counts prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def completion_logprobs(entries: list, token_text, offset: int, tokenizer, prompt_count: int = 0) -> dict:
    """The legacy /v1/completions logprobs block: parallel lists, one item per token.

    ``offset`` is the character position where the first token's text starts; the first ``prompt_count``
    entries are the echoed prompt's. Offsets count characters as the reply's text holds them: the prompt as
    ``tokenizer.decode`` writes it (special tokens included), the completion as generation released it
    (special tokens skipped), each decoded on its own; a token holding half a UTF-8 character advances the
    offset only when the character completes.
    """
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    decoder = tokenizer.stream_decoder(skip_special=False)
    for i, entry in enumerate(entries):
        if i == prompt_count:  # the completion's text starts after the whole prompt text
            offset += len(decoder.flush())
            decoder = tokenizer.stream_decoder(skip_special=True)
        tokens.append(token_text(entry.token_id))
        token_logprobs.append(entry.logprob)
        top_logprobs.append(None if entry.logprob is None else {token_text(t): lp for t, lp in entry.top})
        text_offset.append(offset)
        offset += len(decoder.push(entry.token_id))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(entries: list, token_text, token_bytes) -> dict:
    """The chat logprobs block: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    def item(token_id: int, logprob: float) -> dict:
        return {"token": token_text(token_id), "logprob": logprob, "bytes": list(token_bytes(token_id))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def embedding_item(index: int, vector: torch.Tensor, encoding_format: str) -> dict:
    """One embedding; ``base64`` is the little-endian float32 bytes, as the openai client decodes them."""
    if encoding_format == "base64":
        data: Any = base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode("ascii")
    else:
        data = vector.float().tolist()
    return {"object": "embedding", "index": index, "embedding": data}
