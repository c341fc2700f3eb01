"""The ``scratchlm`` command. It only parses arguments and calls the Python API.

    scratchlm pull smollm2-135m-instruct
    scratchlm list
    scratchlm info smollm2-135m-instruct
    scratchlm generate smollm2-135m-instruct "Once upon a time" --max-new-tokens 40
    scratchlm chat smollm2-135m-instruct

Every ScratchLMError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

from scratchlm.cli_options import (  # noqa: F401  (add_sampling_flags and sampling_kwargs: public helpers)
    add_constraint_flags,
    add_decoding_flags,
    add_engine_flags,
    add_model_argument,
    add_progress_flag,
    add_sampling_flags,
    constraint_kwargs,
    decoding_kwargs,
    engine_kwargs,
    sampling_kwargs,
    show_progress,
)
from scratchlm.errors import ConfigError, ScratchLMError


def pause_collection(args: argparse.Namespace) -> bool:
    """In a command's own process (``main`` sets ``args.own_process``), pause Python's cyclic garbage collector
    until ``load_llm`` has loaded the model, which then freezes what exists (``gc.freeze``) and resumes it.

    Importing torch and loading a model make ~200,000 long-lived objects and next to no garbage: the collector's
    passes over them cost 0.3 s of CPU, and its last pass at exit 0.5 s more (SmolLM2 ``generate``, measured with
    benchmarks/startup.py); frozen objects are skipped by later passes, the exit's included. Not in a Python
    session (tests, notebooks): its objects are its owner's to collect. True when paused."""
    own = getattr(args, "own_process", False)
    if own:
        gc.disable()
    return own


def load_llm(args: argparse.Namespace):
    """The model named by ``args.model``, loaded with the engine options (``--compile``/``--no-compile`` included)."""
    own = pause_collection(args)
    try:
        from scratchlm.llm import LLM
        from scratchlm.progress import stage

        progress = show_progress(args)
        with stage(f"loading {args.model}", progress):
            llm = LLM.load(args.model, **engine_kwargs(args))
    finally:
        if own:
            gc.freeze()  # the model, the tokenizer, torch's own objects: they live until the exit anyway
            gc.enable()
    decoder = getattr(llm.model, "decoder", None)  # the compiled step (LLM.load's compile option)
    if decoder is not None:
        decoder.progress = progress
    return llm


# --------------------------------------------------------------------------------------------------
def cmd_pull(args: argparse.Namespace) -> None:
    from scratchlm.hub import is_pulled, model_path, pull

    if not args.force and is_pulled(args.name):
        print(f"{args.name} is already pulled: {model_path(args.name)}\n"
              f"(to download it again: scratchlm pull {args.name} --force)")
        return
    path = pull(args.name, progress=show_progress(args), force=args.force)
    print(f"pulled {args.name} to {path}")


def cmd_list(args: argparse.Namespace) -> None:
    from scratchlm.hub import home, list_models

    print(f"{'NAME':<26} {'SIZE':>8}  {'PULLED':<6}  DESCRIPTION")
    for row in list_models():
        print(f"{row['name']:<26} {row['size'] / 2**20:>6.0f}Mi  {'yes' if row['pulled'] else 'no':<6}  "
              f"{row['description']}")
    print(f"\ncache: {home()}")


def cmd_info(args: argparse.Namespace) -> None:
    from scratchlm.info import model_info

    for key, value in model_info(args.model).items():
        print(f"{key:<16} {value}")


def cmd_generate(args: argparse.Namespace) -> None:
    pause_collection(args)  # from the first import of torch (below) to the loaded model
    from scratchlm.generate import DecodeStats

    structured = constraint_kwargs(args)  # compiled before the slow load: a bad schema fails at once
    decoding = decoding_kwargs(args)
    llm = load_llm(args)
    stats = DecodeStats()
    for chunk in llm.stream(args.prompt, **sampling_kwargs(args), **structured, **decoding, stats=stats):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        sys.stdout.flush()
        print(stats.summary(), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    pause_collection(args)
    from scratchlm.chat_session import ChatSession
    from scratchlm.generate import DecodeStats

    structured = constraint_kwargs(args)
    decoding = decoding_kwargs(args)
    llm = load_llm(args)
    stats = DecodeStats()
    sampling = {**sampling_kwargs(args), **structured, **decoding, "stats": stats}
    ChatSession(llm, system=args.system, sampling=sampling).run(sys.stdin, sys.stdout)
    if args.verbose:
        sys.stdout.flush()
        print(stats.summary(), file=sys.stderr)


# Modules whose `register(subparsers)` adds more subcommands (training, serving, quantization, ...).
# Keep their imports light: heavy imports belong inside the command functions.
COMMAND_MODULES: list[str] = [
    "scratchlm.train.cli",
    "scratchlm.train.tokenizer_cli",
    "scratchlm.convert",
    "scratchlm.serve.cli",
    "scratchlm.quant.cli",
    "scratchlm.eval.cli",
    "scratchlm.finetune.cli",
    "scratchlm.align.cli",
    "scratchlm.encoder_cli",
    "scratchlm.rag_cli",
    "scratchlm.compress.cli",
    "scratchlm.seq2seq.cli",
    "scratchlm.vision.cli",
    "scratchlm.diffusion.cli",
    "scratchlm.agent.cli",
    "scratchlm.explain.cli",
    "scratchlm.estimate_cli",
    "scratchlm.data.cli",
]


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchlm", description="A from-scratch LLM stack in PyTorch.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the CPUs not busy with other work)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="download a known model into the cache")
    p.add_argument("name", help="a known model name (see `scratchlm list`)")
    p.add_argument("--force", action="store_true", help="download again even if present")
    add_progress_flag(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="show known and pulled models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="architecture, size and file details of a model")
    p.add_argument("model", help="known model name, .gguf file, or model directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    add_model_argument(p)
    p.add_argument("prompt", help="the text to continue")
    add_engine_flags(p)
    add_sampling_flags(p)
    add_constraint_flags(p)
    add_decoding_flags(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model (interactive, or one message per stdin line)")
    add_model_argument(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_flags(p)
    add_sampling_flags(p)
    add_constraint_flags(p)
    add_decoding_flags(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_chat)

    # Feature packages add their own subcommands: each module has `register(subparsers)`.
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from scratchlm import cpu

    # Before anything imports torch: OpenMP reads its wait policy once, when torch loads it (see cpu.py).
    session = "torch" in sys.modules  # a Python session (tests, notebook) whose threads are its owner's
    cpu.set_wait_policy()
    args = build_parser().parse_args(argv)
    args.own_process = not session  # see pause_collection
    try:
        if args.threads is not None and args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        threads = args.threads if session else cpu.choose_threads(args.threads)
        if threads is not None:
            cpu.set_threads(threads)
        args.func(args)
    except ScratchLMError as exc:
        red, reset = ("\033[31m", "\033[0m") if sys.stderr.isatty() else ("", "")
        print(f"{red}error: {exc}{reset}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

