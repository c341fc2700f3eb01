"""Specification of the BPE trainer (scratchlm.train.bpe) and `scratchlm tokenizer train`.

References: a brute-force trainer written below (recount every pair after every merge, as minbpe does) for
the merges themselves, and HF `tokenizers` for the saved tokenizer.json (it must load it and encode exactly
as we do) and for training (its BpeTrainer, configured the same way, must learn the same vocabulary).
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter

import pytest
import regex
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers, trainers

from scratchlm.cli import main
from scratchlm.errors import ConfigError, DataError
from scratchlm.tokenizer import BYTE_TO_UNICODE, GPT4_PATTERN, Tokenizer, pretokenize, token_bytes
from scratchlm.train.bpe import train_bpe
from scratchlm.train.sources import bundled_corpus

EOT = "<|endoftext|>"
EDGE_CASES = [
    "",
    " ",
    "\n\n\n",
    "   leading and trailing spaces   ",
    "tabs\tand\r\nwindows\r\nlines\n",
    "I'LL you'd WE'RE they've it's",
    "1234567890 3.14159 1,000,000",
    "naïve café résumé Ünïcödé",
    "北京欢迎你 東京 ソウル",
    "emoji 👋🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "Ｆｕｌｌｗｉｄｔｈ and ＡＢＣ",
    "<|endoftext|>",
    "before<|endoftext|>after<|endoftext|><|endoftext|>",
    "almost <|endoftext| special <|endoftext",
    "\x00\x01\x7f control \u200b zero width",
    "!!!???... --- ***",
    "KING HENRY V.\nOnce more unto the breach, dear friends, once more;",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return bundled_corpus().read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(corpus) -> Tokenizer:
    return train_bpe([corpus], 2048)


@pytest.fixture(scope="module")
def trained_hf(trained, tmp_path_factory) -> tokenizers.Tokenizer:
    """Our trained tokenizer, saved as tokenizer.json and loaded by HF tokenizers."""
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    trained.save(path)
    return tokenizers.Tokenizer.from_file(str(path))


# ---- the reference: minbpe's loop, no cleverness -------------------------------------------------------------

def brute_force_merges(text: str, n_merges: int) -> list[tuple[bytes, bytes]]:
    """Count every adjacent pair in every word occurrence, merge the best one everywhere, repeat.

    Ties go to the smallest (left id, right id), ids being bytes 0..255 then 256, 257, ... in creation order.
    """
    words = [list(w.encode("utf-8")) for piece in text.split(EOT) for w in pretokenize(piece, "gpt4")]
    token = [bytes([b]) for b in range(256)]
    merges = []
    for _ in range(n_merges):
        counts = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        new_id = len(token)
        token.append(token[best[0]] + token[best[1]])
        merges.append((token[best[0]], token[best[1]]))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [new_id]
                i += 1
    return merges


def merges_as_bytes(tokenizer: Tokenizer) -> list[tuple[bytes, bytes]]:
    return [(token_bytes(a), token_bytes(b)) for a, b in tokenizer.merges]


def test_merges_equal_brute_force_reference_on_small_text(corpus):
    text = corpus[:4000] + " naïve café 北京 123456 👋 " + EOT + " the end"
    tokenizer = train_bpe([text], 256 + 300 + 1)
    assert merges_as_bytes(tokenizer) == brute_force_merges(text, 300)


# Tiny alphabets make many pairs tie, which exercises the tie-breaking rule and the lazy heap.
@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="aab \n", min_size=1, max_size=80), st.integers(1, 40))
def test_merges_equal_brute_force_reference_on_random_text(text, n_merges):
    tokenizer = train_bpe([text], 256 + n_merges, special_tokens=[])
    assert merges_as_bytes(tokenizer) == brute_force_merges(text, n_merges)


def test_training_is_deterministic_and_ignores_document_order(corpus):
    documents = corpus[:200_000].split("\n\n")
    first = train_bpe(documents, 600)
    again = train_bpe(documents, 600)
    reversed_order = train_bpe(reversed(documents), 600)
    for other in (again, reversed_order):
        assert other.merges == first.merges
        assert other.vocab == first.vocab
        assert other.special_tokens == first.special_tokens


def test_learns_the_same_vocabulary_as_hf_bpe_trainer(corpus):
    """HF's BpeTrainer with ByteLevel + GPT-4's split learns the same tokens (its order differs only on ties)."""
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([corpus], trainer)
    ours = train_bpe([corpus], 2048)
    assert set(hf.get_vocab()) == set(ours.vocab) | {EOT}
    assert len(hf.encode(corpus).ids) == len(ours.encode(corpus))


def test_vocabulary_layout_bytes_then_merges_then_specials():
    tokenizer = train_bpe(["the cat sat on the mat " * 20], 256 + 10 + 2, special_tokens=[EOT, "<|pad|>"])
    assert [tokenizer.token_to_id(BYTE_TO_UNICODE[b]) for b in range(256)] == list(range(256))
    assert [tokenizer.token_to_id("".join(m)) for m in tokenizer.merges] == list(range(256, 266))
    assert tokenizer.special_tokens == {EOT: 266, "<|pad|>": 267}
    assert tokenizer.vocab_size == 268
    assert tokenizer.eos_token == EOT


def test_ties_go_to_the_smallest_left_id_then_right_id():
    # Every pair occurs once. (" ", "c") = (32, 99) beats ("a", "b") = (97, 98); then the new token 256 is
    # the largest id, so ("a", "b") beats (256, "d").
    tokenizer = train_bpe(["ab cd"], 256 + 3, special_tokens=[])
    assert tokenizer.merges == [("Ġ", "c"), ("a", "b"), ("Ġc", "d")]


def test_special_tokens_in_training_text_are_cut_out_not_merged():
    text = ("hello world" + EOT) * 50
    tokenizer = train_bpe([text], 400)
    assert len(tokenizer.merges) == 9  # "hello" and " world" (4 + 5 merges), nothing from the special token
    assert not any(regex.search(r"[<|>]", "".join(m)) for m in tokenizer.merges)
    assert tokenizer.encode(text)[:3] == [tokenizer.token_to_id("hello"), tokenizer.token_to_id("Ġworld"),
                                          tokenizer.special_tokens[EOT]]


def test_stops_early_when_the_text_runs_out_of_pairs():
    tokenizer = train_bpe(["ab ab ab"], 1000)
    assert tokenizer.merges == [("a", "b"), ("Ġ", "ab")]
    assert tokenizer.vocab_size == 256 + 2 + 1
    assert tokenizer.special_tokens == {EOT: 258}


# ---- the saved file in HF tokenizers ---------------------------------------------------------------------------

def test_hf_tokenizers_encodes_the_corpus_identically(trained, trained_hf, corpus):
    hf = trained_hf
    ids = trained.encode(corpus)
    assert hf.encode(corpus).ids == ids
    assert hf.decode(ids, skip_special_tokens=False) == trained.decode(ids) == corpus


@pytest.mark.parametrize("text", EDGE_CASES)
def test_hf_tokenizers_encodes_edge_cases_identically(trained, trained_hf, text):
    ids = trained.encode(text)
    assert trained_hf.encode(text).ids == ids
    assert trained.decode(ids) == text


# Characters both regex engines classify alike (see tests/test_tokenizer.py): assigned in Unicode <= 16.
_UCD = unicodedata if tuple(map(int, unicodedata.unidata_version.split("."))) <= (16, 0, 0) else unicodedata.ucd_3_2_0
_comparable = st.characters(exclude_categories=["Cs"]).filter(
    lambda c: _UCD.category(c) != "Cn" or not regex.match(r"[\p{L}\p{N}]", c))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(_comparable, max_size=20), st.sampled_from([EOT, " the", "'s", "\n", "  "])),
                max_size=8).map("".join))
def test_hf_tokenizers_encodes_random_text_identically(trained, trained_hf, text):
    assert trained_hf.encode(text).ids == trained.encode(text)


# ---- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size, specials", [(256, [EOT]), (257, [EOT, "<|pad|>"]), (100, [])])
def test_vocabulary_too_small_for_bytes_and_specials(vocab_size, specials):
    with pytest.raises(ConfigError, match=f"at least {256 + len(specials)}"):
        train_bpe(["some text"], vocab_size, specials)


def test_smallest_vocabulary_has_no_merges():
    tokenizer = train_bpe(["some text"], 257)
    assert tokenizer.merges == [] and tokenizer.vocab_size == 257


def test_bad_special_tokens():
    with pytest.raises(ConfigError, match="twice"):
        train_bpe(["text"], 300, [EOT, EOT])
    with pytest.raises(ConfigError, match="empty"):
        train_bpe(["text"], 300, [""])


@pytest.mark.parametrize("texts", [[], [""], ["", ""], [EOT * 3]])
def test_empty_corpus(texts):
    with pytest.raises(DataError, match="empty text"):
        train_bpe(texts, 300)


# ---- the command -----------------------------------------------------------------------------------------------

def test_cli_trains_from_files_folders_and_jsonl(tmp_path, corpus, capsys):
    text_a, text_b, text_c = corpus[:30_000], corpus[30_000:50_000], corpus[50_000:60_000]
    (tmp_path / "plays.txt").write_text(text_a, encoding="utf-8")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.md").write_text(text_b, encoding="utf-8")
    (tmp_path / "lines.jsonl").write_text(json.dumps({"body": text_c}) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", str(tmp_path / "plays.txt"), str(tmp_path / "notes"), str(tmp_path / "lines.jsonl"),
            "--vocab-size", "600", "--out", str(out), "--special", EOT, "<|pad|>", "--text-field", "body",
            "--no-progress"]
    assert main(argv) == 0
    assert "trained 600 tokens" in capsys.readouterr().out
    loaded = Tokenizer.from_file(out / "tokenizer.json")
    expected = train_bpe([text_a, text_b, text_c], 600, [EOT, "<|pad|>"])
    assert loaded.merges == expected.merges and loaded.vocab == expected.vocab
    assert loaded.special_tokens == {EOT: 598, "<|pad|>": 599}
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"eos_token": EOT}
    assert [p.name for p in out.iterdir()] and not list(out.glob(".*"))  # no temporary files left behind


def run_cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_cli_vocabulary_too_small(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    err = run_cli_error(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "200", "--out",
                         str(tmp_path / "tok")], capsys)
    assert "vocabulary size 200 is too small" in err and "at least 257" in err
    assert not (tmp_path / "tok").exists()


def test_cli_empty_corpus_names_the_files(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    err = run_cli_error(["tokenizer", "train", str(tmp_path / "empty.txt"), "--vocab-size", "300", "--out",
                         str(tmp_path / "tok")], capsys)
    assert f"{tmp_path / 'empty.txt'}: no text" in err


def test_cli_invalid_utf8_names_the_file_and_byte_offset(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("fine text\n", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"line one\ncaf\xe9 latin-1\n")
    err = run_cli_error(["tokenizer", "train", str(tmp_path / "good.txt"), str(tmp_path / "bad.txt"),
                         "--vocab-size", "300", "--out", str(tmp_path / "tok")], capsys)
    assert str(tmp_path / "bad.txt") in err and "byte offset 12" in err and "line 2" in err


def test_cli_missing_file(tmp_path, capsys):
    err = run_cli_error(["tokenizer", "train", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out",
                         str(tmp_path / "tok")], capsys)
    assert "nope.txt does not exist" in err
