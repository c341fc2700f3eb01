"""Chunking: cut a document's pages into passages under a token budget, at paragraph and sentence boundaries.

Each chunk is a contiguous span of one page's text (``text == page.text[start:end]``), so a citation can point
at the exact characters. The cutter splits a page into paragraphs (blank lines; for Markdown also each
heading line), paragraphs into sentences, and sentences longer than a chunk into word runs; it packs the
sentences greedily up to ``chunk_tokens`` tokens of the embedding model's tokenizer, ending a chunk at a
paragraph end when one falls in its second half, and starts the next chunk with the last sentences of the
previous one worth up to ``overlap`` tokens, so that a sentence at a boundary is
whole in at least one chunk. A chunk never crosses a page or a Markdown section: it carries the heading path
("Install > On Linux") of its section.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from scratchlm.rag.documents import Document

DEFAULT_CHUNK_TOKENS = 256
DEFAULT_OVERLAP = 32

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# A sentence ends at . ! ? (and closing quotes or brackets) followed by white space; good enough for prose,
# and a miss only makes a piece longer, which the word-level cut then handles.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD = re.compile(r"\S+\s*")


@dataclass(frozen=True)
class Chunk:
    text: str
    page: int | None
    start: int  # character span in the page's text
    end: int
    heading: str  # Markdown heading path, "" when none


def _spans(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Split ``text[start:end]`` after each match of ``pattern``; spans keep their trailing separators."""
    spans, pos = [], start
    for m in pattern.finditer(text, start, end):
        if m.end() > pos and m.end() < end:
            spans.append((pos, m.end()))
            pos = m.end()
    spans.append((pos, end))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _sections(text: str, markdown: bool) -> list[tuple[int, int, str]]:
    """(start, end, heading path) of each Markdown section; one section for other text."""
    if not markdown:
        return [(0, len(text), "")]
    sections, path, pos, heading = [], [], 0, ""
    for m in _HEADING.finditer(text):
        if m.start() > pos:
            sections.append((pos, m.start(), heading))
        level = len(m.group(1))
        path = path[:level - 1] + [""] * max(0, level - 1 - len(path)) + [m.group(2).strip()]
        heading = " > ".join(p for p in path if p)
        pos = m.start()
    sections.append((pos, len(text), heading))
    return sections


def _pieces(text: str, start: int, end: int, count: Callable[[str], int],
            budget: int) -> list[tuple[int, int, bool]]:
    """Sentences of ``text[start:end]`` (word runs for a sentence over ``budget`` tokens), each with a flag that
    says whether it ends a paragraph."""
    out = []
    for a, b in _spans(text, start, end, _PARAGRAPH_BREAK):
        for c, d in _spans(text, a, b, _SENTENCE_END):
            if count(text[c:d]) <= budget:
                out.append((c, d, False))
                continue
            run_start = c
            for w in _WORD.finditer(text, c, d):  # a sentence longer than a chunk: cut between words
                if w.start() > run_start and count(text[run_start:w.end()]) > budget:
                    out.append((run_start, w.start(), False))
                    run_start = w.start()
            out.append((run_start, d, False))
        out[-1] = (out[-1][0], out[-1][1], True)
    return out


def chunk_text(text: str, count: Callable[[str], int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               overlap: int = DEFAULT_OVERLAP, markdown: bool = False, page: int | None = None) -> list[Chunk]:
    """Chunks of one page's ``text``; ``count(s)`` is the number of tokens of ``s`` for the embedding model."""
    if chunk_tokens < 8:
        raise ValueError("chunk_tokens must be at least 8")
    if not 0 <= overlap < chunk_tokens // 2:
        raise ValueError("overlap must be at least 0 and less than half of chunk_tokens")
    chunks = []
    for s_start, s_end, heading in _sections(text, markdown):
        if markdown and heading and not _HEADING.sub("", text[s_start:s_end], count=1).strip():
            continue  # a heading with nothing under it before the next one: its words are in the heading path
        pieces = _pieces(text, s_start, s_end, count, chunk_tokens)
        sizes = [count(text[a:b]) for a, b, _ in pieces]
        i = 0
        while i < len(pieces):
            # Pack pieces [i, j) while the sum of their token counts fits (a sum slightly overestimates the
            # count of the joined text, which keeps us under the budget) ...
            j, used, fill = i, 0, []
            while j < len(pieces) and used + sizes[j] <= chunk_tokens:
                used += sizes[j]
                fill.append(used)
                j += 1
            j = max(j, i + 1)
            # ... and when the chunk ends inside a paragraph, end it at the last paragraph end instead, if that
            # keeps it at least half full.
            if j < len(pieces) and not pieces[j - 1][2]:
                for m in range(j - 1, i, -1):
                    if pieces[m - 1][2] and fill[m - 1 - i] >= chunk_tokens // 2:
                        j = m
                        break
            start, end = pieces[i][0], pieces[j - 1][1]
            body = text[start:end]
            stripped_start = start + (len(body) - len(body.lstrip()))
            stripped_end = end - (len(body) - len(body.rstrip()))
            chunks.append(Chunk(text[stripped_start:stripped_end], page, stripped_start, stripped_end, heading))
            if j >= len(pieces):
                break
            # Overlap: step back over trailing pieces of this chunk worth up to ``overlap`` tokens.
            k, back = j, 0
            while k - 1 > i and back + sizes[k - 1] <= overlap:
                back += sizes[k - 1]
                k -= 1
            i = k
    return chunks


def chunk_document(doc: Document, count: Callable[[str], int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """The chunks of every page of ``doc``, in reading order."""
    out = []
    for page in doc.pages:
        out.extend(chunk_text(page.text, count, chunk_tokens, overlap, markdown=doc.kind in ("markdown", "html"),
                              page=page.number))
    return out
