"""``scratchlm agent MODEL "task"``: a ReAct agent with built-in and user tools, printing its trace.

    scratchlm agent smollm2-135m-instruct "What is 1234 * 5678?"
    scratchlm agent smollm2-135m-instruct "Where is the meeting?" --tools read_file --root notes/
    scratchlm agent smollm2-135m-instruct "..." --tools search --store docs.db --max-steps 4
    scratchlm agent smollm2-135m-instruct "..." --tools-module my_tools --tools none
"""

from __future__ import annotations

import argparse
import json
import sys

from scratchlm.cli_options import (
    add_engine_flags,
    add_model_argument,
    add_progress_flag,
    add_sampling_flags,
    sampling_kwargs,
    show_progress,
)
from scratchlm.errors import ConfigError

BUILTIN = ("calculator", "search", "read_file")


def chosen_builtins(args: argparse.Namespace) -> list[str]:
    """The built-in tools asked for: ``--tools`` (a comma list, or "none"), by default the calculator plus
    read_file with ``--root`` and search with ``--store``."""
    if args.tools is None:
        return ["calculator"] + (["read_file"] if args.root else []) + (["search"] if args.store else [])
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        raise ConfigError(f"unknown tool {unknown[0]!r} in --tools: choose from {', '.join(BUILTIN)} "
                          "(your own functions go in --tools-module)")
    if "read_file" in names and not args.root:
        raise ConfigError("the read_file tool needs --root DIR: the folder whose files the agent may read")
    if "search" in names and not args.store:
        raise ConfigError("the search tool needs --store PATH: a store made by `scratchlm rag ingest`")
    return list(dict.fromkeys(names))


def cmd_agent(args: argparse.Namespace) -> None:
    from scratchlm.agent import Agent, DocumentSearch, FileReader, calculator, format_step, tools_from_module
    from scratchlm.cli import load_llm
    from scratchlm.progress import stage

    if not args.task.strip():
        raise ConfigError('give the agent a task, e.g. scratchlm agent MODEL "What is 17 * 23?"')
    if args.max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {args.max_steps}")
    names = chosen_builtins(args)
    tools = []  # checked before the slow model load: a bad folder, store or module fails at once
    if "calculator" in names:
        tools.append(calculator)
    if "read_file" in names:
        tools.append(FileReader(args.root).tool())
    if args.tools_module:
        tools += tools_from_module(args.tools_module)
    docs = None
    if "search" in names:
        with stage(f"opening {args.store}", show_progress(args)):
            docs = DocumentSearch.open(args.store)
        tools.append(docs.tool())
    if not tools:
        raise ConfigError("the agent has no tools: name some with --tools or --tools-module")
    try:
        llm = load_llm(args)
        agent = Agent(llm, tools, max_steps=args.max_steps, **sampling_kwargs(args))
        if args.json:
            result = agent.run(args.task)
        else:
            print(f"task: {args.task}\ntools: {', '.join(t.name for t in agent.tools)}\n", flush=True)
            result = agent.run(args.task, on_step=lambda step: print(format_step(step), flush=True))
    finally:
        if docs is not None:
            docs.close()
    if args.json:
        steps = [{k: v for k, v in vars(s).items() if v is not None} for s in result.steps]
        print(json.dumps({"answer": result.answer, "stop_reason": result.stop_reason, "steps": steps},
                         ensure_ascii=False, indent=2))
    elif result.finished:
        print(f"\nanswer: {result.answer}")
    if not result.finished:
        reasons = {"length": "a reply reached --max-new-tokens before its JSON ended (raise it)",
                   "context": "the conversation outgrew the model's context window (fewer steps or shorter files)",
                   "max_steps": f"no answer within --max-steps {args.max_steps}"}
        print(f"no answer: {reasons.get(result.stop_reason, result.stop_reason)}", file=sys.stderr)
        raise SystemExit(1)


def register(subparsers) -> None:
    p = subparsers.add_parser("agent", help="solve a task with tools, step by step (ReAct), printing the trace",
                              description="A ReAct agent: the model thinks, calls a tool, reads the result and "
                                          "goes on until it answers. Calls are constrained to valid JSON for the "
                                          "tools offered (docs/agents.md).")
    add_model_argument(p)
    p.add_argument("task", help="what the agent should do, in words")
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help=f"built-in tools, comma-separated, from {', '.join(BUILTIN)}, or 'none' (default: calculator, "
                        "plus read_file with --root and search with --store)")
    p.add_argument("--root", default=None, metavar="DIR", help="the folder read_file may read (nothing outside it)")
    p.add_argument("--store", default=None, metavar="PATH",
                   help="the RAG store search looks in (an SQLite file or postgresql:// URL from `scratchlm rag "
                        "ingest`)")
    p.add_argument("--tools-module", default=None, metavar="MODULE",
                   help="your own tools: a module name (found from the current folder) or a .py file; its "
                        "functions (or its TOOLS list) become tools, their signatures JSON schemas")
    p.add_argument("--max-steps", type=int, default=6, help="most replies of the model; the last must answer "
                                                            "(default 6)")
    p.add_argument("--json", action="store_true", help="print the result and steps as JSON instead of the trace")
    add_engine_flags(p)
    add_sampling_flags(p)
    for action in p._actions:  # the agent decodes greedily unless told otherwise (Agent's default)
        if action.dest == "temperature":
            action.help = "0 = greedy (the agent's default), higher = more random"
    add_progress_flag(p)
    p.set_defaults(func=cmd_agent)
