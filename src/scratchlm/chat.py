"""Chat messages and chat templates.

A chat model was trained on conversations laid out in one exact text format (for SmolLM2:
``<|im_start|>user\\n...<|im_end|>``). Models ship that format as a Jinja template; we render it the way
HF transformers' ``apply_chat_template`` does: a sandboxed environment (templates come from model files
and must not reach Python internals), ``trim_blocks`` and ``lstrip_blocks``, a ``raise_exception`` helper and
the ``tojson`` filter, with ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token`` in scope.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from scratchlm.errors import ConfigError, ModelFileError

ROLES = ("system", "user", "assistant", "tool")

# Used for models that carry no template (for example ones trained here): ChatML, as SmolLM2 uses.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def validate_messages(messages: list[dict]) -> list[dict]:
    """Check a list of ``{"role", "content"}`` dicts; raise a ConfigError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise ConfigError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ConfigError(f"message {i} has unknown role {m['role']!r}; allowed: {', '.join(ROLES)}")
        # An assistant turn that only calls tools has content null (OpenAI's and LangChain's shape).
        if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and m.get("content") is None):
            raise ConfigError(f"message {i} content must be a string")
    return messages


def has_tool_turns(messages: list[dict]) -> bool:
    """Whether a conversation holds tool calls, tool results or null contents, which plain templates cannot
    render as they are."""
    return any(m.get("tool_calls") or m.get("role") == "tool" or m.get("content") is None for m in messages)


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, indent=None):
        return json.dumps(value, indent=indent, ensure_ascii=False)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ModelFileError(f"the model's chat template does not compile: {exc}") from None


class ChatTemplate:
    """A model's chat template: ``render(messages)`` gives the prompt text to tokenize."""

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source or DEFAULT_TEMPLATE
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tool_format: str = "generic",
               **extra) -> str:
        """The conversation as the model saw it in training, ending with the assistant's turn opened. Tool calls
        and tool results go to a template that knows tools as they are; for any other template they are written
        into the contents in ``tool_format`` (``scratchlm.tools.history_as_text``)."""
        from jinja2 import TemplateError

        validate_messages(messages)
        if has_tool_turns(messages):
            from scratchlm.tools import history_as_text, template_knows_tools

            if template_knows_tools(self.source):  # the template writes the calls: give it strings, not nulls
                messages = [dict(m, content=m.get("content") or "") for m in messages]
            else:
                messages = history_as_text(messages, tool_format)
        try:
            return _compile(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra,
            )
        except TemplateError as exc:
            raise ConfigError(f"the chat template rejected these messages: {exc}") from None
