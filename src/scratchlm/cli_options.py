"""Options shared by several ``scratchlm`` subcommands, each declared once here.

- engine options (how a model is loaded and run): ``--dtype``, ``--quantize``, ``--group-size``, ``--adapter``,
  ``--compile/--no-compile`` and ``--threads``: used by generate, chat, serve, eval and quantize;
- sampling options (generate, chat) with the defaults chosen for small models (``sampling.DEFAULT_SAMPLING``);
- ``--no-progress`` and ``--force``, for every command that shows progress or writes files.

Only ``argparse`` here: nothing that imports torch (see ``scratchlm/cpu.py``).
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16")
QUANT_MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # keep equal to quant.quantize.DEFAULT_GROUP_SIZE (tests/test_cli_options.py checks)
MAX_DRAFT_TOKENS = 32  # keep equal to speculative.MAX_DRAFT_TOKENS (tests/test_speculative.py checks)
# For the help texts only; LLM applies sampling.DEFAULT_SAMPLING (tests/test_startup.py checks the two are equal).
# A copy because sampling.py imports torch, and building the parser must not (2.4 s of CPU per command).
DEFAULT_SAMPLING = dict(max_new_tokens=256, temperature=0.7, top_k=40, min_p=0.05, repetition_penalty=1.1)


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="known model name, .gguf file, or model directory")


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute dtype (default float32); given, a quantized GGUF loads dequantized (dense)")


def parse_group_size(text: str) -> int | str:
    """``--group-size``: a number of weights per scale, or ``channel`` (one scale per output row)."""
    if text == "channel":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {', '.join(map(str, GROUP_SIZES))} or channel, "
                                         f"got {text!r}") from None


def add_group_size_flag(p, help: str | None = None) -> None:
    """``--group-size`` (int4), on a parser or an argument group; ``help`` replaces the generic text."""
    p.add_argument("--group-size", type=parse_group_size, default=None,
                   help=help or f"int4 only: weights per scale, {', '.join(map(str, GROUP_SIZES))} or channel "
                                f"(one per output row; default {DEFAULT_GROUP_SIZE})")


def add_quantize_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, choices=QUANT_MODES,
                   help="quantize the weights at load: int8 per channel, int4 group-wise (see --group-size)")
    add_group_size_flag(p)


def add_adapter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to merge in at load")


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through the step compiled ahead of time (cached in $SCRATCHLM_HOME/compile, loaded "
                        "in milliseconds). Default: on for int4 models (GGUF Q4 files), whose first run on a "
                        "machine decodes eagerly while a background process builds it; --compile: on for any "
                        "model, built now and waited for (minutes, once); --no-compile: eager. "
                        "SCRATCHLM_COMPILE=1/0 is --compile/--no-compile")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the subcommand it sets args.threads; absent, `scratchlm --threads N CMD` still counts.
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                   help="CPU threads for torch (default: the CPUs not busy with other work)")


def add_engine_flags(p: argparse.ArgumentParser, quantize: bool = True, adapter: bool = True,
                     compile: bool = True) -> None:
    """The options that say how a model is loaded and run, in one group."""
    g = p.add_argument_group("engine")
    add_dtype_flag(g)
    if quantize:
        add_quantize_flags(g)
    if adapter:
        add_adapter_flag(g)
    if compile:
        add_compile_flag(g)
    add_threads_flag(g)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """``LLM.load`` keyword arguments from the engine options present on ``args``."""
    return dict(dtype=getattr(args, "dtype", None), quantize=getattr(args, "quantize", None),
                group_size=getattr(args, "group_size", None), adapter=getattr(args, "adapter", None),
                compile=getattr(args, "compile", None))


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Sampling options; those not given take ``LLM``'s defaults (``sampling.DEFAULT_SAMPLING``, chosen for small
    models by benchmarks/sampling_defaults.py)."""
    D = DEFAULT_SAMPLING

    def default(name: str, off: str) -> str:
        return f"default {D[name]}; {off} turns it off" if D.get(name) is not None else "default off"

    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"most tokens to generate (default {D['max_new_tokens']})")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy, higher = more random (default {D['temperature']})")
    g.add_argument("--top-k", type=int, default=None,
                   help=f"sample among the k most likely tokens ({default('top_k', '0')})")
    g.add_argument("--top-p", type=float, default=None,
                   help=f"nucleus sampling threshold in (0, 1] ({default('top_p', '1')})")
    g.add_argument("--min-p", type=float, default=None,
                   help=f"drop tokens below min_p x the best probability ({default('min_p', '0')})")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"> 1 discourages repeats ({default('repetition_penalty', '1')}; "
                        "greedy decoding uses it only when given)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling options given on the command line (the others take ``LLM``'s defaults)."""
    given = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    kwargs = {k: v for k, v in given.items() if v is not None}
    if kwargs.get("top_k") == 0:
        kwargs["top_k"] = None  # --top-k 0: no top-k filter
    if args.stop:
        kwargs["stop"] = tuple(args.stop)
    return kwargs


def add_constraint_flags(p: argparse.ArgumentParser) -> None:
    """Structured output (generate, chat): at most one of a JSON schema, a GBNF grammar or a regular expression."""
    g = p.add_argument_group("structured output (docs/structured-output.md)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", default=None,
                   help="answer with JSON valid under this JSON schema file")
    g.add_argument("--grammar", metavar="FILE", default=None, help="answer in this GBNF grammar (llama.cpp's format)")
    g.add_argument("--regex", default=None, help="answer with text this regular expression matches in full")


def constraint_kwargs(args: argparse.Namespace) -> dict:
    """``{"grammar": Constraint}`` for ``LLM`` from the structured-output flags (files read and compiled here), or
    ``{}``."""
    from scratchlm.errors import ConfigError
    from scratchlm.structured import make_constraint

    kwargs = {}
    for flag, key in (("json_schema", "json_schema"), ("grammar", "grammar")):
        path = getattr(args, flag, None)
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    kwargs[key] = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read --{flag.replace('_', '-')} file {path}: {exc.strerror}") from None
    if getattr(args, "regex", None) is not None:
        kwargs["regex"] = args.regex
    return {"grammar": make_constraint(**kwargs)} if kwargs else {}


def add_draft_flags(p: argparse.ArgumentParser):
    """Speculative decoding (generate, chat, serve); returns the argument group, for more decoding flags."""
    g = p.add_argument_group("decoding (docs/decoding.md)")
    g.add_argument("--draft", metavar="MODEL", default=None,
                   help="speculative decoding: 'ngram' (prompt lookup: copies from the prompt and the text so far) "
                        "or a draft model with the same tokenizer (name, .gguf or directory); same output")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="most tokens drafted per step, 1-32 (default 8 for ngram, 5 for a model); fewer, or none, "
                        "while drafts are rarely accepted")
    return g


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """Speculative decoding, context shift and --verbose (generate, chat; docs/decoding.md)."""
    g = add_draft_flags(p)
    add_context_shift_flags(g)
    g.add_argument("--verbose", action="store_true",
                   help="print tokens/s, forward passes, drafted and accepted tokens and shifts on stderr")


def add_context_shift_flags(g) -> None:
    """--context-shift and --keep (generate, chat, serve), into the decoding group ``g``."""
    g.add_argument("--context-shift", nargs="?", const="recompute", default=None, choices=("recompute", "rotate"),
                   help="go on past the context window: drop the oldest half of the tokens after --keep and "
                        "recompute the cache (default) or rotate the cached keys (faster, approximate)")
    g.add_argument("--keep", type=int, default=None, metavar="N",
                   help="tokens at the start kept by a context shift (implies --context-shift; default 0)")


def decoding_kwargs(args: argparse.Namespace) -> dict:
    """``LLM`` keyword arguments from the decoding flags that were given (their ranges checked here, before a
    model loads)."""
    from scratchlm.errors import ConfigError

    k = getattr(args, "draft_tokens", None)
    if k is not None and not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ConfigError(f"--draft-tokens {k} is out of range: give an integer from 1 to {MAX_DRAFT_TOKENS} "
                          "(the most tokens drafted per step)")
    if k is not None and getattr(args, "draft", None) is None:
        raise ConfigError("--draft-tokens needs a drafter: add --draft ngram or --draft MODEL")
    if (getattr(args, "keep", None) or 0) < 0:
        raise ConfigError(f"--keep {args.keep} must be 0 or more (tokens kept at the start by a context shift)")
    given = dict(draft=getattr(args, "draft", None), draft_tokens=getattr(args, "draft_tokens", None),
                 context_shift=getattr(args, "context_shift", None), keep=getattr(args, "keep", None))
    return {k: v for k, v in given.items() if v is not None}


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (it is off anyway when stderr is not a terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress goes to stderr when it is a terminal, unless ``--no-progress``."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def add_force_flag(p: argparse.ArgumentParser, what: str = "--out") -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} if it exists")
