"""``scratchlm explain MODEL TEXT``: what the model expected at every token, where it looked, and what each layer
would have predicted.

    scratchlm explain smollm2-135m-instruct "The capital of France is Paris."
    scratchlm explain smollm2-135m-instruct "The capital of France is Paris." --json --top-k 10
    scratchlm explain smollm2-135m-instruct "Why is the sky blue?" --chat --attention runs/why
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scratchlm.cli_options import add_engine_flags, add_force_flag, add_model_argument, add_progress_flag, show_progress
from scratchlm.errors import ConfigError
from scratchlm.files import atomic_dir, check_destination


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """``--layers`` ("1,5,30" or "1-4,30", 1-based) as 0-based layer indices; all layers when not given."""
    if not text:
        return list(range(n_layers))
    chosen: list[int] = []
    for part in text.split(","):
        try:
            lo, _, hi = part.strip().partition("-")
            chosen += range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise ConfigError(f"--layers takes layer numbers like 1,5,30 or 1-4, not {text!r}") from None
    bad = [n for n in chosen if not 1 <= n <= n_layers]
    if bad:
        raise ConfigError(f"--layers: the model has layers 1 to {n_layers}, not {bad[0]}")
    return [n - 1 for n in dict.fromkeys(chosen)]


PAGE_NAME = "attention.html"  # in files.OUTPUT_MARKERS: --force may replace a folder that holds it


def write_attention(view, directory: Path, layers: list[int], force: bool, progress: bool) -> None:
    """The heat maps of ``layers`` and the page ``attention.html`` into ``directory``, atomically
    (``files.atomic_dir``): an earlier output stays whole until the new one is complete, and a folder that is not
    one of our outputs is never replaced."""
    from scratchlm.explain.html import render_page
    from scratchlm.explain.plots import save_heatmaps

    with atomic_dir(directory, force=force) as tmp:
        save_heatmaps(view.attention[layers], view.tokens, tmp, progress, layer_numbers=[n + 1 for n in layers])
        (tmp / PAGE_NAME).write_text(render_page(view, layers), encoding="utf-8")


def cmd_explain(args: argparse.Namespace) -> None:
    from scratchlm.cli import load_llm
    from scratchlm.explain.views import explain

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise ConfigError('give a text to explain, e.g. scratchlm explain MODEL "The capital of France is Paris."')
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.reply_tokens < 0:
        raise ConfigError(f"--reply-tokens must be 0 or more, got {args.reply_tokens}")
    if args.attention:
        check_destination(Path(args.attention), args.force, want_dir=True)  # refuse before the slow load
    llm = load_llm(args)
    layers = parse_layers(args.layers, llm.config.n_layers)
    view = explain(llm, text, top_k=args.top_k, chat=args.chat, reply_tokens=args.reply_tokens,
                   attention=bool(args.attention), lens=not args.no_lens)
    if args.attention:
        from scratchlm.explain.html import page_data

        page_data(view, layers)  # too large a page fails here, before any file is written
        write_attention(view, Path(args.attention), layers, args.force, show_progress(args))
        print(f"wrote {len(layers) * llm.config.n_heads} heat maps and attention.html to {args.attention}",
              file=sys.stderr)
    if args.json:
        json.dump(view.to_dict(), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        from scratchlm.explain.render import render

        render(view)


def register(sub) -> None:
    p = sub.add_parser("explain", help="see inside a model: next-token probabilities, attention, logit lens",
                       description="For each token: the top next tokens, the actual next token's probability, rank "
                                   "and surprisal, and the entropy; what each layer would predict (logit lens); "
                                   "with --attention, heat maps and a browsable HTML page of every head.")
    add_model_argument(p)
    p.add_argument("text", help="the text to explain (- reads stdin); with --chat, a user message")
    p.add_argument("--top-k", type=int, default=5, help="next tokens shown per position (default 5)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (a `positions` list, one entry per token, and the logit lens) instead of tables")
    p.add_argument("--attention", metavar="DIR", default=None,
                   help="write a PNG heat map per layer and head, and attention.html to browse them, into DIR")
    p.add_argument("--layers", default=None, help="heat maps and page only for these layers, e.g. 1,15,30 or 1-4 "
                                                  "(default all)")
    p.add_argument("--chat", action="store_true",
                   help="treat TEXT as a user message: render it with the chat template, let the model reply "
                        "(greedy) and explain the prompt and the reply")
    p.add_argument("--reply-tokens", type=int, default=40, help="with --chat, the reply's length limit (default 40)")
    p.add_argument("--no-lens", action="store_true", help="skip the logit lens")
    add_force_flag(p, "--attention")
    add_engine_flags(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_explain)
