"""scratchlm data clean: exact dedup, the Gopher rules, near-dedup, the report, streaming, errors, training input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.data.clean import CleanOptions, clean_corpus, format_report, normalise_exact
from scratchlm.data.quality import QualityRules, check, language_agnostic, measure, parse_rule, rule_names, words_of
from scratchlm.errors import ConfigError

NO_FILTERS = CleanOptions(exact=False, near=False, quality=None)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def kept_texts(out: Path) -> list[str]:
    return [json.loads(line)["text"] for shard in sorted(out.glob("part-*.jsonl"))
            for line in shard.read_text(encoding="utf-8").splitlines()]


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct four-letter alphabetic words (consonant-vowel pairs), in a shuffled order."""
    words = [a + b + c + d for a in "bdfgklmnprst" for b in "aeiou" for c in "bdfgklmnprst" for d in "aeiou"]
    random.Random(seed).shuffle(words)
    return words[:n]


def good_document(n_words: int = 70, seed: int = 0) -> str:
    """A document that passes every Gopher rule: distinct words, two stop words, 10 lines, no repetition."""
    words = ["the", "and"] + pseudo_words(n_words - 2, seed)
    return "\n".join(" ".join(words[i:i + 7]) + "." for i in range(0, n_words, 7))


# ---- exact deduplication ------------------------------------------------------------------------------
def test_exact_dedup_removes_normalised_variants_only(tmp_path):
    texts = ["Hello World", "hello   world", "HELLO\nWORLD\n", "Ｈｅｌｌｏ World",  # case, spacing, full-width
             "a ﬁne day", "A fine day",  # the ligature ﬁ is NFKC "fi"
             "Hello, World"]  # punctuation is content: not an exact duplicate
    assert normalise_exact("  HELLO\n\tWorld ") == "hello world"
    report = clean_corpus([write_jsonl(tmp_path / "in.jsonl", texts)], tmp_path / "out",
                          CleanOptions(near=False, quality=None))
    assert kept_texts(tmp_path / "out") == ["Hello World", "a ﬁne day", "Hello, World"]
    removed = report["removed"]["exact_duplicate"]
    assert removed["documents"] == 4
    assert [e["source"].rsplit(":", 1)[1] for e in removed["examples"]] == ["2", "3", "4"]  # the first three
    assert removed["characters"] == sum(map(len, ["hello   world", "HELLO\nWORLD\n", "Ｈｅｌｌｏ World", "A fine day"]))


# ---- the Gopher rules ------------------------------------------------------------------------------------
def test_words_strip_punctuation_and_symbols_at_their_ends():
    assert words_of("(end). a--b -- «Être» 1999, #tag ...") == ["end", "a--b", "Être", "1999", "tag"]


def test_word_symbol_and_line_measures_by_hand():
    text = "The cat sat. #tag ... end…\n• item one\n• item two"
    m = measure(text)
    # words: The cat sat tag end item one item two (9); "...", "•" are no words
    assert m["words"] == 9
    assert m["mean_word_length"] == pytest.approx(29 / 9)
    assert m["hash_ratio"] == pytest.approx(1 / 9)
    assert m["ellipsis_ratio"] == pytest.approx(2 / 9)  # "..." and "…"
    assert m["bullet_lines"] == pytest.approx(2 / 3)
    assert m["ellipsis_lines"] == pytest.approx(1 / 3)  # the first line ends with "…"
    assert m["alpha_words"] == 1.0
    assert m["stop_words"] == 1  # only "the" of the eight
    assert measure("1999 2000 word")["alpha_words"] == pytest.approx(1 / 3)


def test_repetition_measures_by_hand():
    text = "a b c\na b c\nx y\n\nfoo bar\n\nfoo bar"  # 33 characters
    m = measure(text)
    assert m["dup_lines"] == pytest.approx(2 / 5)  # lines: a b c, a b c, x y, foo bar, foo bar
    assert m["dup_line_chars"] == pytest.approx((5 + 7) / 33)
    assert m["dup_paragraphs"] == pytest.approx(1 / 3)
    assert m["dup_paragraph_chars"] == pytest.approx(7 / 33)
    # word characters: 8 one-letter words + foo bar foo bar = 20; most frequent 2-grams: "a b", "b c", "foo bar"
    # (twice each): the longest counts, 2 x 6 characters
    assert m["top_2gram"] == pytest.approx(12 / 20)
    assert m["top_3gram"] == pytest.approx(6 / 20)  # "a b c" twice
    assert m["top_4gram"] == 0.0  # every 4-gram once

    m = measure("one two three four five six one two three four five seven")  # 46 word characters
    assert m["top_2gram"] == pytest.approx(2 * len("threefour") / 46)
    assert m["top_3gram"] == pytest.approx(2 * len("threefourfive") / 46)
    assert m["top_4gram"] == pytest.approx(2 * len("twothreefourfive") / 46)
    assert m["dup_5gram"] == pytest.approx(2 * len("onetwothreefourfive") / 46)  # both copies count
    assert m["dup_6gram"] == 0.0
    # overlapping repeated n-grams count each word once: "x y" x 6 is covered whole by repeated 5-grams
    assert measure("xx yy " * 6)["dup_5gram"] == 1.0


def test_a_good_document_passes_and_each_rule_removes_its_crafted_document():
    rules = QualityRules()
    good = good_document()
    assert check(good, rules) is None
    lines = good.split("\n")
    short_words = " ".join(a + b for a in "bdfgk" for b in "aeiou" * 3)[:200]
    long_words = " ".join(w * 3 for w in pseudo_words(60))
    para = "\n".join(lines[:9])
    cases = {
        "min_words": (" ".join(good.split()[:30]), rules),
        "max_words": (good, rules.replace(max_words=60)),
        "min_mean_word_length": ("the and " + short_words, rules),
        "max_mean_word_length": ("the and " + long_words, rules),
        "max_hash_ratio": (good + " #" * 8, rules),  # 8 / 70 > 0.1
        "max_ellipsis_ratio": (good + " ..." * 8, rules),
        "max_bullet_lines": ("\n".join("• " + line for line in lines), rules),  # 10 of 10 lines
        "max_ellipsis_lines": ("\n".join(line + ("…" if i < 4 else "") for i, line in enumerate(lines)), rules),
        "min_alpha_words": (good + " " + " ".join(str(i) for i in range(20)), rules),  # 70 / 90 < 0.8
        "min_stop_words": (good.replace("the and", "tho anda"), rules),
        "max_dup_lines": ("\n".join(lines + lines[:5]), rules),  # 5 / 15 lines repeat
        "max_dup_paragraphs": (f"{para}\n\n{lines[9]}\n\n{lines[9]}", rules),  # 1 / 3 paragraphs, 1 / 11 lines
        "max_dup_line_chars": ("\n".join(lines[:3] + [" ".join(lines[3:])] * 2), rules),  # 1 / 5 lines
        "max_dup_paragraph_chars": (f"{para}\n\n{para}\n\n{lines[9]}\n\n{lines[8]}\n\n{lines[7]}",
                                    rules.replace(max_dup_lines=None, max_dup_line_chars=None)),
        "max_top_2gram": (good + " mama papa" * 12, rules),
        "max_dup_5gram": (good + (" " + " ".join(pseudo_words(8, seed=9))) * 2, rules),  # 8 words twice
    }
    for rule, (text, these_rules) in cases.items():
        failed = check(text, these_rules)
        assert failed is not None and failed[0] == rule, (rule, failed, measure(text))


def rich_document() -> str:
    """A document in which every statistic the rules read is above zero."""
    words = pseudo_words(40, seed=3)
    body = " ".join(words[:20]) + " the of 1999 #x ..."
    repeated = " ".join(words[20:32])
    return f"{body}\n• {repeated}\n• {repeated}…\n\n{repeated}\n\n{repeated}"


def test_every_rule_reads_its_statistic_and_compares_the_right_way():
    """For each rule alone: the document passes at its measured value and fails just beyond it."""
    text = rich_document()
    m = measure(text)
    assert all(value > 0 for value in m.values()), m
    off = {name: None for name in rule_names()}
    for name in rule_names():
        value = m[name.split("_", 1)[1]]
        beyond = value + 1e-6 if name.startswith("min_") else value - 1e-6
        assert check(text, QualityRules(**(off | {name: value}))) is None, name
        assert check(text, QualityRules(**(off | {name: beyond}))) == (name, pytest.approx(value)), name


def test_rule_options_parse_and_language_agnostic_drops_english_rules():
    assert parse_rule("min_words=20") == ("min_words", 20.0)
    assert parse_rule("max-dup-5gram=off") == ("max_dup_5gram", None)
    for bad in ("min_word=3", "min_words", "min_words=many"):
        with pytest.raises(ConfigError, match="--rule"):
            parse_rule(bad)
    agnostic = language_agnostic(QualityRules())
    assert agnostic.min_stop_words is None and agnostic.min_mean_word_length is None
    assert agnostic.max_dup_lines == 0.3
    german = QualityRules(stop_words=("der", "die", "und"))
    assert check(good_document().replace("the and", "der und"), german) is None
    with pytest.raises(ConfigError, match="stop-word list"):
        QualityRules(stop_words=())


# ---- near duplicates, the report, the table -------------------------------------------------------------
def test_clean_removes_planted_near_duplicates_and_the_counts_add_up(tmp_path):
    rng = random.Random(0)
    vocabulary = pseudo_words(400, seed=1)
    originals = [" ".join(rng.choice(vocabulary) for _ in range(300)) for _ in range(30)]
    near = []
    for text in originals[:15]:
        words = text.split()
        words[rng.randrange(300)] = "changed"  # one word of 300: Jaccard ~0.97 on 5-word shingles
        near.append(" ".join(words))
    texts = originals + near + [originals[0].upper(), "   ", "too short"]
    write_jsonl(tmp_path / "a.jsonl", texts[:20])
    (tmp_path / "more").mkdir()
    write_jsonl(tmp_path / "more" / "b.jsonl", texts[20:])
    (tmp_path / "more" / "note.txt").write_text(originals[1], encoding="utf-8")  # a text file: one document
    options = CleanOptions(quality=QualityRules(min_stop_words=None), shard_docs=7)
    report = clean_corpus([tmp_path / "a.jsonl", tmp_path / "more"], tmp_path / "out", options)

    assert kept_texts(tmp_path / "out") == originals
    removed = {name: t["documents"] for name, t in report["removed"].items() if t["documents"]}
    assert removed == {"near_duplicate": 15, "exact_duplicate": 2, "empty": 1, "min_words": 1}
    assert report["documents_in"] == len(texts) + 1 == report["documents_kept"] + sum(removed.values())
    assert report["characters_in"] == report["characters_kept"] + sum(
        t["characters"] for t in report["removed"].values())
    example = report["removed"]["near_duplicate"]["examples"][0]
    assert example["source"].endswith("b.jsonl:11") and example["similar_to"].endswith("a.jsonl:1")
    assert report["removed"]["min_words"]["examples"][0]["value"] == 2
    assert report["shards"] == [f"part-0000{i}.jsonl" for i in range(5)]  # 30 documents, 7 per shard
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    table = format_report(report)
    assert "near_duplicate" in table and "kept" in table and "max_words" not in table  # removed nothing


def test_verify_keeps_candidates_whose_estimated_similarity_is_below_the_threshold(tmp_path):
    """32 bands of 4 rows make a pair of Jaccard ~0.6 a candidate almost surely; --verify then keeps it."""
    rng = random.Random(2)
    vocabulary = pseudo_words(300)
    words = [rng.choice(vocabulary) for _ in range(400)]
    variant = list(words)
    for i in range(0, 400, 25):
        variant[i] = "other"  # 16 edits break 80 of 396 shingles: Jaccard ~ 316 / 476 ~ 0.66
    texts = [" ".join(words), " ".join(variant)]
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    loose = CleanOptions(quality=None, threshold=0.8, bands=32, rows=4)
    assert clean_corpus([path], tmp_path / "a", loose)["documents_kept"] == 1
    report = clean_corpus([path], tmp_path / "b", CleanOptions(quality=None, threshold=0.8, bands=32, rows=4,
                                                               verify=True))
    assert report["documents_kept"] == 2 and report["lsh"]["verify"]
    report = clean_corpus([path], tmp_path / "c", CleanOptions(quality=None, threshold=0.5, bands=32, rows=4,
                                                               verify=True))
    example = report["removed"]["near_duplicate"]["examples"][0]
    assert 0.5 <= example["estimated_jaccard"] <= 0.8 and example["similar_to"].endswith("in.jsonl:1")


def test_text_files_and_jsonl_with_a_byte_order_mark_read_as_utf8(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n")
    (tmp_path / "bom.txt").write_bytes("\ufeffsecond\r\n".encode())
    clean_corpus([tmp_path / "bom.jsonl", tmp_path / "bom.txt"], tmp_path / "out", NO_FILTERS)
    assert kept_texts(tmp_path / "out") == ["first", "second\r\n"]


def test_cli_clean_prints_the_table_and_replaces_only_its_own_output(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [good_document(seed=s) for s in range(3)] + [good_document()])
    out = tmp_path / "clean"
    assert main(["data", "clean", str(data), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exact_duplicate" in printed and "wrote 3 documents in 1 shard(s)" in printed
    assert main(["data", "clean", str(data), "--out", str(out), "--force", "--json", "--no-exact"]) == 0
    assert json.loads(capsys.readouterr().out)["documents_kept"] == 3  # near-dedup caught the copy
    assert main(["data", "rules"]) == 0
    assert "max_dup_10gram" in capsys.readouterr().out


@pytest.mark.parametrize("args, content, message", [
    (["missing.jsonl"], None, "does not exist"),
    (["in.jsonl"], '{"text": "fine"}\n{"text": broken\n', "line 2: not valid JSON"),
    (["in.jsonl"], '{"body": "x"}\n', "no 'text' field; pass --text-field"),
    (["in.jsonl"], b'{"text": "caf\xe9"}\n', "invalid UTF-8 at byte offset 13 (line 1"),
    (["in.jsonl", "--bands", "20", "--rows", "10"], '{"text": "x"}\n', "at most --num-perm 128"),
    (["in.jsonl", "--bands", "20"], '{"text": "x"}\n', "both --bands and --rows"),
    (["in.jsonl", "--threshold", "1.5"], '{"text": "x"}\n', "--threshold must be between 0 and 1"),
    (["in.jsonl", "--rule", "min_wrds=3"], '{"text": "x"}\n', "NAME one of min_words"),
    (["in.jsonl", "--stop-words", ""], '{"text": "x"}\n', "needs a stop-word list"),
    (["in.jsonl", "--shingle-size", "0"], '{"text": "x"}\n', "--shingle-size must be at least 1"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, monkeypatch, args, content, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        path = tmp_path / "in.jsonl"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["data", "clean", *args, "--out", "out", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_an_output_inside_an_input_folder_is_not_read_again(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [good_document(seed=1), good_document(seed=2)])
    clean_corpus([corpus], corpus / "clean")
    report = clean_corpus([corpus], corpus / "clean", force=True)  # the first run's shards are not inputs
    assert report["inputs"] == [str(corpus / "a.jsonl")] and report["documents_in"] == 2
    report = clean_corpus([corpus / "clean"], tmp_path / "again")  # named, an output is an input like any other
    assert report["documents_kept"] == 2


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [good_document()])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    assert main(["data", "clean", str(data), "--out", str(tmp_path / "mine"), "--no-progress"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["data", "clean", str(data), "--out", str(tmp_path / "mine"), "--force", "--no-progress"]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


# ---- streaming ---------------------------------------------------------------------------------------------
def test_memory_does_not_grow_with_the_input_size(tmp_path):
    """A 16 MB input through a process whose peak memory may grow by at most 4 MB: nothing holds the input.

    1,600 documents of 10 kB: 50 distinct ones (through every filter, into the LSH index) repeated 32 times.
    """
    distinct = [" ".join(pseudo_words(2100, seed=s)) + " the and" for s in range(50)]
    size = 0
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as f:
        for i in range(1600):
            line = json.dumps({"text": distinct[i % 50]}) + "\n"
            f.write(line)
            size += len(line)
    assert size > 16 * 2**20
    write_jsonl(tmp_path / "warm.jsonl", distinct[:3] * 2)
    script = textwrap.dedent(f"""
        import resource
        from scratchlm.data.clean import clean_corpus
        clean_corpus([{str(tmp_path / 'warm.jsonl')!r}], {str(tmp_path / 'warm')!r})  # imports, first buffers
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = clean_corpus([{str(tmp_path / 'big.jsonl')!r}], {str(tmp_path / 'out')!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(report["documents_kept"], report["removed"]["exact_duplicate"]["documents"], (after - before) * 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    kept, duplicates, growth = map(int, result.stdout.split())
    print(f"peak memory grew by {growth / 2**20:.2f} MiB")
    assert (kept, duplicates) == (50, 1550)
    assert growth < 4 * 2**20, f"peak memory grew by {growth / 2**20:.1f} MiB over a {size / 2**20:.0f} MiB input"


# ---- training on the cleaned shards ---------------------------------------------------------------------
def test_training_data_packs_the_cleaned_documents_separated_by_end_of_text(tmp_path):
    from scratchlm.train.chars import train_char_tokenizer
    from scratchlm.train.data import prepare_dataset

    texts = [good_document(seed=s) for s in range(4)]
    clean_corpus([write_jsonl(tmp_path / "in.jsonl", texts + texts[:2])], tmp_path / "clean", shard_docs_options())
    tokenizer = train_char_tokenizer(texts, special_tokens=["<|endoftext|>"], eos_token="<|endoftext|>")
    prepared = prepare_dataset(tmp_path / "clean", tokenizer, tmp_path / "data", val_fraction=0.1, progress=False)
    assert prepared.meta["documents"] == 4
    ids = np.concatenate([prepared.train(), prepared.val()]).tolist()
    pieces, current = [], []
    for token in ids:
        if token == tokenizer.eos_id:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    pieces.append(current)
    assert [tokenizer.decode(p) for p in pieces] == texts  # in order, one end-of-text between documents


def shard_docs_options() -> CleanOptions:
    return CleanOptions(shard_docs=3)
