"""From OpenAI requests to engine jobs: prompts to token ids, fields to SamplingParams, limits checked.

Every check that fails raises ``ApiError`` with the HTTP status and OpenAI error fields to answer with.
"""

from __future__ import annotations

from scratchlm.errors import ScratchLMError
from scratchlm.sampling import SamplingParams
from scratchlm.serve.engine import GenerationJob
from scratchlm.serve.schemas import (
    MAX_STOP,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingRequest,
    unsupported,
)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily
MIN_TOP_P = 1e-8  # smaller top_p values act like this one: only the best token survives
MAX_PROMPTS = 256  # prompts (or embedding inputs) in one request


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _is_ids(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # JSON true is no id


def prompt_list(value, param: str) -> list[str | list[int]]:
    """A prompt (or embedding input) as a list of texts and/or token id lists."""
    if isinstance(value, str):
        items = [value]
    elif _is_ids(value) and value:
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise ApiError(400, f"{param} must not be empty", param=param)
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"{param} holds {len(items)} items; at most {MAX_PROMPTS} per request", param=param)
    return items


def encode_prompts(llm, items: list[str | list[int]], param: str) -> list[list[int]]:
    """Token ids of each text (special tokens such as ``<|im_end|>`` are recognised), ids checked."""
    vocab = llm.model.config.vocab_size
    out = []
    for item in items:
        ids = llm.tokenizer.encode(item, allowed_special="all") if isinstance(item, str) else list(item)
        if not ids:
            raise ApiError(400, f"{param} is empty: give at least one token", param=param)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} in {param} is outside the vocabulary (0..{vocab - 1})",
                           param=param)
        out.append(ids)
    return out


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template expects them: string contents, ``developer`` read as ``system``."""
    messages = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            if any(part.type != "text" or part.text is None for part in m.content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "\n".join(part.text for part in m.content)
        else:
            content = m.content if m.content is not None or m.tool_calls else ""
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        # Tool calls and the answers to them (scratchlm.tools renders them for templates that do not know tools).
        message.update({k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id),
                                          ("name", m.name)) if v is not None and m.role in ("assistant", "tool")})
        messages.append(message)
    return messages


def encode_chat(llm, body: ChatCompletionRequest) -> list[int]:
    from scratchlm.serve.tool_calls import chat_prompt, check_fits_budget, reply_schema, tool_plan

    plan = tool_plan(body)
    try:
        text = chat_prompt(llm, chat_messages(body), plan)
        ids = llm.tokenizer.encode(text, allowed_special="all")
    except ScratchLMError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    fmt = body.response_format
    schema = reply_schema(body, plan) if plan is not None else (
        fmt.json_schema.get("schema") if fmt is not None and fmt.type == "json_schema" and fmt.json_schema else None)
    if schema is not None:
        check_fits_budget(schema, body.max_completion_tokens or body.max_tokens, llm.tokenizer,
                          "tools" if plan is not None else "response_format")
    return encode_prompts(llm, [ids], "messages")[0]


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j of a seeded request with n > 1 uses seed + j (choice 0 uses the seed itself)."""
    if seed is None or j == 0:
        return seed
    return seed + j if seed + j <= 2**64 - 1 else seed - j


def _temperature(value: float | None) -> float:
    """OpenAI's default is 1. Below 1e-5, logits / temperature overflows float32 (a fuzzer found 1e-300), so
    such values mean greedy decoding, as in vLLM."""
    if value is None:
        return 1.0
    return 0.0 if value < GREEDY_BELOW else value


def sampling_params(body: SamplingRequest, max_tokens: int, seed: int | None, constraint=None) -> SamplingParams:
    stops = body.stop_strings()
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop holds {len(stops)} strings; at most {MAX_STOP}", param="stop")
    try:
        return SamplingParams(
            max_new_tokens=max(1, max_tokens),
            temperature=_temperature(body.temperature),
            top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            # A top_p that rounds to 0 in float32 (the fuzzer sent 5e-324) would drop even the best token.
            top_p=None if body.top_p is None else max(body.top_p, MIN_TOP_P), min_p=body.min_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            seed=seed, stop=stops, ignore_eos=body.ignore_eos, constraint=constraint,
        )
    except ScratchLMError as exc:
        raise ApiError(400, str(exc)) from None


def request_constraint(body: SamplingRequest):
    """The structured-output constraint of a request (``response_format`` or the ``grammar`` extension), compiled
    (and cached by its source) before any job starts; None for plain text."""
    fmt = getattr(body, "response_format", None)
    if isinstance(body, ChatCompletionRequest):
        from scratchlm.serve.tool_calls import reply_constraint, tool_plan

        plan = tool_plan(body)
        if plan is not None:  # the whole reply: calls, or an answer shaped by response_format
            if body.grammar is not None:
                raise ApiError(400, "tools and grammar together are not supported: shape the answer with "
                               "response_format", param="grammar")
            return reply_constraint(body, plan)
    if body.grammar is None and (fmt is None or fmt.type == "text"):
        return None
    from scratchlm.structured import make_constraint

    try:
        text = fmt is None or fmt.type == "text"  # plain text asks for nothing: the grammar alone applies
        return make_constraint(grammar=body.grammar, response_format=None if text else fmt.model_dump())
    except ScratchLMError as exc:
        raise ApiError(400, str(exc), param="grammar" if body.grammar is not None else "response_format") from None


def check_fits(prompt_len: int, max_tokens: int, max_len: int, param: str) -> None:
    needed = prompt_len + max(1, max_tokens)
    if needed > max_len:
        raise ApiError(
            400, f"This model's maximum context length is {max_len} tokens. However, you requested {needed} "
            f"tokens ({prompt_len} in the {param}, {max(1, max_tokens)} for the completion). "
            f"Please reduce the length of the {param} or the completion.",
            param=param, code="context_length_exceeded")


def generation_jobs(body: SamplingRequest, prompts: list[list[int]], max_len: int, capacity: int,
                    shift: bool = False) -> list:
    """One GenerationJob per (prompt, choice); choice index = prompt index x n + j, as OpenAI numbers them.
    ``shift``: the server shifts the context (``--context-shift``), so only the prompt must fit ``max_len``."""
    message = unsupported(body)
    if message:
        raise ApiError(400, message)
    chat = isinstance(body, ChatCompletionRequest)
    if chat:
        max_tokens = body.max_completion_tokens or body.max_tokens
        if body.max_tokens == 0 and not body.max_completion_tokens:
            raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        echo = False
    else:
        assert isinstance(body, CompletionRequest)
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_TOKENS
        if max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be at least 1 (0 only scores the prompt, with echo)",
                           param="max_tokens")
        logprobs, echo = body.logprobs, body.echo
    if len(prompts) * body.n > capacity:
        raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is more completions than this server takes "
                       f"at once ({capacity})", param="n")
    constraint = request_constraint(body)
    jobs = []
    for i, prompt in enumerate(prompts):
        tokens = max_tokens if max_tokens is not None else max_len - len(prompt)  # chat default: all that fits
        check_fits(len(prompt), 1 if shift else tokens, max_len, "messages" if chat else "prompt")
        for j in range(body.n):
            params = sampling_params(body, tokens, choice_seed(body.seed, j), constraint)
            jobs.append(GenerationJob(prompt, params, tokens, index=i * body.n + j, logprobs=logprobs,
                                      prompt_logprobs=echo and logprobs is not None))
    return jobs


def embedding_inputs(llm, body: EmbeddingRequest, context_length: int) -> list[list[int]]:
    if body.dimensions is not None and body.dimensions != llm.model.config.d_model:
        raise ApiError(400, f"dimensions must be {llm.model.config.d_model} (this model's hidden size) or unset",
                       param="dimensions")
    inputs = encode_prompts(llm, prompt_list(body.input, "input"), "input")
    for ids in inputs:
        if len(ids) > context_length:
            raise ApiError(400, f"This model's maximum context length is {context_length} tokens. However, an "
                           f"input has {len(ids)} tokens. Please shorten it.", param="input",
                           code="context_length_exceeded")
    return inputs


def validate_model(name: str, served: str) -> None:
    if name != served:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")
