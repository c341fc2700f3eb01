"""Preference data: (prompt, chosen, rejected) triples -> token ids, with the loss on the response tokens only.

TRL's preference format, one JSON object per line, in either layout:

    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I like turtles."}
    {"prompt": [{"role": "system", ...}, {"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "I like turtles."}]}

Both are rendered with the model's chat template, as ``finetune`` renders conversations (a plain prompt becomes
one user message, a plain answer one assistant turn): the prompt is ``render(prompt, add_generation_prompt=True)``
and a response is what rendering the assistant turn adds to it (its text and the end-of-turn token), so the
prompt's ids are those ``LLM.chat`` feeds the model. TRL renders conversational data the same way; it leaves
plain strings unrendered, which suits base models, not the chat models aligned here.

Batches hold each pair twice, chosen rows first, then rejected rows (TRL's "concatenated" layout: one forward
for both). Sequences longer than ``max_length`` are cut to their first ``max_length`` ids (a pair whose prompt
leaves no response token is skipped) or, with ``too_long="skip"``, dropped; the counts are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchlm.chat import ChatTemplate
from scratchlm.errors import ConfigError, DataError
from scratchlm.finetune.data import IGNORE, TOO_LONG, SFTBatches, read_jsonl, to_messages
from scratchlm.tokenizer import Tokenizer

KEYS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    """One tokenized preference: the shared prompt and the two responses (each ending with end-of-turn)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    line: int = 0

    @property
    def ids(self) -> list[int]:
        """The longer full sequence (batching sorts pairs by its length)."""
        return self.prompt + max(self.chosen, self.rejected, key=len)

    def sequences(self) -> tuple[list[int], list[int]]:
        return self.prompt + self.chosen, self.prompt + self.rejected


@dataclass
class PreferenceStats:
    """What reading a file found, for the CLI to report."""

    pairs: int = 0
    too_long: int = 0
    truncated: int = 0
    skipped: int = 0
    tokens: int = 0
    skipped_lines: list[int] = field(default_factory=list)

    def describe(self, max_length: int) -> str:
        text = f"{self.pairs} preference pairs, {self.tokens:,} tokens"
        if self.too_long:
            text += (f"; {self.too_long} with a sequence longer than {max_length} tokens: {self.truncated} truncated, "
                     f"{self.skipped} skipped")
            if self.skipped_lines:
                text += f" (lines {', '.join(map(str, self.skipped_lines[:5]))}{', ...' if self.skipped > 5 else ''})"
        return text


# ---- reading ------------------------------------------------------------------------------------------------
def _turns(value, key: str, where: str) -> list[dict]:
    """A prompt or a response as messages: a string becomes one message, a list is checked by ``to_messages``."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: \"{key}\" is empty")
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: \"{key}\" must be a string or a non-empty list of {{\"role\", \"content\"}} "
                        f"messages, got {type(value).__name__}")
    return value


def to_preference(record: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen turn, rejected turn) of one record, checked; ``where`` prefixes errors."""
    missing = [k for k in KEYS if k not in record]
    if missing:
        hint = " (an implicit prompt inside chosen/rejected is not read: give \"prompt\")" if "prompt" in missing \
            else ""
        raise DataError(f"{where}: expected {{\"prompt\", \"chosen\", \"rejected\"}}, missing "
                        f"{', '.join(missing)}{hint}")
    prompt = _turns(record["prompt"], "prompt", where)
    if record.get("system") and isinstance(record["prompt"], str):
        prompt = [{"role": "system", "content": record["system"]}] + prompt
    responses = []
    for key in ("chosen", "rejected"):
        turn = _turns(record[key], key, where)
        if [m.get("role") for m in turn if isinstance(m, dict)] != ["assistant"] * len(turn):
            raise DataError(f"{where}: \"{key}\" must hold assistant messages only (the prompt holds the rest)")
        responses.append(turn)
    if prompt[-1].get("role") == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant message; it should end with the user's turn")
    # to_messages checks roles and contents and that the conversation is well formed.
    to_messages({"messages": prompt + responses[0]}, where)
    to_messages({"messages": prompt + responses[1]}, where)
    if responses[0] == responses[1]:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are identical, so the pair teaches nothing; fix or "
                        "remove the line")
    return prompt, responses[0], responses[1]


def check_preferences(path: str | Path) -> int:
    """Check every line of a preference file without tokenizing (fast, before loading a model); returns the count."""
    records = read_jsonl(path)
    for number, record in records:
        to_preference(record, f"{path}, line {number}")
    return len(records)


def render_pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], template: ChatTemplate,
                tokenizer: Tokenizer, where: str = "") -> PreferencePair:
    """Token ids of the prompt and of each response (see the module docstring)."""
    prompt_text = template.render(prompt, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt_text, allowed_special="all")
    responses = []
    for response in (chosen, rejected):
        full = template.render(prompt + response, add_generation_prompt=False)
        if not full.startswith(prompt_text) or len(full) == len(prompt_text):
            raise DataError(f"{where}: the model's chat template does not render the answer after the prompt, so "
                            "its tokens cannot be located; use a model whose template does (ChatML, Llama, ...)")
        responses.append(tokenizer.encode(full[len(prompt_text):], allowed_special="all"))
    chosen_ids, rejected_ids = responses
    if chosen_ids == rejected_ids:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" give the same tokens, so the pair teaches nothing")
    return PreferencePair(prompt_ids, chosen_ids, rejected_ids)


def load_preferences(path: str | Path, template: ChatTemplate, tokenizer: Tokenizer, max_length: int,
                     too_long: str = "truncate") -> tuple[list[PreferencePair], PreferenceStats]:
    """Read, render and tokenize a preference JSONL file; pairs with a sequence over ``max_length`` ids are cut
    (each sequence keeps its first ``max_length`` ids) or dropped."""
    if too_long not in TOO_LONG:
        raise ConfigError(f"too_long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 tokens, got {max_length}")
    stats = PreferenceStats()
    pairs = []
    for number, record in read_jsonl(path):
        where = f"{path}, line {number}"
        pair = render_pair(*to_preference(record, where), template, tokenizer, where)
        pair.line = number
        longest = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
        if longest > max_length:
            stats.too_long += 1
            room = max_length - len(pair.prompt)
            if too_long == "skip" or room < 1:
                stats.skipped += 1
                stats.skipped_lines.append(number)
                continue
            pair = PreferencePair(pair.prompt, pair.chosen[:room], pair.rejected[:room], number)
            stats.truncated += 1
        stats.pairs += 1
        stats.tokens += 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: every pair was skipped as longer than {max_length} tokens; raise --max-length or "
                        "shorten the examples")
    return pairs, stats


def split_pairs(pairs: list[PreferencePair], val_fraction: float, seed: int
                ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A seeded random validation split, by ``finetune.data.split_examples``'s rule."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(pairs) < 2:
        return pairs, []
    order = np.random.default_rng([seed, 1]).permutation(len(pairs))
    n_val = max(1, int(round(len(pairs) * val_fraction)))
    val = set(order[:n_val].tolist())
    return [p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val]


# ---- batches ------------------------------------------------------------------------------------------------
@dataclass
class PairTargets:
    """What a preference batch carries beside its input ids [2B, T] (chosen rows, then rejected rows).

    ``targets`` [2B, T]: the next-token targets, -100 outside the responses (and on padding); ``lengths`` [2B]: real
    tokens per row of the input ids; ``ref_logps`` [2B]: the reference model's log-probability of each row's
    response (DPO), or None. ``to`` moves it as the training loop moves a target tensor.
    """

    targets: torch.Tensor
    lengths: torch.Tensor
    ref_logps: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> PairTargets:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return PairTargets(move(self.targets), move(self.lengths), move(self.ref_logps))


def collate_pairs(pairs: list[PreferencePair], pad_id: int, shift: bool = True,
                  ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, PairTargets]:
    """Right-padded ``(input_ids [2B, T], PairTargets)``: chosen sequences, then rejected ones.

    ``shift=True`` (language-model losses): inputs are ``ids[:-1]`` and targets ``ids[1:]`` on the response.
    ``shift=False`` (a head on the last token): inputs are the whole sequences.
    ``ref_logps`` [B, 2]: each pair's cached (chosen, rejected) reference log-probabilities.
    """
    rows = [p.sequences()[0] for p in pairs] + [p.sequences()[1] for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    inputs = [ids[:-1] if shift else ids for ids in rows]
    width = max(len(x) for x in inputs)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, (ids, start) in enumerate(zip(rows, starts)):
        x[row, : len(inputs[row])] = torch.tensor(inputs[row])
        if shift:  # target i is ids[i + 1]; it is learned when ids[i + 1] belongs to the response
            y[row, start - 1: len(ids) - 1] = torch.tensor(ids[start:])
    lengths = torch.tensor([len(ids) for ids in inputs])
    ref = None if ref_logps is None else torch.cat([ref_logps[:, 0], ref_logps[:, 1]])
    return x, PairTargets(y, lengths, ref)


class PreferenceBatches(SFTBatches):
    """Endless preference batches in ``SFTBatches``'s seeded order (so ``state_dict`` resumes exactly), each
    collated by ``collate_pairs``. ``ref_logps`` [N, 2] travels with the pairs (index i belongs to pair i)."""

    def __init__(self, pairs: list[PreferencePair], batch_size: int, pad_id: int, seed: int = 0, shift: bool = True,
                 ref_logps: torch.Tensor | None = None):
        super().__init__(pairs, batch_size, pad_id, seed)
        self.shift, self.ref_logps = shift, ref_logps

    def __next__(self) -> tuple[torch.Tensor, PairTargets]:
        if self._plan is None:
            self._plan = self._epoch_plan()
        if self.index >= len(self._plan):
            self.epoch, self.index = self.epoch + 1, 0
            self._plan = self._epoch_plan()
        chosen = self._plan[self.index]
        self.index += 1
        ref = None if self.ref_logps is None else self.ref_logps[chosen]
        return collate_pairs([self.examples[i] for i in chosen], self.pad_id, self.shift, ref)


def fixed_pair_batches(pairs: list[PreferencePair], batch_size: int, pad_id: int, shift: bool = True,
                       ref_logps: torch.Tensor | None = None) -> list[tuple[torch.Tensor, PairTargets]]:
    """Validation batches: every pair once, sorted by length (the same batches at every evaluation)."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].ids))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ref = None if ref_logps is None else ref_logps[chunk]
        batches.append(collate_pairs([pairs[i] for i in chunk], pad_id, shift, ref))
    return batches
