"""Corpus, character tokenizer, data preparation and batches (scratchlm.train.{sources,chars,data})."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.errors import ConfigError, DataError
from scratchlm.tokenizer import BYTE_TO_UNICODE, Tokenizer
from scratchlm.train.chars import train_char_tokenizer
from scratchlm.train.data import (
    RandomBatches,
    eval_batches,
    prepare_dataset,
    split_for_progress,
    token_dtype,
)
from scratchlm.train.sources import bundled_corpus, read_documents

ROOT = Path(__file__).resolve().parent.parent
CORPUS = bundled_corpus().read_text(encoding="utf-8")


def hf_bpe_tokenizer(text: str, vocab_size: int = 400) -> Tokenizer:
    """A real byte-level BPE (GPT-2 pre-tokenizer) trained by HF tokenizers, loaded as ours."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    spec = json.loads(tok.to_str())
    return Tokenizer._from_hf_spec(spec, None, "<|endoftext|>")


# ---- corpus ------------------------------------------------------------------------------------------
def test_bundled_corpus_is_about_one_megabyte_of_clean_plays():
    data = bundled_corpus().read_bytes()
    assert 900_000 < len(data) < 1_200_000
    text = data.decode("utf-8")
    assert "gutenberg" not in text.lower() and not re.search(r"\betext\b", text, re.I)
    assert "HAMLET" in text and "THE TEMPEST" in text
    assert "\r" not in text and text.count("\n\n\n") == 7  # two blank lines between the 8 plays only


def test_build_corpus_strips_gutenberg_header_and_licence():
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts" / "build_corpus.py")
    build_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_corpus)
    raw = ("The Project Gutenberg EBook of Hamlet\r\nThis eBook is for the use of anyone\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n\r\nHAMLET   \r\nTo be.\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nLicence text here.\r\n")
    assert build_corpus.clean(raw) == "HAMLET\nTo be.\n"


# ---- character tokenizer ---------------------------------------------------------------------------
def test_char_tokenizer_has_one_id_per_character_in_sorted_order():
    tok = train_char_tokenizer(["hello world"])
    assert tok.vocab_size == len(set("hello world"))
    assert tok.encode("hello") == [sorted(set("hello world")).index(c) for c in "hello"]
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_char_tokenizer_saves_and_loads_and_hf_tokenizers_encodes_identically(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    text = CORPUS[:50_000] + " héllo wörld, 日本語 🎉"
    tok = train_char_tokenizer([text], ["<|endoftext|>"], eos_token="<|endoftext|>")
    tok.save(tmp_path / "tokenizer.json")
    ours = Tokenizer.from_file(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for sample in [text[:5000], "ROMEO: héllo 日本🎉<|endoftext|>Ham.", "wörld 語"]:
        ids = tok.encode(sample)
        assert ours.encode(sample) == ids
        assert hf.encode(sample).ids == ids
        # Every character of the training text is exactly one token.
        assert len(ids) == len(sample.replace("<|endoftext|>", "\0"))
        assert tok.decode(ids) == sample


def test_char_tokenizer_rejects_empty_text():
    with pytest.raises(DataError, match="empty"):
        train_char_tokenizer(["", ""])


# ---- reading user data -----------------------------------------------------------------------------
def test_reads_text_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# second", encoding="utf-8")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth", "x": 1}\n', encoding="utf-8")
    (tmp_path / "ignored.py").write_text("print()", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("hidden", encoding="utf-8")
    assert [t for _, t in read_documents(tmp_path)] == ["first", "# second", "third", "fourth"]
    assert [t for _, t in read_documents(tmp_path / "a.txt")] == ["first"]
    (tmp_path / "e.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    assert [t for _, t in read_documents(tmp_path / "e.jsonl", "body")] == ["x"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken\n', r"e\.jsonl, line 2: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"line 2: no 'text' field; pass --text-field"),
    ('{"text": 3}\n', r"line 1: field 'text' is int"),
])
def test_malformed_jsonl_names_the_line(tmp_path, content, message):
    (tmp_path / "e.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        list(read_documents(tmp_path / "e.jsonl"))


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"First line\nCaf" + b"\xe9 au lait\n")
    with pytest.raises(DataError) as info:
        list(read_documents(tmp_path))
    message = str(info.value)
    assert str(path) in message and "byte offset 14" in message and "line 2" in message and "iconv" in message
    assert "\n" not in message


def test_missing_data_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_documents(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="no .txt, .md or .jsonl"):
        list(read_documents(tmp_path))


# ---- preparation -----------------------------------------------------------------------------------
def test_prepared_binaries_hold_exactly_the_encoded_text(tmp_path):
    text = CORPUS[:40_000]
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    tok = train_char_tokenizer([text])
    prepared = prepare_dataset(tmp_path / "c.txt", tok, tmp_path / "data", val_fraction=0.1, progress=False)
    train, val = prepared.train(), prepared.val()
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    assert len(val) == int(len(text) * 0.1) and len(train) + len(val) == len(text)
    assert np.concatenate([train, val]).tolist() == tok.encode(text)


def test_documents_are_separated_by_eos(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ab"}\n{"text": "ba"}\n', encoding="utf-8")
    tok = train_char_tokenizer(["ab"], ["<|endoftext|>"], eos_token="<|endoftext|>")
    prepared = prepare_dataset(tmp_path / "d.jsonl", tok, tmp_path / "data", val_fraction=0.2, progress=False)
    eos = tok.eos_id
    assert np.concatenate([prepared.train(), prepared.val()]).tolist() == [0, 1, eos, 1, 0]


def test_preparation_is_reused_until_an_input_changes(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(CORPUS[:5000], encoding="utf-8")
    tok = train_char_tokenizer([CORPUS[:6000]])
    first = prepare_dataset(src, tok, tmp_path / "data", progress=False)
    stamp = os.stat(tmp_path / "data" / "train.bin").st_mtime_ns
    again = prepare_dataset(src, tok, tmp_path / "data", progress=False)
    assert os.stat(tmp_path / "data" / "train.bin").st_mtime_ns == stamp and again.meta == first.meta
    src.write_text(CORPUS[:6000], encoding="utf-8")
    changed = prepare_dataset(src, tok, tmp_path / "data", progress=False)
    assert changed.meta["train_tokens"] + changed.meta["val_tokens"] == 6000
    other_tok = train_char_tokenizer([CORPUS[:7000]])
    retok = prepare_dataset(src, other_tok, tmp_path / "data", progress=False)
    assert retok.meta["tokenizer"] != changed.meta["tokenizer"]


def test_large_vocabularies_use_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    tok = Tokenizer(vocab, [], {"<|big|>": 70_000})
    (tmp_path / "c.txt").write_text("ab<|big|>" * 20, encoding="utf-8")
    prepared = prepare_dataset(tmp_path / "c.txt", tok, tmp_path / "data", progress=False)
    ids = np.concatenate([prepared.train(), prepared.val()])
    assert ids.dtype == np.uint32 and ids.tolist() == tok.encode("ab<|big|>" * 20)


def test_cutting_text_for_the_progress_bar_leaves_bpe_ids_unchanged():
    text = CORPUS[:120_000]
    tok = hf_bpe_tokenizer(CORPUS[:200_000])
    pieces = split_for_progress(text, size=4000)
    assert len(pieces) > 20 and "".join(pieces) == text
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        prepare_dataset(tmp_path / "empty.txt", train_char_tokenizer(["a"]), tmp_path / "data", progress=False)


def test_corpus_shorter_than_one_context_window_is_an_error(tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be: that is the question.", encoding="utf-8")
    tok = train_char_tokenizer(["To be, or not to be: that is the question."])
    prepared = prepare_dataset(tmp_path / "short.txt", tok, tmp_path / "data", progress=False)
    with pytest.raises(DataError, match=r"too short: its train split has 38 tokens .* needs 65 .*--context-length"):
        prepared.check_fits(64)
    prepared.check_fits(3)


def test_val_fraction_must_be_a_fraction(tmp_path):
    with pytest.raises(DataError, match="val_fraction"):
        prepare_dataset(tmp_path, train_char_tokenizer(["a"]), tmp_path / "data", val_fraction=1.5)


# ---- batches ---------------------------------------------------------------------------------------
def test_random_batches_are_windows_with_shifted_targets_and_reproducible():
    data = np.arange(1000, dtype=np.uint16)
    batches = RandomBatches(data, batch_size=4, context_length=8, seed=3)
    x, y = next(batches)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.int64))  # contiguous windows
    second = next(batches)
    replay = RandomBatches(data, batch_size=4, context_length=8, seed=3)
    replay.load_state_dict({"seed": 3, "index": 1})
    assert torch.equal(next(replay)[0], second[0])
    assert not torch.equal(next(RandomBatches(data, 4, 8, seed=4))[0], x)


def test_data_parallel_shards_make_up_the_single_process_batch():
    data = np.arange(5000, dtype=np.uint16)
    single = next(RandomBatches(data, 6, 16, seed=1))[0]
    shards = [next(RandomBatches(data, 6, 16, seed=1, rank=r, world_size=2))[0] for r in range(2)]
    assert torch.equal(torch.cat(shards), single)
    with pytest.raises(DataError, match="divisible"):
        RandomBatches(data, 5, 16, seed=1, world_size=2)


def test_eval_batches_are_fixed_and_spread_over_the_split():
    data = np.arange(2000, dtype=np.uint16)
    a = eval_batches(data, 4, 16, 5)
    b = eval_batches(data, 4, 16, 5)
    assert len(a) == 5 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    starts = torch.cat([x[:, 0] for x, _ in a])
    assert starts[0] == 0 and starts[-1] == 2000 - 17
    halves = [eval_batches(data, 4, 16, 5, rank=r, world_size=2) for r in range(2)]
    assert len(halves[0]) + len(halves[1]) == 5


def test_unknown_preset_is_an_error():
    from scratchlm.train.presets import get_preset

    with pytest.raises(ConfigError, match="shakespeare-char"):
        get_preset("nope")
