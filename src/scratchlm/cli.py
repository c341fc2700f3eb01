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
import os
import sys

from scratchlm.errors import ScratchLMError


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy, higher = more random (default {temperature})")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the best probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=tuple(args.stop))


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="known model name, .gguf file, or model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantize the weights at load: int8 per channel, int4 group-wise (see --group-size)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to merge in at load")


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode through a step compiled by torch.compile: faster tokens after a compile of "
                        "about a minute per cache size (cached on disk for later runs)")


def load_llm(args: argparse.Namespace):
    from scratchlm.llm import LLM

    llm = LLM.load(args.model, dtype=args.dtype, quantize=getattr(args, "quantize", None),
                   group_size=getattr(args, "group_size", None), adapter=getattr(args, "adapter", None))
    if getattr(args, "compile", False):
        from scratchlm.compiled import compile_decoding

        compile_decoding(llm.model)
    return llm


# --------------------------------------------------------------------------------------------------
def cmd_pull(args: argparse.Namespace) -> None:
    from scratchlm.hub import pull

    path = pull(args.name, progress=True, force=args.force)
    print(path)


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
    llm = load_llm(args)
    for chunk in llm.stream(args.prompt, **sampling_kwargs(args)):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from scratchlm.chat_session import ChatSession

    llm = load_llm(args)
    ChatSession(llm, system=args.system, sampling=sampling_kwargs(args)).run(sys.stdin, sys.stdout)


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
]


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchlm", description="A from-scratch LLM stack in PyTorch.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="download a known model into the cache")
    p.add_argument("name", help="a known model name (see `scratchlm list`)")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="show known and pulled models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="architecture, size and file details of a model")
    p.add_argument("model", help="known model name, .gguf file, or model directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    add_model_flags(p)
    p.add_argument("prompt", help="the text to continue")
    add_compile_flag(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model (interactive, or one message per stdin line)")
    add_model_flags(p)
    add_compile_flag(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    # Feature packages add their own subcommands: each module has `register(subparsers)`.
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
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

