"""Specification of scratchlm.tokenizer.

The reference is Hugging Face `tokenizers`, built here independently of our code from the vocabulary and
merges in SmolLM2's GGUF file, with SmolLM2's real pre-tokenizer (Digits + ByteLevel). Our tokenizer must
produce the same ids, decode to the same text, and save files that `tokenizers` loads and agrees with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import unicodedata
from pathlib import Path

import gguf
import pytest
import regex
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from scratchlm.errors import ConfigError, ModelFileError, UnsupportedError
from scratchlm.tokenizer import (
    BYTE_TO_UNICODE,
    GPT2_PATTERN,
    GPT4_PATTERN,
    StreamDecoder,
    Tokenizer,
    bpe,
    pretokenize,
    to_byte_level,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
)
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# The regex engines disagree only on characters newer than the older engine's Unicode tables (the `regex`
# package knows Unicode 17 letters that Oniguruma in `tokenizers` 0.23 does not), so random text compared
# with HF is drawn from characters that the running Python's Unicode database (<= 16.0 up to Python 3.14)
# already assigns, plus everything that is not a letter or number. A full scan of every assigned code point
# in a dozen contexts found no other difference.
_UCD = unicodedata if tuple(map(int, unicodedata.unidata_version.split("."))) <= (16, 0, 0) else unicodedata.ucd_3_2_0
_LETTER_OR_NUMBER = regex.compile(r"[\p{L}\p{N}]")


def _known_to_both_engines(c: str) -> bool:
    return _UCD.category(c) != "Cn" or not _LETTER_OR_NUMBER.match(c)


comparable_text = st.text(st.characters(exclude_categories=["Cs"]).filter(_known_to_both_engines))


def smollm2_gguf_path() -> str:
    """The SmolLM2 GGUF used as ground truth: $SCRATCHLM_TEST_GGUF, else the scratchlm model cache."""
    path = os.environ.get("SCRATCHLM_TEST_GGUF")
    if not path:
        home = os.environ.get("SCRATCHLM_HOME", os.path.expanduser("~/.cache/scratchlm"))
        path = os.path.join(home, "models", "smollm2-135m-instruct", GGUF_NAME)
    if not os.path.isfile(path):
        message = (
            f"{GGUF_NAME} not found at {path}; set SCRATCHLM_TEST_GGUF or run `scratchlm pull smollm2-135m-instruct`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# ---- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_meta() -> dict:
    reader = gguf.GGUFReader(smollm2_gguf_path())
    return {key: reader.fields[key].contents() for key in GGUF_TOKENIZER_KEYS}


@pytest.fixture(scope="module")
def smollm(gguf_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_meta)


def hf_reference(meta: dict, pre_tokenizer) -> tokenizers.Tokenizer:
    """HF tokenizers built straight from GGUF metadata, sharing no code with scratchlm."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    hf = tokenizers.Tokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    return hf


def hf_pre_tokenizer(name: str):
    """SmolLM2's real pre-tokenizer ("smollm") and the HF spellings of GPT-2's and GPT-4's."""
    if name == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if name == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(GPT4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@pytest.fixture(scope="module")
def hf_smollm(gguf_meta) -> tokenizers.Tokenizer:
    return hf_reference(gguf_meta, hf_pre_tokenizer("smollm"))


@pytest.fixture(scope="module")
def full_byte_tokenizer(smollm) -> Tokenizer:
    """SmolLM2 plus the byte tokens its vocabulary lacks (e.g. 0x1D, 0xF1), so every text round-trips."""
    vocab = dict(smollm.vocab)
    for char in BYTE_TO_UNICODE.values():
        if char not in vocab:
            vocab[char] = smollm.vocab_size + len(vocab) - len(smollm.vocab)
    return Tokenizer(vocab, smollm.merges, smollm.special_tokens, "smollm")


PROSE = """\
ACT I. SCENE I. Elsinore. A platform before the castle.
FRANCISCO at his post. Enter to him BERNARDO.
  BERNARDO. Who's there?
  FRANCISCO. Nay, answer me. Stand and unfold yourself.
  BERNARDO. Long live the King! 'Tis now struck twelve; get thee to bed, Francisco.
  FRANCISCO. For this relief much thanks. 'Tis bitter cold, And I am sick at heart.
We'll meet at 10:30 p.m. on 2024-03-14 — the price was $1,299.99 (≈ €1 200), up 3.5% y/y; π ≈ 3.14159.
Naïve café owners in São Paulo, Zürich and Kraków don't, won't, can't and shan't; I'd, you'll, they've, we're.
Ünïcödé: Ελληνικά, русский текст, 日本語のテキスト, 中文文本, 한국어 텍스트, עברית, العربية, हिन्दी, ไทย.
Emoji 😀 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇺🇸 🏳️‍🌈 and symbols ∑∫√∞ ≠ ≤ ≥ ← → ½ ¼ ² ³ ① Ⅻ.
\tTabbed\tcolumns\tand   runs    of     spaces,\r\nWindows line endings\r\n\n\n\nand blank lines.
"""


@pytest.fixture(scope="module")
def corpus() -> str:
    """~300 KB of varied text: Python sources from site-packages (code, comments, docstrings) and prose."""
    parts = [PROSE * 20]
    for package in ("tokenizers", "transformers", "torch"):
        # Located without importing, which would take seconds for torch.
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        budget = 100_000
        for path in sorted(root.rglob("*.py")):
            if budget <= 0:
                break
            text = path.read_text(encoding="utf-8", errors="replace")[:budget]
            parts.append(text)
            budget -= len(text)
    return "".join(parts)


EDGE_CASES = [
    "",
    " ",
    "hello world",
    "Hello, World!",
    "👨‍👩‍👧‍👦",
    "🇺🇸🇯🇵🇩🇪",
    "🏳️‍🌈 family: 👩🏽‍💻",
    "日本語と中文と한국어",
    "e\u0301 a\u0308 n\u0303 \u0301\u0301 x",
    "שָׁלוֹם مرحبا بالعالم",
    "\t\tindented\tcode",
    "a    b     c",
    "trailing spaces     ",
    "     leading spaces",
    "\n\n\nnewlines\n\n",
    "line one\r\nline two\r\n\r\n",
    " \n \n\t \n",
    "3.14159 1,000,000 12345678901234567890 0x1F -42 1e-9",
    "٣٤٥ ४२ ½ ² Ⅻ ①",
    "def f(x):\n    if x:\n        return [i**2 for i in range(10)]\n    return None\n",
    "It's I'd we'll they've you're I'm 'tis O'Neil's IT'S",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|><|im_end|>",
    "<|im_start <|im_end| <|notaspecial|>",
    "\u00a0\u2003\u3000\u200b\u2028 odd spaces",
    "\x00\x01\x7f control",
    "a" * 3000,
    "🙂" * 50,
]


# ---- encoding: agreement with HF tokenizers ---------------------------------------------------------------


def test_encode_matches_hf_tokenizers_on_corpus(smollm, hf_smollm, corpus):
    assert len(corpus) > 250_000
    ids = smollm.encode(corpus)
    assert ids == hf_smollm.encode(corpus).ids
    assert smollm.decode(ids) == corpus


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_encode_matches_hf_tokenizers_on_edge_cases(smollm, hf_smollm, text):
    ids = smollm.encode(text)
    assert ids == hf_smollm.encode(text).ids
    assert smollm.decode(ids) == hf_smollm.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=300, deadline=None)
@given(text=comparable_text)
def test_encode_matches_hf_tokenizers_on_random_text(smollm, hf_smollm, text):
    assert smollm.encode(text) == hf_smollm.encode(text).ids


def test_smollm_splits_every_digit(smollm):
    assert [smollm.decode([i]) for i in smollm.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


def test_bytes_missing_from_the_vocabulary_are_dropped_like_hf(smollm, hf_smollm):
    # SmolLM2 has no token for byte 0x1D (nor 0xF1, 0xF2: 4-byte UTF-8 leads of planes 4-11).
    text = "a\x1db \U00040000c"
    assert smollm.encode(text) == hf_smollm.encode(text).ids
    assert smollm.decode(smollm.encode(text)) == "ab \ufffd\ufffd\ufffdc"  # 3 orphaned continuation bytes


def test_long_words_encode_like_hf(smollm, hf_smollm):
    # One 20,000-character pre-token: quadratic BPE would take minutes here.
    common_hanzi = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得"
    text = "".join(common_hanzi[i * 7 % len(common_hanzi)] for i in range(20_000))
    assert smollm.encode(text) == hf_smollm.encode(text).ids


def _textbook_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as in GPT-2's encoder.py: merge every occurrence of the lowest-ranked pair, repeat."""
    parts = list(word)
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if parts[i : i + 2] == list(pair):
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


@st.composite
def merge_tables(draw):
    """Random merges over the alphabet "abc", each joining two tokens that exist by then (as training does)."""
    tokens, ranks = ["a", "b", "c"], {}
    for _ in range(draw(st.integers(0, 25))):
        left, right = draw(st.sampled_from(tokens)), draw(st.sampled_from(tokens))
        if (left, right) not in ranks:
            ranks[(left, right)] = len(ranks)
            tokens.append(left + right)
    return ranks


@settings(max_examples=300, deadline=None)
@given(ranks=merge_tables(), word=st.text("abc", max_size=40))
def test_heap_bpe_equals_textbook_bpe(ranks, word):
    assert bpe(word, ranks) == _textbook_bpe(word, ranks)


# ---- pre-tokenizers -----------------------------------------------------------------------------------------


def _digits_then_gpt2(text: str) -> list[str]:
    """SmolLM2's pre-tokenizer written as HF runs it: split off each number character, then GPT-2's regex
    on every piece."""
    pieces = [p for p in regex.split(r"(\p{N})", text) if p]
    return [match for piece in pieces for match in regex.findall(GPT2_PATTERN, piece)]


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from(" \t\n\r'sltvedmxA12٣.,!é🙂")) | st.text())
def test_smollm_single_regex_equals_digits_then_gpt2_regex(text):
    assert pretokenize(text, "smollm") == _digits_then_gpt2(text)


@pytest.mark.parametrize("name", ["gpt2", "smollm", "gpt4"])
@settings(max_examples=150, deadline=None)
@given(text=comparable_text)
def test_pretokenize_matches_hf_pre_tokenizers(name, text):
    ours = [to_byte_level(piece) for piece in pretokenize(text, name)]
    assert ours == [piece for piece, _ in hf_pre_tokenizer(name).pre_tokenize_str(text)]
    assert "".join(pretokenize(text, name)) == text


def test_pretokenize_examples():
    assert pretokenize("Hello world's 2024", "gpt2") == ["Hello", " world", "'s", " 2024"]
    assert pretokenize("Hello world's 2024", "smollm") == ["Hello", " world", "'s", " ", "2", "0", "2", "4"]
    assert pretokenize("Hello WORLD'S 12345\n\n", "gpt4") == ["Hello", " WORLD", "'S", " ", "123", "45", "\n\n"]


# ---- round trips -------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_decode_inverts_encode_for_any_text(full_byte_tokenizer, text):
    assert full_byte_tokenizer.decode(full_byte_tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.text(max_size=20) | st.sampled_from([IM_START, IM_END, ENDOFTEXT, "<|im", "|>"]), max_size=8)
)
def test_special_token_text_round_trips_as_plain_text_when_not_allowed(full_byte_tokenizer, parts):
    text = "".join(parts)
    ids = full_byte_tokenizer.encode(text, allowed_special="none")
    assert not set(ids) & set(full_byte_tokenizer.special_tokens.values())
    assert full_byte_tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=30), skip_special=st.booleans())
def test_decode_matches_hf_tokenizers_on_random_ids(smollm, hf_smollm, ids, skip_special):
    assert smollm.decode(ids, skip_special=skip_special) == hf_smollm.decode(ids, skip_special_tokens=skip_special)


# ---- special tokens ----------------------------------------------------------------------------------------


def test_special_tokens_are_recognised_only_when_allowed(smollm):
    text = f"{IM_START}user\nhi{IM_END}{ENDOFTEXT}"
    im_start, im_end, eot = (smollm.special_tokens[t] for t in (IM_START, IM_END, ENDOFTEXT))

    all_ids = smollm.encode(text)
    assert all_ids[0] == im_start and all_ids[-2:] == [im_end, eot]
    assert smollm.encode(text, allowed_special="all") == all_ids

    plain = smollm.encode(text, allowed_special="none")
    assert not {im_start, im_end, eot} & set(plain)
    assert smollm.decode(plain) == text

    only_end = smollm.encode(text, allowed_special={IM_END})
    assert im_end in only_end and im_start not in only_end and eot not in only_end
    assert smollm.decode(only_end) == text

    assert smollm.decode(all_ids, skip_special=True) == "user\nhi"


def test_longest_special_token_wins():
    vocab = {c: i for i, c in enumerate("abc")}
    tok = Tokenizer(vocab, [], {"<s>": 10, "<s>>": 11})
    assert tok.encode("a<s>>b<s>c") == [0, 11, 1, 10, 2]


def test_bad_allowed_special_is_a_config_error(smollm):
    with pytest.raises(ConfigError, match="<nope>"):
        smollm.encode("x", allowed_special={"<nope>"})
    with pytest.raises(ConfigError, match="allowed_special"):
        smollm.encode("x", allowed_special="some")


# ---- metadata ----------------------------------------------------------------------------------------------


def test_gguf_metadata_gives_ids_and_bos_eos(smollm, gguf_meta):
    assert smollm.pretokenizer == "smollm"
    assert smollm.vocab_size == len(gguf_meta["tokenizer.ggml.tokens"]) == 49152
    assert len(smollm.special_tokens) == 17
    assert (smollm.bos_token, smollm.bos_id) == (IM_START, 1)
    assert (smollm.eos_token, smollm.eos_id) == (IM_END, 2)
    assert smollm.token_to_id("Ġthe") == gguf_meta["tokenizer.ggml.tokens"].index("Ġthe")
    assert smollm.id_to_token(smollm.token_to_id("Ġthe")) == "Ġthe"
    assert smollm.token_to_id("no such token") is None and smollm.id_to_token(10**9) is None


def test_unsupported_gguf_tokenizers_are_named(gguf_meta):
    with pytest.raises(UnsupportedError, match="llama"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(UnsupportedError, match="qwen2"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(UnsupportedError, match="llama-bpe"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.pre": "llama-bpe"})
    with pytest.raises(ModelFileError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({k: v for k, v in gguf_meta.items() if k != "tokenizer.ggml.tokens"})


def test_inconsistent_inputs_are_reported():
    with pytest.raises(ConfigError, match="pre-tokenizer"):
        Tokenizer({"a": 0}, [], {}, pretokenizer="bert")
    with pytest.raises(ModelFileError, match="'ab'"):
        Tokenizer({"a": 0, "b": 1}, [("a", "b")], {})
    with pytest.raises(ConfigError, match="eos_token"):
        Tokenizer({"a": 0}, [], {}, eos_token="</s>")


# ---- files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm", "gpt2", "gpt4"])
def test_saved_file_loads_in_hf_tokenizers_and_encodes_identically(smollm, gguf_meta, corpus, tmp_path, name):
    ours = Tokenizer(smollm.vocab, smollm.merges, smollm.special_tokens, pretokenizer=name)
    path = tmp_path / "tokenizer.json"
    ours.save(path)
    from_our_file = tokenizers.Tokenizer.from_file(str(path))
    independent = hf_reference(gguf_meta, hf_pre_tokenizer(name))
    for text in [corpus[:30_000], *EDGE_CASES]:
        ids = ours.encode(text)
        assert ids == from_our_file.encode(text).ids == independent.encode(text).ids
        assert from_our_file.decode(ids, skip_special_tokens=False) == ours.decode(ids)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left behind


def test_saved_smollm_file_uses_digits_then_byte_level(smollm, tmp_path):
    smollm.save(tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    pre = spec["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] is True
    assert pre["pretokenizers"][1]["use_regex"] is True and pre["pretokenizers"][1]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    assert {t["content"] for t in spec["added_tokens"] if t["special"]} == set(smollm.special_tokens)


@pytest.mark.parametrize("name", ["smollm", "gpt2", "gpt4"])
def test_from_file_round_trips_a_saved_tokenizer(smollm, tmp_path, name):
    original = Tokenizer(smollm.vocab, smollm.merges, smollm.special_tokens, pretokenizer=name)
    original.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json", bos_token=IM_START, eos_token=IM_END)
    assert loaded.pretokenizer == name
    assert loaded.vocab == original.vocab and loaded.merges == original.merges
    assert loaded.special_tokens == original.special_tokens
    assert (loaded.bos_id, loaded.eos_id) == (1, 2)
    for text in EDGE_CASES:
        assert loaded.encode(text) == original.encode(text)


def test_from_file_reads_files_written_by_hf_tokenizers(hf_smollm, smollm, corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    hf_smollm.save(str(path))
    loaded = Tokenizer.from_file(path)
    assert loaded.pretokenizer == "smollm"
    assert loaded.encode(corpus[:50_000]) == smollm.encode(corpus[:50_000])
    # Older files spell merges as "a b" strings.
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    path.write_text(json.dumps(spec), encoding="utf-8")
    assert Tokenizer.from_file(path).merges == smollm.merges


def test_from_file_reports_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelFileError):
        Tokenizer.from_file(tmp_path / "garbage.json")
    wordpiece = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.save(str(tmp_path / "wordpiece.json"))
    with pytest.raises(UnsupportedError, match="WordPiece"):
        Tokenizer.from_file(tmp_path / "wordpiece.json")
    metaspace = tokenizers.Tokenizer(models.BPE({"a": 0}, []))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.save(str(tmp_path / "metaspace.json"))
    with pytest.raises(UnsupportedError, match="Metaspace"):
        Tokenizer.from_file(tmp_path / "metaspace.json")


# ---- streaming ---------------------------------------------------------------------------------------------


def _stream(decoder: StreamDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=40), skip_special=st.booleans())
def test_streamed_text_equals_decode(smollm, ids, skip_special):
    pieces = _stream(smollm.stream_decoder(skip_special=skip_special), ids)
    assert "".join(pieces) == smollm.decode(ids, skip_special=skip_special)


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1))
def test_streaming_valid_text_never_emits_replacement_characters(full_byte_tokenizer, text):
    ids = full_byte_tokenizer.encode(text)
    pieces = _stream(full_byte_tokenizer.stream_decoder(), ids)
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in piece for piece in pieces)


def test_emoji_split_across_byte_tokens_is_held_back_until_complete(smollm):
    emoji = "👨‍👩‍👧‍👦"
    ids = smollm.encode(emoji)
    assert len(ids) > 4  # several byte-level tokens, some of them partial characters
    assert any("\ufffd" in smollm.decode([i]) for i in ids)
    decoder = smollm.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == emoji
    assert all("\ufffd" not in p for p in pieces)


def test_stream_flush_replaces_an_unfinished_character_and_resets(smollm):
    partial = smollm.encode("🙂")[:1]  # the first byte(s) of a four-byte character
    decoder = smollm.stream_decoder()
    assert decoder.push(partial[0]) == ""
    assert decoder.flush() == "\ufffd" == smollm.decode(partial)
    assert decoder.push(smollm.encode("ok")[0]) == "ok"


def test_stream_decoder_skips_special_tokens_by_default(smollm):
    ids = smollm.encode(f"{IM_START}hi{IM_END}")
    assert "".join(_stream(smollm.stream_decoder(), ids)) == "hi"
    assert "".join(_stream(smollm.stream_decoder(skip_special=False), ids)) == f"{IM_START}hi{IM_END}"


def test_missing_bytes_are_dropped_before_merging_like_hf(smollm, hf_smollm):
    # Found by hypothesis: 0xF1 has no token, and HF merges the bytes on either side of it.
    text = "\U0007d703\U0007d000"
    assert smollm.encode(text) == hf_smollm.encode(text).ids
