"""Supervised fine-tuning data: conversations -> token ids with a loss mask on the assistant's tokens.

Two JSONL layouts, one example per line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "...", "completion": "..."}          (optional "system"; becomes user + assistant messages)

Each conversation is rendered with the model's own chat template, exactly as at inference: the text
before an assistant turn is what ``render(messages[:i], add_generation_prompt=True)`` gives, and the
turn itself (its content and end-of-turn token) is what rendering one more message adds. Those pieces are
tokenized one by one, so the prompt's ids equal the ids ``LLM.chat`` feeds the model, and only the
assistant pieces are learned: every other target is -100, which the loss ignores.

Batches pad on the right to the longest example of the batch (targets -100 on padding). With a causal
model right padding needs no attention mask: a real token never attends to a later position, so the
padding after it cannot change it. Examples of similar length are batched together to waste little.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchlm.chat import ROLES, ChatTemplate
from scratchlm.errors import ConfigError, DataError
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.sources import jsonl_objects

IGNORE = -100
TOO_LONG = ("truncate", "skip")


@dataclass
class Example:
    """One tokenized conversation: ``ids`` and, per id, whether it is learned (an assistant token)."""

    ids: list[int]
    learn: list[bool]
    line: int = 0

    def inputs_and_targets(self) -> tuple[list[int], list[int]]:
        """``ids[:-1]`` and the next-token targets ``ids[1:]``, -100 where the next token is not learned."""
        targets = [t if keep else IGNORE for t, keep in zip(self.ids[1:], self.learn[1:])]
        return self.ids[:-1], targets


@dataclass
class DataStats:
    """What reading a file found: counts that the CLI reports."""

    examples: int = 0
    too_long: int = 0
    truncated: int = 0
    skipped: int = 0
    tokens: int = 0
    learned_tokens: int = 0
    skipped_lines: list[int] = field(default_factory=list)

    def describe(self, max_length: int) -> str:
        text = f"{self.examples} examples, {self.tokens:,} tokens ({self.learned_tokens:,} assistant tokens learned)"
        if self.too_long:
            text += (f"; {self.too_long} longer than {max_length} tokens: {self.truncated} truncated, "
                     f"{self.skipped} skipped")
            if self.skipped_lines:
                text += f" (lines {', '.join(map(str, self.skipped_lines[:5]))}{', ...' if self.skipped > 5 else ''})"
        return text


# ---- reading ------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; a DataError names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            records = list(jsonl_objects(f, path))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not records:
        raise DataError(f"{path} holds no examples: write one JSON object per line")
    return records


def to_messages(record: dict, where: str) -> list[dict]:
    """The conversation of a record in either layout, checked; ``where`` ("file, line N") prefixes errors."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages += [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages += [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    else:
        raise DataError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": ...}}, "
                        f"got the keys {sorted(record)}")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m['role']!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; add an "
                        "assistant message (or a \"completion\")")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant turn; put a user (or system) "
                        "message before it")
    return messages


def render_example(messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer, where: str = "") -> Example:
    """Token ids of a conversation and which of them are the assistant's (see the module docstring)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]  # messages after the last assistant turn teach nothing
    ids: list[int] = []
    learn: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the model's chat template does not render this conversation as growing "
                            "prefixes, so the assistant's tokens cannot be located; use a model whose template "
                            "does (ChatML, Llama, ...)")
        for text, is_answer in ((prompt[len(done):], False), (full[len(prompt):], True)):
            piece = tokenizer.encode(text, allowed_special="all") if text else []
            ids += piece
            learn += [is_answer] * len(piece)
        done = full
    return Example(ids, learn)


def load_examples(path: str | Path, template: ChatTemplate, tokenizer: Tokenizer, max_length: int,
                  too_long: str = "truncate") -> tuple[list[Example], DataStats]:
    """Read, render and tokenize a JSONL file; examples over ``max_length`` ids are cut or dropped.

    A truncated example keeps its first ``max_length`` ids; one left with no assistant token to learn is
    skipped. ``too_long="skip"`` drops every example that does not fit.
    """
    if too_long not in TOO_LONG:
        raise ConfigError(f"too_long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 tokens, got {max_length}")
    stats = DataStats()
    examples = []
    for number, record in read_jsonl(path):
        where = f"{path}, line {number}"
        example = render_example(to_messages(record, where), template, tokenizer, where)
        example.line = number
        if len(example.ids) > max_length:
            stats.too_long += 1
            if too_long == "truncate":
                example = Example(example.ids[:max_length], example.learn[:max_length], number)
            if too_long == "skip" or not any(example.learn[1:]):
                stats.skipped += 1
                stats.skipped_lines.append(number)
                continue
            stats.truncated += 1
        stats.examples += 1
        stats.tokens += len(example.ids)
        stats.learned_tokens += sum(example.learn[1:])
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: every example was skipped as longer than {max_length} tokens; raise "
                        "--max-length or shorten the examples")
    return examples, stats


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random validation split: ``val_fraction`` of the examples (at least one, if two or more)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(examples) < 2:
        return examples, []
    order = np.random.default_rng([seed, 1]).permutation(len(examples))
    n_val = max(1, int(round(len(examples) * val_fraction)))
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


# ---- batches ------------------------------------------------------------------------------------------------
def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, targets)`` [B, T]; padding has target -100."""
    pairs = [e.inputs_and_targets() for e in examples]
    width = max(len(x) for x, _ in pairs)
    x = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for row, (ids, targets) in enumerate(pairs):
        x[row, : len(ids)] = torch.tensor(ids)
        y[row, : len(targets)] = torch.tensor(targets)
    return x, y


class SFTBatches:
    """Endless ``(input_ids, targets)`` batches, epoch after epoch, each epoch a fresh seeded order.

    Within an epoch the shuffled examples are taken ``batch_size * 16`` at a time, sorted by length and cut
    into batches (little padding), and the batches are shuffled again. Batch k of epoch e is a pure
    function of (seed, e, k), so ``state_dict`` (those three numbers) is all an exact resume needs.
    """

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, seed: int = 0):
        if not examples:
            raise DataError("no training examples")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.epoch, self.index = 0, 0
        self._plan: list[list[int]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def _epoch_plan(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.examples)).tolist()
        batches = []
        window = self.batch_size * 16
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: len(self.examples[i].ids))
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    collate = staticmethod(collate)  # examples -> (input ids, targets); a subclass batches other examples

    def __iter__(self) -> SFTBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._plan is None:
            self._plan = self._epoch_plan()
        if self.index >= len(self._plan):
            self.epoch, self.index = self.epoch + 1, 0
            self._plan = self._epoch_plan()
        batch = [self.examples[i] for i in self._plan[self.index]]
        self.index += 1
        return self.collate(batch, self.pad_id)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._plan = None


def fixed_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: every example once, sorted by length (the same batches at every evaluation)."""
    ordered = sorted(examples, key=lambda e: len(e.ids))
    return [collate(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
