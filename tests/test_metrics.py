"""Task metrics (scratchlm.eval.metrics) against their reference implementations.

BLEU must equal ``sacrebleu.corpus_bleu`` and ROUGE-L ``rouge_score``'s rougeL F-measure to 1e-6 on a test set
that exercises their tokenizers (punctuation, numbers with separators, dashes, HTML entities, case, non-ASCII)
and their edge cases (empty strings, no matches, brevity penalty, several references).
"""

from __future__ import annotations

import random

import pytest

from scratchlm.eval.metrics import corpus_bleu, exact_match, rouge_l, score_all, token_f1, tokenize_13a

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

WORDS = ("the cat sat on a mat , . ; 3.5 1,000 2024-03-07 dog-house it's \"quoted\" &amp; &quot;x&quot; <b> "
         "12-3 Hello WORLD ünï café (a) [b] {c} $5 50% e-mail U.S.A. co-op ... ?! \u2014 x/y").split()

HAND_PICKED = [
    ("The cat sat on the mat.", "The cat is on the mat."),
    ('{"name": "Esme Lindqvist", "city": "Hamburg", "date": "2025-03-30", "guests": 9}',
     '{"name": "Esme Lindqvist", "city": "Hamburg", "date": "2025-03-30", "guests": 9}'),
    ('{"name": "Esme", "guests": "nine"}', '{"name": "Esme Lindqvist", "city": "Hamburg", "guests": 9}'),
    ("", "nothing predicted"),
    ("a prediction", ""),
    ("It costs $1,000.50 - or 3.5%.", "It costs 1,000.50 dollars, or 3.5 %."),
    ("Hello &amp; goodbye", "Hello & goodbye"),
    ("short", "a much longer reference sentence that forces a brevity penalty"),
]


def random_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14)))


def random_corpus(seed: int, n: int) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    return ([random_sentence(rng) for _ in range(n)], [random_sentence(rng) for _ in range(n)],
            [random_sentence(rng) for _ in range(n)])


def test_13a_tokenizer_matches_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    reference = Tokenizer13a()
    hyps, refs, _ = random_corpus(0, 100)
    for line in hyps + refs + [h for h, _ in HAND_PICKED]:
        assert tokenize_13a(line) == reference(line.rstrip()).split()


@pytest.mark.parametrize("seed", range(5))
def test_corpus_bleu_equals_sacrebleu(seed):
    hyps, refs, _ = random_corpus(seed, 1 + 7 * seed)
    ours = corpus_bleu(hyps, refs)
    assert ours == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-6)


def test_corpus_bleu_with_two_references_equals_sacrebleu():
    hyps, refs, refs2 = random_corpus(11, 30)
    ours = corpus_bleu(hyps, [[a, b] for a, b in zip(refs, refs2)])
    expected = sacrebleu.corpus_bleu(hyps, [refs, refs2]).score
    assert expected > 1.0  # the test set is not degenerate
    assert ours == pytest.approx(expected, abs=1e-6)


def test_bleu_of_hand_picked_pairs_equals_sacrebleu_including_edge_cases():
    for hyp, ref in HAND_PICKED:
        assert corpus_bleu([hyp], [ref]) == pytest.approx(sacrebleu.corpus_bleu([hyp], [[ref]]).score, abs=1e-6)
    hyps, refs = zip(*HAND_PICKED)
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score, abs=1e-6)
    assert corpus_bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_rouge_l_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    hyps, refs, _ = random_corpus(3, 200)
    pairs = list(zip(hyps, refs)) + HAND_PICKED
    nonzero = 0
    for hyp, ref in pairs:
        expected = scorer.score(ref, hyp)["rougeL"].fmeasure
        assert rouge_l(hyp, ref) == pytest.approx(expected, abs=1e-6)
        nonzero += expected > 0
    assert nonzero > 50


def test_exact_match_is_strict_but_ignores_surrounding_whitespace():
    assert exact_match(' {"a": 1}\n', '{"a": 1}') == 1.0
    assert exact_match('{"a":1}', '{"a": 1}') == 0.0
    assert exact_match("Paris", "paris") == 0.0


def test_token_f1_follows_squad():
    assert token_f1("The Eiffel Tower!", "eiffel tower") == 1.0  # case, punctuation and articles ignored
    assert token_f1("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", "") == 1.0
    assert token_f1("something", "") == 0.0
    assert token_f1("red", "blue") == 0.0


def test_score_all_reports_every_metric():
    scores = score_all(['{"a": 1}', "wrong"], ['{"a": 1}', "right answer"])
    assert scores["exact_match"] == 0.5
    assert set(scores) == {"exact_match", "token_f1", "bleu", "rouge_l"}
    assert 0 < scores["rouge_l"] < 1 and 0 <= scores["bleu"] <= 100
