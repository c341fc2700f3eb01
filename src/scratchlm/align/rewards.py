"""Where RL rewards come from: a trained reward model directory, or a Python function named on the command line.

    reward = load_reward("runs/rm/best")                       # a head model from `scratchlm align reward`
    reward = load_reward("scratchlm.align.rewards:final_number_reward")   # module:function
    reward = load_reward("my_rewards.py:is_polite")            # a .py file:function
    scores = reward(prompts, texts)                            # one float per completion

A function is called once per completion as ``function(prompt, completion)``, where ``prompt`` is the record's
``"prompt"`` as written in the prompts file (a string, or a list of messages) and ``completion`` the generated
text; it returns a number. A reward model scores the conversation rendered with its own chat template: the
prompt's messages and the completion as the assistant's turn, as the model was trained on.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from scratchlm.errors import ConfigError, DataError

RewardFn = Callable[[list, list[str]], list[float]]


def load_reward(spec: str, dtype: str = "float32", batch_size: int = 16) -> RewardFn:
    """A reward from ``spec``: a reward-model directory, ``module:function`` or ``path.py:function``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return model_reward(path, dtype, batch_size)
    if ":" not in spec:
        raise ConfigError(f"--reward {spec!r} is neither a reward-model directory nor module:function (for example "
                          "scratchlm.align.rewards:final_number_reward or my_rewards.py:score)")
    return function_reward(_import_function(spec))


def _import_function(spec: str) -> Callable:
    module_name, _, function_name = spec.rpartition(":")
    if module_name.endswith(".py"):
        file = Path(module_name).expanduser()
        if not file.is_file():
            raise ConfigError(f"--reward {spec!r}: {file} does not exist")
        name = f"scratchlm_reward_{file.stem}"
        module_spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"--reward {spec!r}: cannot import {module_name!r} ({exc}); give module:function with "
                              "the module on the Python path, or path/to/file.py:function") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"--reward {spec!r}: {module_name} has no function {function_name!r}")
    return function


def function_reward(function: Callable) -> RewardFn:
    """Wrap ``function(prompt, completion) -> float`` as a batch reward; a non-number answer is an error."""
    def score(prompts: list, texts: list[str]) -> list[float]:
        out = []
        for prompt, text in zip(prompts, texts):
            value = function(prompt, text)
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"the reward function {getattr(function, '__name__', function)} returned {value!r} "
                                f"for the completion {text[:60]!r}: it must return a finite number")
            out.append(value)
        return out

    return score


def model_reward(directory: Path, dtype: str = "float32", batch_size: int = 16) -> RewardFn:
    """The scalar head of a reward model directory (``heads.save_head_model``) as a batch reward."""
    from scratchlm.finetune.data import render_example
    from scratchlm.heads import load_head_model

    head_model, llm = load_head_model(directory, dtype=dtype)
    if head_model.n_outputs != 1:
        raise ConfigError(f"{directory} has {head_model.n_outputs} outputs; a reward model has one")
    head_model.requires_grad_(False)
    pad = llm.tokenizer.eos_id if llm.tokenizer.eos_id is not None else 0

    @torch.no_grad()
    def score(prompts: list, texts: list[str]) -> list[float]:
        out = []
        for start in range(0, len(texts), batch_size):
            ids = []
            for prompt, text in zip(prompts[start:start + batch_size], texts[start:start + batch_size]):
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                # Rendered as `align score` renders a conversation, so the head reads what it was trained on.
                example = render_example(messages + [{"role": "assistant", "content": text}], llm.template,
                                         llm.tokenizer)
                ids.append(example.ids[:llm.config.context_length])
            lengths = torch.tensor([len(i) for i in ids])
            batch = torch.full((len(ids), int(lengths.max())), pad, dtype=torch.long)
            for row, i in enumerate(ids):
                batch[row, :len(i)] = torch.tensor(i)
            out += head_model(batch, lengths)[:, 0].float().tolist()
        return out

    return score


# ---- rewards a program can check (for --reward scratchlm.align.rewards:NAME) ---------------------------------
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def prompt_text(prompt: str | list[dict]) -> str:
    """The text of a prompt as the prompts file holds it: the string, or its last user message."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


def final_number_reward(prompt: str | list[dict], completion: str) -> float:
    """1 when the last number in the completion equals the answer of the arithmetic in the prompt, else 0.

    The prompt holds an expression of integers, ``+``, ``-`` and ``*`` (``scripts/make_arithmetic.py``), for
    example "What is 17 + 25 * 3? Answer with the number only."; the expression is the longest run of digits,
    operators and spaces, evaluated with Python's precedence (never with eval).
    """
    expression = _expression(prompt_text(prompt))
    numbers = _NUMBER.findall(completion.replace(",", ""))
    if expression is None or not numbers:
        return 0.0
    return 1.0 if float(numbers[-1]) == float(_evaluate(expression)) else 0.0


def _expression(text: str) -> list[str] | None:
    runs = re.findall(r"\d+(?:\s*[-+*]\s*\d+)+", text)
    if not runs:
        return None
    return re.findall(r"\d+|[-+*]", max(runs, key=len))


def _evaluate(tokens: list[str]) -> int:
    """Integer +, -, * with * first (a two-level precedence parser: sums of products)."""
    total, term, sign = 0, int(tokens[0]), 1
    for op, value in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            term *= int(value)
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), int(value)
    return total + sign * term
