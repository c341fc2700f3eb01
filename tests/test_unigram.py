"""Specification of the Unigram tokenizer (scratchlm.unigram), its trainer (scratchlm.unigram_train), the
SentencePiece .model reader, `scratchlm tokenizer train --type unigram` and loading an LLM with a Unigram tokenizer.

References: the `sentencepiece` library (models trained in the test, offline, with different normalisation
rules, byte fallback and a user-defined symbol) and HF `tokenizers` (Unigram models trained in the test).
The text is generated: many scripts, emoji with ZWJ and flags, NFKC-sensitive characters (ligatures,
full-width forms, circled digits), digits, and runs of spaces, tabs and newlines.
"""

from __future__ import annotations

import io
import json
import random

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from conftest import tiny_config
from scratchlm.cli import main
from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM
from scratchlm.model import Transformer
from scratchlm.sentencepiece_model import parse_model, read_fields
from scratchlm.train.sources import bundled_corpus
from scratchlm.unigram import Unigram
from scratchlm.unigram_train import is_valid_piece, train_unigram

WORDS = {
    "latin": ("the of and to in is that for it as with was on be by at this from have or one had not but what all "
              "were when we there can an your which their said if do will each about how up out them then she many "
              "some so these would other into has more her two like him see time could no make than first been its "
              "who now people my made over did down only way find use may water long little very after words").split(),
    "accents": "café naïve résumé Zürich façade jalapeño São Ångström œuvre straße Łódź Dvořák".split(),
    "cyrillic": "привет мир это тест язык модель слово пример данные время".split(),
    "greek": "γεια σου κόσμε λόγος ἀρχή θάλασσα φῶς".split(),
    "cjk": "你好世界 语言模型 今天天气很好 我们 中文 東京 日本語のテキスト ひらがな カタカナ ラーメン".split(),
    "arabic": "مرحبا بالعالم اللغة العربية كتاب".split(),
    "hindi": "नमस्ते दुनिया भाषा मॉडल".split(),
    "korean": "안녕하세요 세계 언어 모델".split(),
    "emoji": ["😀", "🎉🎉", "👩\u200d💻", "🇫🇷", "❤️", "👍🏽", "🤖", "✨"],
    "nfkc": ["ﬁle", "Ｆｕｌｌｗｉｄｔｈ", "①②", "㍻", "ｶﾀｶﾅ", "x²", "½", "™", "…", "Ⅻ", "e\u0301", "\u00a0nbsp"],
    "punct": list(",.!?;:()\"'-—«»#$%&*/<>@[]{}~`|\\^_+="),
}
SPACES = [" "] * 30 + ["  ", "   ", "\t", "\n", "\n\n", " \n ", "\u3000", "\r\n", "      "]


def generate(n_words: int, seed: int) -> str:
    """Unicode-heavy text: mostly English words, with every other kind of text mixed in."""
    rng = random.Random(seed)
    kinds = [*WORDS, "digits"]
    weights = [20 if k == "latin" else 2 for k in kinds]
    out = []
    for _ in range(n_words):
        kind = rng.choices(kinds, weights)[0]
        if kind == "digits":
            word = str(rng.randint(0, 10 ** rng.randint(1, 9)))
        else:
            word = rng.choice(WORDS[kind])
            word = word.capitalize() if kind == "latin" and rng.random() < 0.1 else word
        out += [word, rng.choice(SPACES)]
    return "".join(out)


TRAIN_TEXT = generate(12_000, seed=1)
# ~130,000 characters in documents of 1-200 words, plus edge cases: specials written in text, the unknown
# character, control characters, only whitespace, empty.
DOCUMENTS = [generate(random.Random(k).randint(1, 200), seed=100 + k) for k in range(260)] + [
    " <tool> x<tool>y  <s> \u2047 </s>", "", "   ", "\n\n", "ab\x00c\x07", "\ud7ff\uffff", "<0x41>", "▁▁x▁",
]


def sentencepiece_model(tmp_path, **options) -> tuple[spm.SentencePieceProcessor, Unigram]:
    """A Unigram model trained by sentencepiece on TRAIN_TEXT, loaded by sentencepiece and by us."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAIN_TEXT.splitlines()), model_writer=buffer,
                                   model_type="unigram", vocab_size=700, character_coverage=0.98, num_threads=1,
                                   minloglevel=2, user_defined_symbols=["<tool>"], **options)
    path = tmp_path / "m.model"
    path.write_bytes(buffer.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)), Unigram.from_file(path)


@pytest.mark.parametrize("options", [
    {"normalization_rule_name": "nmt_nfkc"},
    {"normalization_rule_name": "identity", "byte_fallback": True},
    {"normalization_rule_name": "nfkc_cf", "add_dummy_prefix": False, "remove_extra_whitespaces": False},
], ids=["nmt_nfkc", "identity-byte-fallback", "nfkc_cf-no-prefix"])
def test_ids_and_text_match_sentencepiece(tmp_path, options):
    sp, ours = sentencepiece_model(tmp_path, **options)
    assert ours.vocab_size == sp.get_piece_size()
    assert [ours.id_to_token(i) for i in range(ours.vocab_size)] == [sp.id_to_piece(i) for i in range(ours.vocab_size)]
    expected = sp.encode(DOCUMENTS)
    got = [ours.encode(d, allowed_special="none") for d in DOCUMENTS]
    mismatches = [k for k in range(len(DOCUMENTS)) if got[k] != expected[k]]
    assert not mismatches, (DOCUMENTS[mismatches[0]][:80], got[mismatches[0]][:20], expected[mismatches[0]][:20])
    assert sum(map(len, expected)) > 30_000  # the comparison covered real work
    if options.get("byte_fallback"):
        assert any(sp.id_to_piece(i).startswith("<0x") for ids in expected for i in ids)
    else:
        assert any(i == sp.unk_id() for ids in expected for i in ids)
    # decoding: the encoded documents, and random id sequences (byte pieces cut mid-character included)
    assert [ours.decode(ids, skip_special=True) for ids in expected] == [sp.decode(ids) for ids in expected]
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(sp.get_piece_size()) for _ in range(rng.randint(1, 8))]
        assert ours.decode(ids, skip_special=True) == sp.decode(ids), ids


def test_model_file_fields_are_read(tmp_path):
    sp, ours = sentencepiece_model(tmp_path, normalization_rule_name="identity", byte_fallback=True)
    model = parse_model((tmp_path / "m.model").read_bytes())
    assert model.byte_fallback and model.normalizer_name == "identity" and model.model_type == "unigram"
    assert [p for p, _, _ in model.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [s for _, s, _ in model.pieces] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert ours.bos_id == sp.bos_id() and ours.eos_id == sp.eos_id() and ours.unk_id == sp.unk_id()
    # special tokens written in the text are recognised when allowed (as HF's Llama/T5 tokenizers do)
    ids = ours.encode("<s>hello</s>")
    assert ids == [sp.bos_id(), *sp.encode("hello"), sp.eos_id()]


def test_bpe_and_corrupt_model_files_are_refused(tmp_path):
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAIN_TEXT.splitlines()[:400]), model_writer=buffer,
                                   model_type="bpe", vocab_size=300, minloglevel=2, num_threads=1)
    (tmp_path / "bpe.model").write_bytes(buffer.getvalue())
    with pytest.raises(UnsupportedError, match="'bpe' model"):
        Unigram.from_file(tmp_path / "bpe.model")
    for cut in (1000, 1001, 5):
        (tmp_path / "cut.model").write_bytes(buffer.getvalue()[:cut])
        with pytest.raises(ModelFileError, match="truncated|not a SentencePiece"):
            Unigram.from_file(tmp_path / "cut.model")
    assert read_fields(b"\x08\x96\x01") == [(1, 150)]  # the protobuf docs' example varint


def hf_unigram(byte_fallback: bool) -> HFTokenizer:
    tok = HFTokenizer(models.Unigram())
    if byte_fallback:  # Llama-style: no pre-tokenizer, the normaliser writes the ▁
        tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁"), normalizers.Prepend("▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                      max_piece_length=8)
    tok.train_from_iterator(TRAIN_TEXT.splitlines()[:1500], trainer)
    if byte_fallback:
        spec = json.loads(tok.to_str())
        spec["model"]["byte_fallback"] = True
        spec["model"]["vocab"] += [[f"<0x{b:02X}>", 0.0] for b in range(256)]
        tok = HFTokenizer.from_str(json.dumps(spec))
    return tok


@pytest.mark.parametrize("byte_fallback", [False, True], ids=["metaspace-nfkc", "llama-style-byte-fallback"])
def test_ids_and_text_match_hf_tokenizers(tmp_path, byte_fallback):
    hf = hf_unigram(byte_fallback)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Unigram.from_file(tmp_path)
    documents = DOCUMENTS[:150] + ["x <s> y</s>", "  a  "]
    expected = [hf.encode(d).ids for d in documents]
    assert [ours.encode(d) for d in documents] == expected
    assert [ours.decode(ids, skip_special=True) for ids in expected] == hf.decode_batch(expected)


def test_trainer_compression_is_within_2_percent_of_sentencepiece(tmp_path):
    lines = bundled_corpus().read_text(encoding="utf-8").splitlines()
    train, held_out = lines[:1500], lines[-3000:]
    ours = train_unigram(train, 400)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(train), model_writer=buffer, model_type="unigram",
                                   vocab_size=400, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    ours_tokens = sum(len(ours.encode(line)) for line in held_out)
    sp_tokens = sum(map(len, sp.encode(held_out)))
    assert ours.vocab_size == 400
    assert abs(ours_tokens / sp_tokens - 1) < 0.02, (ours_tokens, sp_tokens)
    # the saved tokenizer.json means the same thing to HF tokenizers
    ours.save(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [hf.encode(d).ids for d in held_out[:400]] == [ours.encode(d) for d in held_out[:400]]
    assert Unigram.from_file(tmp_path / "tokenizer.json").encode(held_out[0]) == ours.encode(held_out[0])


def test_piece_rules_follow_sentencepiece():
    assert is_valid_piece("▁the", 16) and is_valid_piece("日本語のテキスト", 16) and is_valid_piece("e\u0301", 16)
    assert not is_valid_piece("a▁b", 16)  # ▁ only at the start
    assert not is_valid_piece("a1", 16) and not is_valid_piece("s,", 16)  # letters never join digits or punctuation
    assert not is_valid_piece("abc", 2) and not is_valid_piece("", 16)
    assert not is_valid_piece("дa", 16)  # Cyrillic with Latin


def test_cli_trains_a_unigram_tokenizer_an_llm_loads(tmp_path, capsys):
    text = bundled_corpus().read_text(encoding="utf-8")[:15_000]
    (tmp_path / "plays.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(tmp_path / "plays.txt"), "--type", "unigram", "--vocab-size", "420",
                 "--byte-fallback", "--normalization", "identity", "--out", str(out), "--no-progress"]) == 0
    assert "Unigram tokenizer of 420 pieces" in capsys.readouterr().out
    tok = Unigram.from_file(out / "tokenizer.json")
    assert [tok.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"eos_token": "</s>", "bos_token": "<s>"}
    sample = "First Citizen:\n  Before we proceed 🤖 any further, hear me speak. 你好"
    assert tok.decode(tok.encode(sample)) == sample  # identity + byte fallback: lossless
    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    assert hf.encode(sample).ids == tok.encode(sample) and hf.decode(hf.encode(sample).ids) == sample

    # a model directory with that tokenizer loads as an LLM, and generation decodes through it
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tok.vocab_size)
    save_model_dir(tmp_path / "model", config, Transformer(config).state_dict(), tok)
    llm = LLM.load(tmp_path / "model")
    assert isinstance(llm.tokenizer, Unigram) and llm.tokenizer.eos_id == tok.eos_id
    completion = llm.complete("Before we proceed", max_new_tokens=5, temperature=0)
    assert 1 <= len(completion.token_ids) <= 5 and completion.prompt_tokens == len(tok.encode("Before we proceed"))
    streamed = b"".join(tok.bytes_of(i, skip_special=True) for i in completion.token_ids)
    assert completion.text == streamed.decode("utf-8", "replace")  # "▁" streams as a space


def test_llm_loads_a_sentencepiece_model_beside_the_weights(tmp_path):
    sp, ours = sentencepiece_model(tmp_path)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=ours.vocab_size)
    save_model_dir(tmp_path / "model", config, Transformer(config).state_dict())
    (tmp_path / "model" / "spiece.model").write_bytes((tmp_path / "m.model").read_bytes())
    llm = LLM.load(tmp_path / "model")
    assert llm.tokenizer.encode("Hello wörld", allowed_special="none") == sp.encode("Hello wörld")
    assert llm.tokenizer.eos_id == sp.eos_id()


def test_cli_unigram_vocabulary_too_small(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    assert main(["tokenizer", "train", str(tmp_path / "a.txt"), "--type", "unigram", "--byte-fallback",
                 "--vocab-size", "200", "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert "vocabulary size 200 is too small" in err and "at least 260" in err and len(err.splitlines()) == 1
