"""Parallel text for the translator: reading pairs, training tokenizers, and batches for the training loop.

    pairs = load_pairs("data/numbers")             # {"train": [(source, target), ...], "valid": [...], "test": [...]}
    source_tok, target_tok = train_tokenizers(pairs["train"], vocab_size=512, shared=False)

A data set is a folder holding ``train.tsv`` (one ``source<TAB>target`` pair a line) and optionally ``valid.tsv``
and ``test.tsv``, or the same as ``.jsonl`` files of ``{"source": ..., "target": ...}``; or one such file, of
which a seeded 5% becomes the validation split. ``None`` is the bundled English-to-French number task
(``numbers.py``), the one ``scripts/make_translation.py`` writes to files.

Each side has a byte-level BPE of its own (``scratchlm.train.bpe``), or both share one (``shared=True``), with
the special tokens ``<pad>``, ``<s>`` (the decoder's first input) and ``</s>`` (ends the source and the target).
A training batch is the ``(inputs, targets)`` pair every model here trains on: inputs [B, 2, W] stack the
source (``ids </s>``, padded) and the decoder input (``<s> ids``, padded); targets [B, W] are ``ids </s>`` with
-100 on the padding, so the loop's cross-entropy ignores it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from scratchlm.errors import DataError
from scratchlm.tokenizer import Tokenizer

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
FORMATS = (".tsv", ".jsonl")
Pair = tuple[str, str]


def read_pairs(path: str | Path) -> list[Pair]:
    """The (source, target) pairs of a ``.tsv`` or ``.jsonl`` file; a malformed line is a DataError naming it."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: parallel data must be a .tsv (source<TAB>target) or .jsonl "
                        "({\"source\": ..., \"target\": ...}) file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text ({exc})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".tsv":
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(f"{path}, line {number}: expected source<TAB>target (one tab), found "
                                f"{len(fields) - 1} tabs")
        else:
            try:
                record = json.loads(line)
                fields = [record["source"], record["target"]]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}, line {number}: expected a JSON object with string fields \"source\" and "
                                "\"target\"") from None
        source, target = (str(f).strip() for f in fields)
        if not source or not target:
            raise DataError(f"{path}, line {number}: the source or the target is empty")
        pairs.append((source, target))
    if not pairs:
        raise DataError(f"{path} holds no pairs")
    return pairs


def _find(directory: Path, split: str) -> Path | None:
    found = [directory / f"{split}{ext}" for ext in FORMATS if (directory / f"{split}{ext}").is_file()]
    return found[0] if found else None


def load_pairs(data: str | Path | None, seed: int = 0) -> dict[str, list[Pair]]:
    """The splits of a data set: "train" and "valid" always, "test" when the data has one (see the module doc)."""
    if data is None:
        from scratchlm.seq2seq.numbers import default_task

        return default_task()
    path = Path(data).expanduser()
    if path.is_dir():
        train = _find(path, "train")
        if train is None:
            raise DataError(f"{path} has no train.tsv or train.jsonl: a data folder needs at least the training pairs")
        splits = {"train": read_pairs(train)}
        for split in ("valid", "test"):
            if (found := _find(path, split)) is not None:
                splits[split] = read_pairs(found)
    elif path.is_file():
        splits = {"train": read_pairs(path)}
    else:
        raise DataError(f"{path} does not exist: give a .tsv or .jsonl file of pairs, or a folder with train.tsv")
    if "valid" not in splits:
        pairs = list(splits["train"])
        if len(pairs) < 20:
            raise DataError(f"{path}: {len(pairs)} pairs are too few to hold some out for validation; give at "
                            "least 20, or a valid.tsv beside train.tsv")
        random.Random(seed).shuffle(pairs)
        cut = max(1, len(pairs) // 20)
        splits["valid"], splits["train"] = pairs[:cut], pairs[cut:]
    return splits


def train_tokenizers(pairs: Sequence[Pair], vocab_size: int, shared: bool = False) -> tuple[Tokenizer, Tokenizer]:
    """(source, target) byte-level BPE tokenizers of ``vocab_size`` tokens each (the same object when shared)."""
    from scratchlm.train.bpe import train_bpe

    def bpe(texts: list[str]) -> Tokenizer:
        tokenizer = train_bpe(texts, vocab_size, SPECIAL_TOKENS)
        tokenizer.bos_token, tokenizer.eos_token = BOS, EOS
        return tokenizer

    if shared:
        tokenizer = bpe([s for s, _ in pairs] + [t for _, t in pairs])
        return tokenizer, tokenizer
    return bpe([s for s, _ in pairs]), bpe([t for _, t in pairs])


def special_ids(source_tokenizer: Tokenizer, target_tokenizer: Tokenizer) -> dict[str, int]:
    """The Seq2SeqConfig fields that name token ids."""
    return {"source_pad_id": source_tokenizer.token_to_id(PAD), "pad_id": target_tokenizer.token_to_id(PAD),
            "bos_id": target_tokenizer.bos_id, "eos_id": target_tokenizer.eos_id}


def encode_source(tokenizer: Tokenizer, text: str) -> list[int]:
    """The encoder's input for ``text``: its tokens, then ``</s>`` (so no source is ever empty)."""
    return tokenizer.encode(text, allowed_special=set()) + [tokenizer.eos_id]


def encode_pairs(pairs: Sequence[Pair], source_tokenizer: Tokenizer, target_tokenizer: Tokenizer,
                 max_source_length: int, max_target_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(source ids, target ids) of each pair that fits the model, and how many did not (they are left out)."""
    encoded, skipped = [], 0
    for source, target in pairs:
        src = encode_source(source_tokenizer, source)
        tgt = target_tokenizer.encode(target, allowed_special=set())
        # The decoder reads <s> + target and predicts target + </s>: len(tgt) + 1 positions.
        if len(src) > max_source_length or len(tgt) + 1 > max_target_length:
            skipped += 1
            continue
        encoded.append((src, tgt))
    return encoded, skipped


def collate(items: Sequence[tuple[list[int], list[int]]], source_pad_id: int, pad_id: int, bos_id: int,
            eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, 2, W] (source; <s> + target) and targets [B, W] (target + </s>, -100 on padding)."""
    width = max(max(len(s), len(t) + 1) for s, t in items)
    inputs = torch.empty(len(items), 2, width, dtype=torch.long)
    inputs[:, 0], inputs[:, 1] = source_pad_id, pad_id
    targets = torch.full((len(items), width), -100, dtype=torch.long)
    for row, (src, tgt) in enumerate(items):
        inputs[row, 0, : len(src)] = torch.tensor(src)
        inputs[row, 1, : len(tgt) + 1] = torch.tensor([bos_id, *tgt])
        targets[row, : len(tgt) + 1] = torch.tensor([*tgt, eos_id])
    return inputs, targets


class PairBatches(Iterator):
    """Random training batches of encoded pairs, endlessly; batch i depends only on (seed, i), so its
    ``state_dict`` (the batch index) lets a resumed run draw exactly the batches it would have drawn."""

    def __init__(self, items: Sequence[tuple[list[int], list[int]]], batch_size: int, ids: dict[str, int],
                 seed: int = 0):
        if not items:
            raise DataError("no training pairs fit the model's maximum lengths: raise --max-source-length and "
                            "--max-target-length, or shorten the pairs")
        self.items, self.batch_size, self.ids, self.seed, self.index = items, batch_size, ids, seed, 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"{self.seed}-{self.index}")
        self.index += 1
        picked = [self.items[rng.randrange(len(self.items))] for _ in range(self.batch_size)]
        return collate(picked, **self.ids)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def fixed_batches(items: Sequence[tuple[list[int], list[int]]], batch_size: int,
                  ids: dict[str, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``items`` in order, cut into batches (for validation)."""
    return [collate(items[i:i + batch_size], **ids) for i in range(0, len(items), batch_size)]
