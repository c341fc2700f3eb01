"""``scratchlm eval <what> ...``: one command whose sub-subcommands live in ``EVAL_COMMANDS``.

To add an evaluation, write ``register_<name>(subparsers)`` that adds its parser and sets ``func``, and add
one entry to ``EVAL_COMMANDS``. Keep heavy imports inside the command functions.

    scratchlm eval perplexity MODEL FILE [--context N --stride S] [--quantize int8|int4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def cmd_perplexity(args: argparse.Namespace) -> None:
    from scratchlm.errors import ConfigError
    from scratchlm.eval.perplexity import perplexity_of_text
    from scratchlm.llm import LLM

    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    llm = LLM.load(args.model, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    result = perplexity_of_text(llm, text, args.context, args.stride, progress=sys.stderr.isatty())
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="quantize the weights at load")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default 64)")
    p.set_defaults(func=cmd_perplexity)


# name -> function that registers `scratchlm eval <name>` on the eval subparsers.
EVAL_COMMANDS: dict[str, Callable] = {
    "perplexity": register_perplexity,
}


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity, ...)")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    for register_one in EVAL_COMMANDS.values():
        register_one(sub)
