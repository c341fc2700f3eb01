"""Prompt templates: named blanks filled from values, and few-shot prompts built from a list of examples.

    template = PromptTemplate("Question: {question}\\nAnswer:")
    template.format(question="Tom has 3 apples ...")

    few_shot = FewShotTemplate(examples, input="{question}", output="The answer is {answer}.",
                               instruction="Solve the problem.")
    few_shot.messages(question="Ben has 16 balloons ...")   # chat: one user/assistant pair per example
    few_shot.text(question="Ben has 16 balloons ...")       # one text, for base (non-chat) models

Few-shot prompting (Brown et al. 2020, "Language Models are Few-Shot Learners") shows the model worked examples
of the task before the real input; for chat models each example becomes a user turn and the assistant's reply,
so the model continues the pattern in its own turn (what LangChain's ``FewShotChatMessagePromptTemplate`` does).
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

from scratchlm.errors import ConfigError


class PromptTemplate:
    """A text with ``{name}`` blanks (``str.format`` syntax; ``{{`` and ``}}`` are literal braces)."""

    def __init__(self, template: str):
        if not isinstance(template, str):
            raise ConfigError("a prompt template must be a string")
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as exc:
            raise ConfigError(f"prompt template {template[:40]!r} does not parse ({exc}): "
                              "write literal braces as {{ and }}") from None
        if any(name == "" or not name.isidentifier() for name in fields):
            raise ConfigError(f"prompt template {template[:40]!r} has a blank that is not a name: "
                              "use {question}-style blanks, and {{ }} for literal braces")
        self.template = template
        self.variables = tuple(dict.fromkeys(fields))  # in order of first use, once each

    def format(self, **values) -> str:
        """The text with every blank filled; a missing value is a ConfigError naming it (extra values are ignored,
        so a whole example dict can be passed)."""
        missing = [name for name in self.variables if name not in values]
        if missing:
            given = ", ".join(sorted(values)) or "nothing"
            raise ConfigError(f"prompt template needs {', '.join(missing)}; got {given}")
        return self.template.format(**{name: values[name] for name in self.variables})

    def __repr__(self) -> str:
        return f"PromptTemplate({self.template!r})"


def _template(value: str | PromptTemplate) -> PromptTemplate:
    return value if isinstance(value, PromptTemplate) else PromptTemplate(value)


def select_examples(pool: Sequence[dict], k: int, seed: int | None = None) -> list[dict]:
    """``k`` examples from ``pool``: the first ``k``, or a seeded random choice when ``seed`` is given."""
    if not isinstance(k, int) or k < 0 or k > len(pool):
        raise ConfigError(f"cannot take k={k!r} examples from a pool of {len(pool)}")
    return list(pool[:k]) if seed is None else random.Random(seed).sample(list(pool), k)


class FewShotTemplate:
    """A prompt that shows ``examples`` (dicts) rendered with ``input`` and ``output`` before the real input.

    ``instruction`` opens the prompt (a system message in chat form); ``suffix`` renders the real input (default:
    the ``input`` template); ``separator`` joins the parts in text form.
    """

    def __init__(self, examples: Sequence[dict], input: str | PromptTemplate, output: str | PromptTemplate,
                 instruction: str | None = None, suffix: str | PromptTemplate | None = None,
                 separator: str = "\n\n"):
        if not isinstance(examples, Sequence) or not all(isinstance(e, dict) for e in examples):
            raise ConfigError("few-shot examples must be a list of dicts")
        self.examples = list(examples)
        self.input = _template(input)
        self.output = _template(output)
        self.suffix = _template(suffix) if suffix is not None else self.input
        self.instruction = instruction
        self.separator = separator
        for i, example in enumerate(self.examples):  # check every example now, not at the first prompt
            for part in (self.input, self.output):
                missing = [name for name in part.variables if name not in example]
                if missing:
                    raise ConfigError(f"few-shot example {i} has no {', '.join(missing)} "
                                      f"(it has {', '.join(sorted(example)) or 'nothing'})")

    def messages(self, **values) -> list[dict]:
        """Chat messages: the instruction as the system message, each example as a user turn and the assistant's
        answer, then the real input as the last user turn."""
        messages = [{"role": "system", "content": self.instruction}] if self.instruction else []
        for example in self.examples:
            messages.append({"role": "user", "content": self.input.format(**example)})
            messages.append({"role": "assistant", "content": self.output.format(**example)})
        messages.append({"role": "user", "content": self.suffix.format(**values)})
        return messages

    def text(self, **values) -> str:
        """One text: instruction, then each example's input and output on consecutive lines, then the real input
        followed by a newline, where a base model continues with the output."""
        parts = [self.instruction] if self.instruction else []
        parts += [f"{self.input.format(**e)}\n{self.output.format(**e)}" for e in self.examples]
        parts.append(self.suffix.format(**values) + "\n")
        return self.separator.join(parts)

    def __repr__(self) -> str:
        return f"FewShotTemplate({len(self.examples)} examples, input={self.input.template!r})"
