"""Tools on /v1/chat/completions: from a request's ``tools``, ``tool_choice``, ``parallel_tool_calls`` and
``response_format`` to the prompt and the whole-reply constraint (scratchlm.tools' generic format), and the check
that a constrained reply can fit in ``max_tokens`` at all.

Every failure raises ``ApiError`` (400, OpenAI's error shape) naming the field at fault.
"""

from __future__ import annotations

import weakref

from scratchlm.errors import ScratchLMError
from scratchlm.structured.grammar import Alt, Bytes, ByteSet, Grammar, Ref, Repeat, Seq
from scratchlm.tools import ToolPlan, check_tools, output_schema, plan_tools, render_prompt, response_schema_of


def _api_error(message: str, param: str):
    from scratchlm.serve.jobs import ApiError

    return ApiError(400, message, param=param)


def tool_plan(body) -> ToolPlan | None:
    """The request's plan when it may call tools (tool_choice not "none"), else None."""
    if not body.tools and body.tool_choice in (None, "none"):
        return None
    try:
        plan = plan_tools(body.tools or [], body.tool_choice, body.parallel_tool_calls)
        check_tools(list(plan.tools))
    except ScratchLMError as exc:
        param = "tool_choice" if "tool_choice" in str(exc) else "tools"
        raise _api_error(str(exc), param) from None
    return plan if plan.mode != "none" else None


def reply_schema(body, plan: ToolPlan) -> dict:
    """The JSON schema of the whole reply: calls to the allowed tools, or (mode auto) an answer shaped by the
    request's response_format."""
    fmt = body.response_format.model_dump() if body.response_format is not None else None
    try:
        return output_schema(plan, response_schema_of(fmt))
    except ScratchLMError as exc:
        raise _api_error(str(exc), "response_format") from None


def reply_constraint(body, plan: ToolPlan):
    from scratchlm.structured import json_schema_constraint

    try:
        return json_schema_constraint(reply_schema(body, plan))
    except ScratchLMError as exc:
        raise _api_error(str(exc), "tools") from None


def chat_prompt(llm, messages: list[dict], plan: ToolPlan | None) -> str:
    """The prompt text, with the tools and the reply format when the request may call tools."""
    return render_prompt(llm.template, messages, plan or ToolPlan((), "none"))


# ---- does the reply fit? -------------------------------------------------------------------------------------
def shortest_bytes(grammar: Grammar) -> int:
    """The length in bytes of the shortest text the grammar matches (a fixed point over its rules)."""
    best: dict[str, float] = {name: float("inf") for name in grammar.rules}

    def size(expr) -> float:
        if isinstance(expr, Bytes):
            return len(expr.data)
        if isinstance(expr, ByteSet):
            return 1
        if isinstance(expr, Ref):
            return best[expr.name]
        if isinstance(expr, Seq):
            return sum(size(i) for i in expr.items)
        if isinstance(expr, Alt):
            return min(size(i) for i in expr.items)
        if isinstance(expr, Repeat):
            return expr.min * size(expr.item) if expr.min else 0
        raise TypeError(expr)

    changed = True
    while changed:
        changed = False
        for name, expr in grammar.rules.items():
            n = size(expr)
            if n < best[name]:
                best[name], changed = n, True
    return int(best[grammar.root])


_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def longest_token_bytes(tokenizer) -> int:
    if tokenizer not in _LONGEST:
        _LONGEST[tokenizer] = max(len(tokenizer.bytes_of(i, skip_special=True)) for i in range(tokenizer.vocab_size))
    return _LONGEST[tokenizer]


def check_fits_budget(schema, max_tokens: int | None, tokenizer, param: str) -> None:
    """A 400 when no text of ``schema`` fits in ``max_tokens`` tokens, even made of the vocabulary's longest ones
    (a lower bound: a reply that passes may still be cut, and then ends with finish_reason "length")."""
    if max_tokens is None:
        return
    from scratchlm.structured.json_schema import json_schema_grammar

    need = shortest_bytes(json_schema_grammar(schema))
    longest = longest_token_bytes(tokenizer)
    if need > max_tokens * longest:
        raise _api_error(f"the shortest reply that {param} allows is {need} bytes, more than max_tokens="
                         f"{max_tokens} tokens can hold (at most {longest} bytes each): raise max_tokens or "
                         "loosen the schema", param)
