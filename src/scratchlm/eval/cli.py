"""``scratchlm eval <what> ...``: one command whose sub-subcommands live in ``EVAL_COMMANDS``.

To add an evaluation, write ``register_<name>(subparsers)`` that adds its parser and sets ``func``, and add
one entry to ``EVAL_COMMANDS``. Keep heavy imports inside the command functions.

    scratchlm eval perplexity MODEL FILE [--context N --stride S] [--quantize int8|int4] [--dtype bfloat16]
    scratchlm eval task MODEL FILE.jsonl [--adapter DIR] [--limit N] [--predictions OUT.jsonl]
                        [--labels a,b,c] [--confusion-matrix OUT.png [--force]]
Both show a progress bar (rate, time left) on stderr when it is a terminal; --no-progress turns it off.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from scratchlm.cli_options import add_engine_flags, show_progress

# Evaluations score the dense float32 model unless told otherwise (--dtype, --quantize): a quantized GGUF is
# dequantized, as before the engine options were shared (generate and chat run such a file quantized).
EVAL_DTYPE = "float32"


def cmd_perplexity(args: argparse.Namespace) -> None:
    from scratchlm.errors import ConfigError
    from scratchlm.eval.perplexity import perplexity_of_text

    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    llm = load_model(args, quantize=args.quantize, group_size=args.group_size)
    result = perplexity_of_text(llm, text, args.context, args.stride, progress=show_progress(args))
    print(f"perplexity {result.perplexity:.4f}  ({result.tokens} tokens scored in {result.windows} windows, "
          f"{result.bits_per_token:.4f} bits/token)")


def register_perplexity(subparsers) -> None:
    p = subparsers.add_parser("perplexity", help="perplexity of a model on a UTF-8 text file (sliding window)")
    p.add_argument("model", help="known model name, .gguf file, or model directory")
    p.add_argument("file", help="UTF-8 text file to score")
    p.add_argument("--context", type=int, default=None,
                   help="window length in tokens (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: half the context); smaller = more history, slower")
    add_engine_flags(p, adapter=False, compile=False)
    p.set_defaults(dtype=EVAL_DTYPE)
    add_loading_and_progress(p)
    p.set_defaults(func=cmd_perplexity)


def load_model(args: argparse.Namespace, **options):
    """``LLM.load`` with the command's model options; says on stderr what it is loading and how long it took
    (loading a GGUF file takes many seconds for which there is no bar)."""
    from scratchlm.llm import LLM
    from scratchlm.progress import stage

    with stage(f"loading {args.model}", show_progress(args)):
        return LLM.load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, **options)


def add_loading_and_progress(p) -> None:
    """``--tokenizer`` (for checkpoints that come without one, such as nanoGPT's) and ``--no-progress``."""
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a directory holding one) to use with the model: nanoGPT ckpt.pt files "
                        "come without one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def cmd_task(args: argparse.Namespace) -> None:
    import json

    from scratchlm.eval.task import evaluate_task
    from scratchlm.files import atomic_write_bytes, check_destination

    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if args.predictions:  # checked before the slow part
        check_destination(Path(args.predictions), args.force, want_dir=False)
    if args.confusion_matrix:  # checked before the slow part
        from scratchlm.errors import ConfigError
        from scratchlm.eval.classification import detect_labels
        from scratchlm.eval.task import read_task

        check_destination(Path(args.confusion_matrix), args.force, want_dir=False)
        if labels is None and detect_labels([ref for _, ref in read_task(args.file, args.limit)]) is None:
            raise ConfigError("--confusion-matrix needs a label task, and the references are not a small set of "
                              "repeated labels: name the labels with --labels a,b,c")
    llm = load_model(args, adapter=args.adapter, quantize=args.quantize, group_size=args.group_size)
    result = evaluate_task(llm, args.file, args.max_new_tokens, args.batch_size, args.limit,
                           progress=show_progress(args), labels=labels)
    print(result.summary())
    if result.classification is not None:
        print()
        print(result.classification.table())
    if args.confusion_matrix and result.classification is not None:
        from scratchlm.eval.classification import confusion_matrix_png

        out = Path(args.confusion_matrix)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, confusion_matrix_png(result.classification))
        print(f"confusion matrix -> {args.confusion_matrix}", file=sys.stderr)
    if args.predictions:
        lines = "".join(json.dumps({**row, **{"exact_match": row["prediction"].strip() == row["reference"].strip()}},
                                   ensure_ascii=False) + "\n" for row in result.rows)
        atomic_write_bytes(Path(args.predictions), lines.encode("utf-8"))
    if args.json:
        extra = {"classification": result.classification.as_dict()} if result.classification is not None else {}
        print(json.dumps({"n": result.n, **result.scores, **extra}, ensure_ascii=False))


def register_task(subparsers) -> None:
    p = subparsers.add_parser("task", help="exact match, token F1, BLEU, ROUGE-L (and classification metrics for "
                                           "label tasks) of greedy answers on a JSONL task")
    p.add_argument("model", help="known model name, .gguf file, or model directory")
    p.add_argument("file", help='JSONL of {"messages": [...]} or {"prompt", "completion"}; the last assistant '
                                "turn is the reference")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per answer (default: the longest reference + 16)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--predictions", default=None, help="write each prompt, reference and prediction to this JSONL")
    p.add_argument("--json", action="store_true", help="also print the scores as one JSON line")
    add_engine_flags(p, compile=False)
    p.set_defaults(dtype=EVAL_DTYPE)
    p.add_argument("--labels", default=None,
                   help="comma-separated labels: score as classification (accuracy, precision/recall/F1 per class, "
                        "confusion matrix); without it a task whose references are a few repeated labels is detected")
    p.add_argument("--confusion-matrix", default=None, metavar="OUT.png", help="draw the confusion matrix into a PNG")
    p.add_argument("--force", action="store_true", help="replace an existing --confusion-matrix or --predictions file")
    add_loading_and_progress(p)
    p.set_defaults(func=cmd_task)


def cmd_harness(args: argparse.Namespace) -> None:
    import json
    import logging

    from scratchlm.errors import ConfigError

    try:
        from scratchlm.eval import harness
    except ImportError as exc:
        raise ConfigError(f"lm-evaluation-harness is not installed ({exc}): pip install 'scratchlm[eval]'") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices drown our summary
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model = harness.ScratchLM(args.model, quantize=args.quantize, group_size=args.group_size, adapter=args.adapter,
                              dtype=args.dtype,
                              progress=sys.stderr.isatty())
    results = harness.evaluate(model, tasks, num_fewshot=args.num_fewshot, limit=args.limit)
    print(harness.summary_table(results))
    if args.json:
        print(json.dumps(harness.scores(results)))


def register_harness(subparsers) -> None:
    p = subparsers.add_parser("harness", help="lm-evaluation-harness tasks on a model, run in process")
    p.add_argument("model", help="known model name, .gguf file, or model directory")
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval tasks or groups, e.g. scratchlm_offline (offline) or hellaswag")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples put before each question")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    add_engine_flags(p, compile=False)
    p.set_defaults(dtype=EVAL_DTYPE)
    p.add_argument("--json", action="store_true", help="also print {task: {metric: value}} as one JSON line")
    p.set_defaults(func=cmd_harness)


# name -> function that registers `scratchlm eval <name>` on the eval subparsers.
EVAL_COMMANDS: dict[str, Callable] = {
    "perplexity": register_perplexity,
    "task": register_task,
    "harness": register_harness,
}


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity, ...)")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    for register_one in EVAL_COMMANDS.values():
        register_one(sub)
