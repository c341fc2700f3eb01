"""Run the runnable code blocks of the README and the docs pages, in order (docs/README.md explains the marks).

    python3 scripts/run_docs.py                      # every `run` and `run-slow` block of every page (long)
    python3 scripts/run_docs.py README.md --list     # the blocks it would run, numbered, without running them
    python3 scripts/run_docs.py docs/serving.md --cheap   # only the `run` blocks (what `make test` runs)
    python3 scripts/run_docs.py --start README.md:40      # from that block on (after your own make run/test)

Meant for a fresh clone: the README's first block is `make run` and `make test`, which build `.venv`; every later
block runs with `.venv/bin` first on PATH, in the repository root (or --workdir), so outputs land in `runs/` and
`exports/` as they would for a reader. `run-background` blocks (a server) start in the background; the blocks
after them wait until its /health answers, and the server is stopped at the end of its page. A block that fails
stops the run with its page, line and exit status. Needs only the standard library, so it runs before `.venv`
exists; `tests/test_docs.py` checks that its fence reader agrees with the CommonMark parser.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKS = ("run", "run-slow", "run-background")
# Pages in reading order: the README, then the index's order, then any page it does not list.
PAGE_ORDER = ["models", "python-api", "serving", "training", "finetuning", "quantization", "evaluation",
              "structured-output", "embeddings", "rag", "export", "scale"]
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page, first line (1-based, the opening fence), language, mark and code."""

    path: Path
    line: int
    language: str
    mark: str | None
    code: str


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file (CommonMark fences outside indented code; enough for our pages)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or (m.group(2)[0] == "`" and "`" in m.group(3)):
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        body, j = [], i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close.group(2).startswith(fence) and set(close.group(2)) == {fence[0]} \
                    and not close.group(3).strip():
                break
            text = lines[j]
            body.append(text[min(indent, len(text) - len(text.lstrip(" "))):])
            j += 1
        words = info.split()
        language = words[0] if words else ""
        mark = next((w for w in words[1:] if w in MARKS), None)
        blocks.append(Block(path, i + 1, language, mark, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def runnable_blocks(path: Path, cheap_only: bool = False) -> list[Block]:
    """The blocks of a page marked runnable: `run` only when cheap_only, else all marks."""
    wanted = ("run",) if cheap_only else MARKS
    return [b for b in fenced_blocks(path) if b.mark in wanted]


def default_pages() -> list[Path]:
    docs = ROOT / "docs"
    pages = [ROOT / "README.md"] + [docs / f"{name}.md" for name in PAGE_ORDER if (docs / f"{name}.md").exists()]
    pages += sorted(p for p in docs.glob("*.md") if p not in pages and p.name != "README.md")
    return pages + [docs / "README.md"]


def block_env() -> dict[str, str]:
    """The environment a block runs in: the repository's .venv first on PATH, as after `source .venv/bin/activate`."""
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def command_for(block: Block) -> list[str]:
    """How to run a block: bash with -e and pipefail, or the virtualenv's Python (this one until it exists)."""
    if block.language in ("bash", "sh", "shell", "console"):
        return ["bash", "-euo", "pipefail", "-c", block.code]
    if block.language == "python":
        venv_python = ROOT / ".venv" / "bin" / "python"
        return [str(venv_python if venv_python.exists() else sys.executable), "-c", block.code]
    raise ValueError(f"{block.path}:{block.line}: cannot run a {block.language or 'plain'} block")


def wait_healthy(block: Block, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    """Wait until the server a background block started answers /health with 200."""
    port = re.search(r"--port[ =](\d+)", block.code)
    url = f"http://127.0.0.1:{port.group(1) if port else 8000}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{block.path}:{block.line}: the background command exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{block.path}:{block.line}: {url} did not answer 200 within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a background block and everything it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_page(path: Path, workdir: Path, cheap_only: bool = False, env: dict | None = None,
             timeout: float | None = None, say=print, first_line: int = 0) -> None:
    """Run a page's runnable blocks in order in ``workdir`` (from the block at ``first_line`` on); raise
    RuntimeError at the first that fails."""
    env = env or block_env()
    background: list[subprocess.Popen] = []
    try:
        for block in runnable_blocks(path, cheap_only):
            if block.line < first_line:
                continue
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{block.line}"
            say(f"--- {where} ({block.language} {block.mark})", flush=True)
            if block.mark == "run-background":
                proc = subprocess.Popen(command_for(block), cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
                background.append(proc)
                wait_healthy(block, proc)
                continue
            started = time.monotonic()
            result = subprocess.run(command_for(block), cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    timeout=timeout, capture_output=cheap_only, text=True)
            if result.returncode != 0:
                detail = f"\n{result.stdout}\n{result.stderr}" if cheap_only else ""
                raise RuntimeError(f"{where}: exit status {result.returncode}{detail}")
            say(f"    ok in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        for proc in background:
            stop(proc)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md in order)")
    ap.add_argument("--cheap", action="store_true", help="only the `run` blocks, as make test runs them")
    ap.add_argument("--list", action="store_true", help="list the blocks instead of running them")
    ap.add_argument("--workdir", type=Path, default=ROOT, help="where the blocks run (default: the repository)")
    ap.add_argument("--start", metavar="PAGE:LINE", help="begin at this block (as --list numbers them), e.g. "
                    "README.md:40 to skip the quickstart after running `make run` and `make test` yourself")
    args = ap.parse_args()
    pages = [p.resolve() for p in args.pages] or default_pages()
    first_line = 0
    if args.start:
        page, _, line = args.start.rpartition(":")
        start = (ROOT / page).resolve()
        if start not in pages:
            ap.error(f"--start: {page} is not among the pages")
        pages, first_line = pages[pages.index(start):], int(line)
    if args.list:
        for i, page in enumerate(pages):
            for block in runnable_blocks(page, args.cheap):
                if i == 0 and block.line < first_line:
                    continue
                first = block.code.strip().splitlines()[0] if block.code.strip() else ""
                print(f"{page.relative_to(ROOT)}:{block.line}  {block.language} {block.mark}  {first}")
        return 0
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so run_page's cleanup stops the servers it started.
    signal.signal(signal.SIGTERM, _interrupt)
    for i, page in enumerate(pages):
        try:
            run_page(page, args.workdir.resolve(), args.cheap, first_line=first_line if i == 0 else 0)
        except RuntimeError as err:
            print(f"FAILED {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"interrupted in {page.name}; its background commands were stopped", file=sys.stderr)
            return 130
    print("every runnable block ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
