"""Build the offline lm-evaluation-harness tasks in ``src/scratchlm/eval/tasks/`` from packaged sources.

lm-eval's standard tasks download their data from the Hugging Face hub. These need nothing but the package:
questions made from the bundled Shakespeare corpus, arithmetic and yes/no questions about numbers. The
output is deterministic (seeded): running the script again rewrites the same bytes.

    python scripts/make_harness_tasks.py [--out src/scratchlm/eval/tasks] [--n 150]

Each task is one JSONL file (the documents) and one YAML file (lm-eval's task config); ``loader.py`` beside
them turns a JSONL file into the dataset lm-eval expects, without touching the network.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from scratchlm.files import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "scratchlm" / "data" / "shakespeare.txt"
OUT = ROOT / "src" / "scratchlm" / "eval" / "tasks"
SEED = 20

COMMON = "custom_dataset: !function loader.load\ntest_split: test\nmetadata:\n  version: 1.0\n"
YAML = {
    "next_line": """\
task: scratchlm_next_line
dataset_kwargs:
  file: next_line.jsonl
output_type: multiple_choice
doc_to_text: "{{context}}"
target_delimiter: "\\n"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "last_word": """\
task: scratchlm_last_word
dataset_kwargs:
  file: last_word.jsonl
output_type: loglikelihood
doc_to_text: "{{context}}"
target_delimiter: " "
doc_to_target: "{{target}}"
metric_list:
  - metric: perplexity
  - metric: acc
""",
    "arithmetic": """\
task: scratchlm_arithmetic
dataset_kwargs:
  file: arithmetic.jsonl
output_type: generate_until
doc_to_text: "Question: What is {{a}} {{op}} {{b}}?\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    regexes_to_ignore: ["\\\\s"]
""",
    "yes_no": """\
task: scratchlm_yes_no
dataset_kwargs:
  file: yes_no.jsonl
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: ["no", "yes"]
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""",
    "passages": """\
task: scratchlm_passages
dataset_kwargs:
  file: passages.jsonl
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
}
GROUP = """\
group: scratchlm_offline
task:
  - scratchlm_next_line
  - scratchlm_last_word
  - scratchlm_arithmetic
  - scratchlm_yes_no
  - scratchlm_passages
metadata:
  version: 1.0
"""


def speech_lines(text: str) -> list[list[str]]:
    """Runs of verse/prose lines spoken without interruption (speaker names, headings, stage directions
    and blank lines end a run)."""
    runs, run = [], []
    for raw in text.splitlines():
        line = raw.strip()
        spoken = 20 <= len(line) <= 90 and not line.startswith("[") and not line.isupper() and \
            not re.match(r"^(ACT|Scene|SCENE)\b", line)
        if spoken:
            run.append(line)
        else:
            if len(run) >= 3:
                runs.append(run)
            run = []
    return runs


def next_line(runs: list[list[str]], rng: random.Random, n: int) -> list[dict]:
    """Two lines of a speech; which of four lines comes next (the other three from elsewhere)."""
    pool = [line for run in runs for line in run]
    docs = []
    for run in rng.sample([r for r in runs if len(r) >= 3], n):
        at = rng.randrange(len(run) - 2)
        answer = run[at + 2]
        choices = [answer] + [line for line in rng.sample(pool, 3)]
        rng.shuffle(choices)
        docs.append({"context": "\n".join(run[at:at + 2]), "choices": choices, "label": choices.index(answer)})
    return docs


def last_word(runs: list[list[str]], rng: random.Random, n: int) -> list[dict]:
    """A line and the next one without its last word (a cloze, as LAMBADA): the word is the target."""
    docs = []
    for run in rng.sample(runs, len(runs)):
        at = rng.randrange(1, len(run))
        match = re.match(r"^(.*\S)\s+([A-Za-z']+)[.,;:!?]*$", run[at])
        if match and len(match.group(2)) >= 3:
            docs.append({"context": run[at - 1] + "\n" + match.group(1), "target": match.group(2)})
        if len(docs) == n:
            break
    return docs


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    docs = []
    for _ in range(n):
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        op = rng.choice(["plus", "minus"])
        docs.append({"a": a, "op": op, "b": b, "answer": str(a + b if op == "plus" else a - b)})
    return docs


def yes_no(rng: random.Random, n: int) -> list[dict]:
    docs = []
    for i in range(n):
        a, b = rng.sample(range(1, 100), 2)
        kind = i % 3
        if kind == 0:
            docs.append({"question": f"Is {a} greater than {b}?", "label": int(a > b)})
        elif kind == 1:
            docs.append({"question": f"Is {a} less than {b}?", "label": int(a < b)})
        else:
            docs.append({"question": f"Is {a} an even number?", "label": int(a % 2 == 0)})
    return docs


def passages(text: str, rng: random.Random, n: int, size: int = 600) -> list[dict]:
    """Passages of about ``size`` characters that start and end at line breaks."""
    docs = []
    for start in sorted(rng.sample(range(0, len(text) - 2 * size), n)):
        begin = text.index("\n", start) + 1
        end = text.rindex("\n", begin, begin + size)
        docs.append({"text": text[begin:end].strip()})
    return docs


def jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--n", type=int, default=150, help="documents per task (passages: n // 4)")
    args = parser.parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    runs = speech_lines(text)
    data = {
        "next_line": next_line(runs, random.Random(SEED), args.n),
        "last_word": last_word(runs, random.Random(SEED + 1), args.n),
        "arithmetic": arithmetic(random.Random(SEED + 2), args.n),
        "yes_no": yes_no(random.Random(SEED + 3), args.n),
        "passages": passages(text, random.Random(SEED + 4), args.n // 4),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, docs in data.items():
        atomic_write_bytes(args.out / f"{name}.jsonl", jsonl(docs))
        atomic_write_bytes(args.out / f"{name}.yaml", (YAML[name] + COMMON).encode("utf-8"))
        print(f"{name}: {len(docs)} documents")
    atomic_write_bytes(args.out / "scratchlm_offline.yaml", GROUP.encode("utf-8"))


if __name__ == "__main__":
    main()
