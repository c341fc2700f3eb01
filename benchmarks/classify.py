"""Classification fine-tuning against a zero-shot prompt of the same model (issue 19, item 8).

    python benchmarks/classify.py [--steps 120] [--record]

``scripts/make_sentiment.py`` writes 600 training and 150 held-out reviews (negative, neutral, positive; held-out
templates and products). Two classifiers of SmolLM2-135M-Instruct, scored on the same held-out reviews with
``eval.classification.classification_report`` (accuracy, macro precision, recall, F1):

* zero-shot: the chat model asked to name the sentiment in one word (greedy), the answer mapped to a label by
  ``match_label`` (an answer naming none counts as wrong);
* LoRA: ``scratchlm finetune --task classify`` (rank 8 on every projection, the head in full), then ``predict``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
LABELS = ["negative", "neutral", "positive"]
INSTRUCTION = ("Classify the sentiment of this product review as negative, neutral or positive. Answer with one "
               "word.\n\nReview: {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--classifier", default=None,
                        help="score this trained classifier (OUT/best of a classify run) instead of training one")
    parser.add_argument("--work", default="/tmp/scratchlm-classify")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from scratchlm.eval.classification import classification_report, match_label
    from scratchlm.finetune.classify import predict
    from scratchlm.finetune.run import FinetuneOptions, run_finetune
    from scratchlm.heads import load_head_model
    from scratchlm.llm import LLM

    work = Path(args.work)
    data = work / "sentiment"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sentiment.py"), "--out", str(data)], check=True)
    test = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    texts, references = [r["text"] for r in test], [r["label"] for r in test]

    t0 = time.perf_counter()
    llm = LLM.load(MODEL, dtype="float32")
    answers = llm.chat([[{"role": "user", "content": INSTRUCTION.format(text=t)}] for t in texts], temperature=0,
                       max_new_tokens=6)
    zero_shot = classification_report([match_label(a, LABELS) for a in answers], references, LABELS)
    t_zero = time.perf_counter() - t0
    del llm

    t0 = time.perf_counter()
    if args.classifier is None:
        run_finetune(FinetuneOptions(model=MODEL, data=str(data / "train.jsonl"), out=str(work / "run"),
                                     task="classify", labels=",".join(LABELS), max_steps=args.steps,
                                     batch_size=args.batch_size, lr=args.lr, val_fraction=0.1, force=True,
                                     progress=False))
    t_train = time.perf_counter() - t0
    classifier = Path(args.classifier) if args.classifier else work / "run" / "best"
    model, tok_llm = load_head_model(classifier)
    tuned = classification_report(predict(model, tok_llm.tokenizer, texts), references, LABELS)

    def row(name, r):
        p, rc, f = r.averages["macro"]
        return f"| {name} | {r.accuracy:.3f} | {p:.3f} | {rc:.3f} | {f:.3f} |"

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    from common import machine

    text = (f"\n## Sentiment classification: LoRA head vs zero-shot prompt, SmolLM2-135M-Instruct "
            f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
            f"Machine: {machine()}; load average after the run {load}; torch {torch.__version__}, {args.threads} "
            f"threads, float32.\nCommand: `python benchmarks/classify.py {' '.join(sys.argv[1:])}`\n\n"
            f"150 held-out reviews (held-out templates and products), 3 balanced classes. Zero-shot: greedy chat "
            f"answer mapped with match_label ({t_zero:.0f} s). LoRA: `finetune --task classify`, "
            + (f"the given classifier {classifier}" if args.classifier else
               f"{args.steps} steps x {args.batch_size} reviews, lr {args.lr:g}, rank 8 ({t_train:.0f} s with "
               "loading and evaluations)") + ".\n\n"
            "| classifier | accuracy | macro precision | macro recall | macro F1 |\n|---|---|---|---|---|\n"
            + row("zero-shot prompt", zero_shot) + "\n" + row("LoRA classification head", tuned) + "\n\n"
            f"Margin: accuracy {tuned.accuracy - zero_shot.accuracy:+.3f}, macro F1 "
            f"{tuned.averages['macro'][2] - zero_shot.averages['macro'][2]:+.3f}.\n\n"
            f"Zero-shot per class:\n\n```\n{zero_shot.table()}\n```\n\nLoRA per class:\n\n```\n{tuned.table()}\n```\n")
    print(text)
    if args.record:
        from common import append_results

        append_results(text)


if __name__ == "__main__":
    main()
