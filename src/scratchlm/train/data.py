"""Training data: text -> token ids once, into memory-mapped flat binaries; then batches of windows.

    prepared = prepare_dataset("plays.txt", tokenizer, "runs/x/data")   # train.bin, val.bin, data.json
    batches = RandomBatches(prepared.train(), batch_size=12, context_length=64, seed=1337)
    input_ids, targets = next(batches)                                  # [12, 64] each, targets shifted by one

The binaries hold the ids back to back (uint16 when the vocabulary has at most 65,536 ids, else uint32),
documents separated by the EOS token (or a blank line when the tokenizer has none). The last
``val_fraction`` of the ids is the validation split, as in nanoGPT's ``prepare.py``. ``data.json``
records a fingerprint of the inputs (file contents, tokenizer, options): when it matches, the files are
reused instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex
import torch

from scratchlm.errors import DataError
from scratchlm.files import atomic_write_json
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.sources import fingerprint_sources, read_documents

FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 16  # tokenize in pieces of about 64k characters so the progress bar moves
# A line break followed by a letter is a pre-token boundary under every pre-tokenizer we have (the
# patterns never carry a newline into a following word), so cutting there leaves the ids unchanged.
_SAFE_CUT = regex.compile(r"\n(?=\p{L})")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of everything that decides a tokenizer's output."""
    spec = [sorted(tokenizer.vocab.items()), tokenizer.merges, sorted(tokenizer.special_tokens.items()),
            tokenizer.pretokenizer, tokenizer.eos_token]
    return hashlib.sha256(json.dumps(spec, ensure_ascii=False).encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits (half the disk and memory), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_for_progress(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of about ``size`` characters at safe boundaries (see _SAFE_CUT)."""
    pieces, start = [], 0
    while len(text) - start > size:
        match = _SAFE_CUT.search(text, start + size)
        if match is None:
            break
        pieces.append(text[start:match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


@dataclass
class PreparedData:
    """A tokenized corpus on disk: ``directory`` holds train.bin, val.bin and data.json."""

    directory: Path
    meta: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def split(self, name: str) -> np.ndarray:
        """The ids of a split ("train" or "val") as a read-only memory map."""
        path = self.directory / f"{name}.bin"
        if self.meta[f"{name}_tokens"] == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def train(self) -> np.ndarray:
        return self.split("train")

    def val(self) -> np.ndarray:
        return self.split("val")

    def check_fits(self, context_length: int) -> None:
        """Raise a DataError unless each split holds at least one window of context_length + 1 ids."""
        need = context_length + 1
        for name in ("train", "val"):
            have = self.meta[f"{name}_tokens"]
            if have < need:
                total = self.meta["train_tokens"] + self.meta["val_tokens"]
                raise DataError(
                    f"the corpus is too short: its {name} split has {have} tokens ({total} in all), but one "
                    f"training window needs {need} (context length {context_length} + 1); give more text or "
                    "choose a smaller --context-length"
                )


def prepare_dataset(data_path: str | Path, tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1,
                    text_field: str = "text", progress: bool = True) -> PreparedData:
    """Tokenize ``data_path`` into ``out_dir`` (train.bin, val.bin, data.json), or reuse what is there.

    Args:
        data_path: a text file, a folder of .txt/.md/.jsonl files, or a .jsonl file.
        val_fraction: share of the ids, taken from the end, that forms the validation split.
        text_field: the field holding the text in JSONL records.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    out_dir = Path(out_dir)
    fingerprint = {
        "version": FORMAT_VERSION, "sources": fingerprint_sources(data_path),
        "tokenizer": tokenizer_fingerprint(tokenizer), "val_fraction": val_fraction, "text_field": text_field,
    }
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    meta_path = out_dir / "data.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("key") == key and all((out_dir / f"{s}.bin").is_file() for s in ("train", "val")):
            return PreparedData(out_dir, meta)

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp_all = out_dir / f".all.{os.getpid()}.tmp"
    total_bytes = sum(row["size"] for row in fingerprint["sources"])
    separator = [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode("\n\n", "none")
    bar = _progress(total_bytes, progress)
    n_tokens = n_docs = n_chars = 0
    try:
        with open(tmp_all, "wb") as f:
            for _, text in read_documents(data_path, text_field):
                if not text:
                    continue
                if n_docs:
                    np.asarray(separator, dtype=dtype).tofile(f)
                    n_tokens += len(separator)
                for piece in split_for_progress(text):
                    ids = tokenizer.encode(piece, allowed_special="all")
                    np.asarray(ids, dtype=dtype).tofile(f)
                    n_tokens += len(ids)
                    if bar is not None:
                        bar.update(len(piece.encode("utf-8")))
                n_docs += 1
                n_chars += len(text)
        if bar is not None:
            bar.update(max(0, total_bytes - bar.n))
            bar.close()
        if n_tokens == 0:
            raise DataError(f"training data {data_path} is empty (no text, or no token the tokenizer knows): "
                            "give a corpus with some text")
        n_val = max(1, int(n_tokens * val_fraction))
        n_train = n_tokens - n_val
        all_ids = np.memmap(tmp_all, dtype=dtype, mode="r")
        _write_ids(out_dir / "train.bin", all_ids[:n_train])
        _write_ids(out_dir / "val.bin", all_ids[n_train:])
        del all_ids
    finally:
        tmp_all.unlink(missing_ok=True)
    meta = {"key": key, **fingerprint, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "documents": n_docs, "characters": n_chars, "train_tokens": n_train, "val_tokens": n_val}
    atomic_write_json(meta_path, meta)
    return PreparedData(out_dir, meta)


def load_prepared(directory: str | Path) -> PreparedData:
    """Open data written by ``prepare_dataset`` (without checking its inputs)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "data.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{directory} holds no readable data.json ({exc}); prepare the data again") from None
    return PreparedData(directory, meta)


def _write_ids(path: Path, ids: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.asarray(ids).tofile(f)
    os.replace(tmp, path)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
class RandomBatches:
    """An endless iterator of ``(input_ids, targets)`` windows drawn uniformly from a split.

    Batch number k is a pure function of (seed, k): the "data position" to save for an exact resume is
    just k (``state_dict``). Under data-parallel training every process draws the same
    ``batch_size`` windows and keeps its own slice of ``batch_size // world_size`` rows, so the global
    batch is the same whatever the number of processes.
    """

    def __init__(self, data: np.ndarray, batch_size: int, context_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(data) < context_length + 1:
            raise DataError(f"a split of {len(data)} tokens cannot hold one window of {context_length + 1}")
        if batch_size % world_size:
            raise DataError(f"batch size {batch_size} is not divisible by the {world_size} processes: "
                            "choose a multiple of the process count")
        self.windows = np.lib.stride_tricks.sliding_window_view(data, context_length + 1)  # no copy
        self.batch_size, self.seed = batch_size, seed
        self.rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.index = 0

    def __iter__(self) -> RandomBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.index])
        starts = rng.integers(0, len(self.windows), size=self.batch_size)[self.rows]
        self.index += 1
        batch = torch.from_numpy(self.windows[starts].astype(np.int64))  # (B, T+1)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.index = int(state["seed"]), int(state["index"])


def eval_batches(data: np.ndarray, batch_size: int, context_length: int, n_batches: int,
                 rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation windows, evenly spaced over the split (the same at every evaluation).

    Fixed windows make successive validation losses comparable (no sampling noise between them); under
    data-parallel training each process gets every world_size-th batch.
    """
    windows = np.lib.stride_tricks.sliding_window_view(data, context_length + 1)
    n = min(n_batches * batch_size, len(windows))
    starts = np.linspace(0, len(windows) - 1, n).round().astype(np.int64)
    batches = []
    for i, begin in enumerate(range(0, n, batch_size)):
        if i % world_size == rank:
            batch = torch.from_numpy(windows[starts[begin:begin + batch_size]].astype(np.int64))
            batches.append((batch[:, :-1], batch[:, 1:]))
    return batches

