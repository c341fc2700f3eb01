"""Text metrics for task evaluation: exact match, token F1, BLEU and ROUGE-L, written here.

* **Exact match**: the prediction equals the reference after stripping surrounding whitespace (strict:
  for structured outputs a changed comma is a wrong answer).
* **Token F1** (SQuAD, Rajpurkar et al. 2016): precision and recall of the bag of words after SQuAD's
  normalisation (lower case, no punctuation, no articles a/an/the), their harmonic mean.
* **BLEU** (Papineni et al. 2002) as ``sacrebleu.corpus_bleu`` computes it with its defaults: the
  ``13a`` tokenizer (mteval-v13a, WMT), 1- to 4-gram precisions clipped by the reference counts over the
  whole corpus, the closest reference length, brevity penalty, and "exp" smoothing for orders with no
  match (NIST's method 3). Scores are on sacreBLEU's 0-100 scale.
* **ROUGE-L** (Lin 2004) as ``rouge_score.RougeScorer(["rougeL"])`` computes it: lower-cased ASCII
  letters and digits as tokens, the longest common subsequence, F-measure per pair; averaged over pairs.

``sacrebleu`` and ``rouge-score`` are the references in tests/test_metrics.py (equal to 1e-6).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

# ---- exact match and token F1 ---------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after stripping surrounding whitespace, else 0.0."""
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between two texts (1.0 when both normalise to nothing)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- BLEU ------------------------------------------------------------------------------------------------------
# mteval-v13a's tokenization, in the order sacreBLEU applies it: punctuation and symbols become tokens,
# periods and commas split off unless between digits, a dash after a digit splits off.
_BLEU_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]
MAX_ORDER = 4


def tokenize_13a(line: str) -> list[str]:
    """The ``13a`` tokens of a line (sacreBLEU's default tokenizer)."""
    line = line.rstrip()
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _BLEU_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (0-100) of ``hypotheses[i]`` against ``references[i]`` (one string or several)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    sys_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        ref_tokens = [tokenize_13a(r) for r in refs]
        # A hypothesis n-gram counts up to the most times any single reference has it.
        max_ref: Counter = Counter()
        for tokens in ref_tokens:
            for gram, count in _ngrams(tokens).items():
                max_ref[gram] = max(max_ref[gram], count)
        hyp_tokens = tokenize_13a(hyp)
        # The reference length closest to the hypothesis length; on a tie, the shorter one.
        closest = min((abs(len(hyp_tokens) - len(t)), len(t)) for t in ref_tokens)[1]
        sys_len += len(hyp_tokens)
        ref_len += closest
        for gram, count in _ngrams(hyp_tokens).items():
            total[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, max_ref.get(gram, 0))
    return bleu_from_counts(correct, total, sys_len, ref_len)


def bleu_from_counts(correct: list[int], total: list[int], sys_len: int, ref_len: int) -> float:
    """BLEU from matched and total n-gram counts and the two corpus lengths, with "exp" smoothing."""
    if not any(correct):
        return 0.0
    brevity = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions = [0.0] * MAX_ORDER
    smooth = 1.0
    for n in range(MAX_ORDER):
        if total[n] == 0:
            break  # no n-grams of this order at all: its precision stays 0
        if correct[n] == 0:
            smooth *= 2  # NIST smoothing: 1/2, 1/4, ... of a match for each order without one
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    # sacreBLEU floors log(0) at -9999999999 rather than failing, which makes such a score 0.
    logs = [math.log(p) if p > 0 else -9999999999 for p in precisions]
    return brevity * math.exp(sum(logs) / MAX_ORDER)


# ---- ROUGE-L ----------------------------------------------------------------------------------------------------
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def tokenize_rouge(text: str) -> list[str]:
    """rouge-score's tokens: lower case, runs of characters other than a-z and 0-9 separate tokens."""
    return [t for t in _NON_ALPHANUMERIC.sub(" ", text.lower()).split() if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one prediction against its reference (0-1)."""
    pred, ref = tokenize_rouge(prediction), tokenize_rouge(reference)
    if not pred or not ref:
        return 0.0
    common = lcs_length(ref, pred)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- all together -----------------------------------------------------------------------------------------------
def score_all(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match, token F1 and ROUGE-L (means over pairs, 0-1) and corpus BLEU (0-100)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = max(len(predictions), 1)
    pairs = list(zip(predictions, references))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / n,
        "bleu": corpus_bleu(predictions, references) if pairs else 0.0,
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n,
    }
