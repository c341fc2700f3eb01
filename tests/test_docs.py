"""The README and docs/*.md as a CommonMark parser reads them: fences, Python blocks, links, runnable examples.

The marks that make a block runnable (```` ```bash run ````, ``run-slow``, ``run-background``) are explained in
docs/README.md. The cheap ``run`` blocks execute here, page by page in a scratch directory; the rest run in
``scripts/run_docs.py``, whose fence reader must agree with markdown-it's.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]


def load_run_docs():
    spec = importlib.util.spec_from_file_location("run_docs", ROOT / "scripts" / "run_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("run_docs", module)
    spec.loader.exec_module(module)
    return module


run_docs = load_run_docs()


def tokens(path: Path):
    return MarkdownIt("commonmark", {"html": True}).enable("table").parse(path.read_text(encoding="utf-8"))


def fences(path: Path):
    return [t for t in tokens(path) if t.type == "fence"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    toks = tokens(path)
    return {slug(toks[i + 1].content) for i, t in enumerate(toks) if t.type == "heading_open"}


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 350, f"README.md has {len(lines)} lines; move details to docs/"
    assert (ROOT / "docs" / "README.md").is_file()


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_every_fence_is_closed_by_a_bare_fence_line(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    for fence in fences(path):
        start, end = fence.map
        marker = fence.markup
        closing = lines[end - 1].strip() if end - 1 > start else ""
        assert closing.startswith(marker) and set(closing) == {marker[0]}, (
            f"{path.name}:{start + 1}: the {marker} fence opened here is never closed (it runs to line {end})")
        for offset, line in enumerate(lines[start + 1:end - 1], start + 2):
            stripped = line.lstrip(" ")
            indent = len(line) - len(stripped)
            assert not (indent <= 3 and stripped.startswith(marker)), (
                f"{path.name}:{offset}: {line.strip()!r} inside a fence: a closing fence must have nothing after it")


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_every_python_block_compiles(path):
    blocks = [f for f in fences(path) if f.info.split()[:1] == ["python"]]
    for block in blocks:
        compile(block.content, f"{path.name}:{block.map[0] + 1}", "exec")


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_every_relative_link_points_to_a_file_and_heading(path):
    links = []
    for tok in tokens(path):
        for child in tok.children or []:
            if child.type == "link_open":
                links.append(child.attrGet("href"))
            elif child.type == "image":
                links.append(child.attrGet("src"))
    for href in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", href):  # http:, https:, mailto:
            continue
        target, _, anchor = href.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.name}: link {href!r} points to {file}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{path.name}: link {href!r}: no heading with that anchor in {file.name}"


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_run_docs_reads_the_fences_as_commonmark_does(path):
    ours = [(b.line, b.language, b.code) for b in run_docs.fenced_blocks(path)]
    theirs = [(f.map[0] + 1, (f.info.split() or [""])[0], f.content) for f in fences(path)]
    assert ours == theirs


def test_runnable_marks_are_known_and_on_runnable_languages():
    for path in PAGES:
        for fence in fences(path):
            words = fence.info.split()
            marks = [w for w in words[1:] if w.startswith("run")]
            assert all(m in run_docs.MARKS for m in marks), f"{path.name}:{fence.map[0] + 1}: unknown mark {marks}"
            if marks:
                assert words[0] in ("bash", "python"), f"{path.name}:{fence.map[0] + 1}: cannot run {words[0]}"
                if marks[0] == "run-background":
                    assert words[0] == "bash"


def test_the_readme_quickstart_comes_first_and_uses_make():
    first = run_docs.runnable_blocks(ROOT / "README.md")[0]
    assert first.code.splitlines()[0].startswith("make run")
    assert first.code.splitlines()[1].startswith("make test")


CHEAP_PAGES = [p for p in PAGES if run_docs.runnable_blocks(p, cheap_only=True)]


@pytest.mark.parametrize("path", CHEAP_PAGES, ids=[str(p.relative_to(ROOT)) for p in CHEAP_PAGES])
def test_cheap_runnable_blocks_run(path, tmp_path, smollm2_path):
    """A page's ``run`` blocks, in order, in a scratch directory beside links to the repository's inputs."""
    for name in ("examples", "scripts", "src"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SCRATCHLM_COMPILE"] = "0"  # seconds, not the first compile's minute (the compiled step has its own tests)
    run_docs.run_page(path, tmp_path, cheap_only=True, env=env, timeout=120, say=lambda *a, **k: None)
