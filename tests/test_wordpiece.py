"""WordPiece against HF tokenizers: the same ids on a large, unicode-heavy text, from tokenizer.json and vocab.txt."""

from __future__ import annotations

import random
from importlib.resources import files
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.wordpiece import WordPiece

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Blocks whose characters all date from Unicode 8.0 or earlier (see docs/embeddings.md: HF tokenizers' character
# tables are Unicode 8.0's), drawn at random into the test text.
BLOCKS = [(0x00A0, 0x024F), (0x0250, 0x02AF), (0x0300, 0x036F), (0x0391, 0x03C9), (0x0400, 0x04FF),
          (0x05D0, 0x05EA), (0x0621, 0x064A), (0x0905, 0x0939), (0x0E01, 0x0E3A), (0x1E00, 0x1EFF),
          (0x2010, 0x2027), (0x2030, 0x205E), (0x20A0, 0x20B9), (0x2190, 0x21FF), (0x2200, 0x22FF),
          (0x3001, 0x303F), (0x3041, 0x3096), (0x30A1, 0x30FA), (0x4E00, 0x9FA5), (0xAC00, 0xD7A3),
          (0xFF01, 0xFF5E), (0x1F300, 0x1F64F), (0x1F680, 0x1F6C5), (0x20000, 0x2A6D6)]
ODDITIES = ["\x00", "\x07", "\x1b", "\x0b", "\x0c", "\x85", "\u200b", "\u200d", "\ufeff", "\ufffd", "\u00ad",
            "\u00a0", "\u3000", "\u2028", "\u2029", "\t", "\r\n", "\ue000", "e\u0301", "A\u030a", "\u1e9e",
            "ΟΔΥΣΣΕΥΣ", "İstanbul", "ﬁne", "①②", "x²", "👨\u200d👩\u200d👧", "👍🏽", "🇫🇷", "[SEP]", "[MASK]",
            "[cls]", "don't", "naïve café", "Ελληνικά", "Привет, мир!", "東京タワー", "中文字符", "한국어", "¿Qué?",
            "«quote»", "—", "…", "$5.00", "a+b=c", "~^`|", "x" * 150, "supercalifragilistic" * 6]


def unicode_text(n_lines: int = 3000, seed: int = 0) -> str:
    """Shakespeare lines interleaved with random characters from many scripts, emoji, controls and spaces."""
    rng = random.Random(seed)
    shakespeare = files("scratchlm.data").joinpath("shakespeare.txt").read_text(encoding="utf-8").splitlines()
    lines = shakespeare[: n_lines // 2]
    for _ in range(n_lines // 2):
        parts = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            if kind < 0.5:
                lo, hi = rng.choice(BLOCKS)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
            elif kind < 0.75:
                parts.append(rng.choice(ODDITIES))
            else:
                parts.append(rng.choice(shakespeare).strip())
        lines.append(rng.choice([" ", "", "\t", "  "]).join(parts))
    rng.shuffle(lines)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A WordPiece vocabulary trained by HF tokenizers on the test text itself, saved as tokenizer.json + vocab.txt."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=3000, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(unicode_text(2000, seed=1).splitlines(), trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    out = tmp_path_factory.mktemp("wordpiece")
    tok.save(str(out / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    return out


def assert_same_ids(ours: WordPiece, ref: Tokenizer, text: str) -> None:
    lines = text.splitlines()
    for line, enc in zip(lines, ref.encode_batch(lines)):
        assert ours.encode(line) == enc.ids, repr(line)
    assert ours.encode(text) == ref.encode(text).ids  # one long text, whole


def test_encode_matches_hf_tokenizers_on_unicode_text(trained):
    ref = Tokenizer.from_file(str(trained / "tokenizer.json"))
    ours = WordPiece.from_file(trained / "tokenizer.json")
    assert_same_ids(ours, ref, unicode_text(3000, seed=2))


def test_vocab_txt_loads_the_same_tokenizer(trained):
    ref = Tokenizer.from_file(str(trained / "tokenizer.json"))
    ours = WordPiece.from_file(trained / "vocab.txt")
    assert_same_ids(ours, ref, unicode_text(600, seed=3))


def test_minilm_tokenizer_matches_hf_tokenizers(minilm_path):
    ref = Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    text = unicode_text(3000, seed=4)
    assert_same_ids(WordPiece.from_file(minilm_path), ref, text)
    assert_same_ids(WordPiece.from_file(minilm_path / "vocab.txt"), ref, text[:20000])


def test_decode_matches_hf_tokenizers(trained):
    ref = Tokenizer.from_file(str(trained / "tokenizer.json"))
    ours = WordPiece.from_file(trained / "tokenizer.json")
    for line in unicode_text(300, seed=5).splitlines():
        ids = ref.encode(line).ids
        assert ours.decode(ids) == ref.decode(ids), repr(line)


def test_greedy_longest_match_first_with_continuations():
    vocab = {t: i for i, t in enumerate(SPECIALS + ["un", "##aff", "##able", "una", "##ffable", "a", "##b"])}
    wp = WordPiece(vocab, max_input_chars_per_word=10)
    # "una" + "##ffable" beats "un" + "##aff" + "##able": the longest prefix is taken first, never revisited.
    assert wp.tokenize("unaffable") == ["una", "##ffable"]
    # "abab": a, ##b, then nothing covers "##ab" or "##a", so the whole word is [UNK]
    assert wp.tokenize("ab abab") == ["a", "##b", "[UNK]"]
    assert wp.tokenize("a" + "b" * 10) == ["[UNK]"]  # 11 characters: past the limit, one [UNK] for the word
    assert wp.encode("Un, a!") == [2, 5, 1, 10, 1, 3]  # [CLS] un [UNK](,) a [UNK](!) [SEP]


def test_normaliser_lowercases_strips_accents_splits_cjk_and_drops_controls():
    wp = WordPiece({t: i for i, t in enumerate(SPECIALS)})
    assert wp.normalize("Ça\x00 va\u200b\tÉTÉ 東京") == "ca va ete  東  京 "
    assert wp.pre_tokenize("ca va, ete 東 京!") == ["ca", "va", ",", "ete", "東", "京", "!"]


def test_unsupported_tokenizer_files_are_refused(tmp_path):
    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UnsupportedError, match="not WordPiece"):
        WordPiece.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="neither tokenizer.json nor vocab.txt"):
        WordPiece.from_file(tmp_path / "empty")
