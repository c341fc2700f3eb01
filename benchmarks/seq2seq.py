"""The encoder-decoder translator on its bundled task: held-out BLEU and training time with the default settings.

    python benchmarks/seq2seq.py                  # `scratchlm seq2seq train`'s defaults; appends to RESULTS.md
    python benchmarks/seq2seq.py --ablation       # and the same run without cross-attention (the decoder alone)
    python benchmarks/seq2seq.py --no-record      # print only

Trains exactly what `scratchlm seq2seq train` trains (English number phrases into French, 40,000 training
pairs, a test split of 1,000 numbers that never occur in training), then scores the test split with greedy
and beam search: our BLEU and sacreBLEU's side by side (they must agree), and exact match. Training time is the
wall clock of the training loop (evaluations included) and the process's CPU time; the load average says how
busy the machine was. With ``--ablation`` it also trains the same model without cross-attention.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone

from common import append_results, machine


def run(out: str, cross_attention: bool) -> dict:
    from scratchlm.seq2seq.run import Seq2SeqOptions, train_translator

    cpu = time.process_time()
    wall = time.perf_counter()
    scores = train_translator(Seq2SeqOptions(out=out, force=True, model={"cross_attention": cross_attention},
                                             progress=sys.stderr.isatty()))
    scores["wall_seconds"] = time.perf_counter() - wall
    scores["cpu_seconds"] = time.process_time() - cpu
    return scores


def check_sacrebleu(out: str) -> tuple[float, float]:
    """(ours, sacreBLEU's) corpus BLEU of the trained translator's greedy translations of the test split."""
    import sacrebleu

    from scratchlm.eval.metrics import corpus_bleu
    from scratchlm.seq2seq.numbers import default_task
    from scratchlm.seq2seq.translator import Translator

    test = default_task()["test"]
    hypotheses = Translator.load(out + "/last").translate([s for s, _ in test])
    references = [t for _, t in test]
    return corpus_bleu(hypotheses, references), sacrebleu.corpus_bleu(hypotheses, [references]).score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", action="store_true", help="also train without cross-attention")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    import torch

    from scratchlm.seq2seq.run import DEFAULT_MODEL, DEFAULT_TRAIN

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cross in (True, False) if args.ablation else (True,):
            out = f"{tmp}/{'with' if cross else 'without'}"
            scores = run(out, cross)
            ours, reference = check_sacrebleu(out)
            rows.append((cross, scores, ours, reference))
    load_after = os.getloadavg()[0]
    beam = 4
    lines = ["| decoder | steps | train wall s | train+eval CPU s | test BLEU greedy | sacreBLEU greedy | "
             f"test BLEU beam {beam} | exact match greedy | exact match beam {beam} |", "|---" * 9 + "|"]
    for cross, s, ours, reference in rows:
        lines.append(f"| {'with cross-attention' if cross else 'no cross-attention (ablation)'} | {s['step']} | "
                     f"{s['train_seconds']:.0f} | {s['cpu_seconds']:.0f} | {s['test_bleu_beam1']:.2f} | "
                     f"{reference:.2f} | {s[f'test_bleu_beam{beam}']:.2f} | {s['test_exact_match_beam1']:.1%} | "
                     f"{s[f'test_exact_match_beam{beam}']:.1%} |")
        assert abs(ours - reference) < 1e-6, (ours, reference)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    setup = (f"model {DEFAULT_MODEL['d_model']} wide, {DEFAULT_MODEL['n_encoder_layers']}+"
             f"{DEFAULT_MODEL['n_decoder_layers']} layers; {DEFAULT_TRAIN.max_steps} steps of "
             f"{DEFAULT_TRAIN.batch_size} pairs; torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"load average {load_before:.1f} before, {load_after:.1f} after")
    text = "\n".join([f"\n## Encoder-decoder translator, English numbers -> French, {stamp}\n",
                      f"{machine()}; {setup}; `python benchmarks/seq2seq.py{' --ablation' if args.ablation else ''}`"
                      "\n", *lines, ""])
    print(text)
    if not args.no_record:
        append_results(text)


if __name__ == "__main__":
    main()
