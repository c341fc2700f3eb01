"""Document readers: a file becomes a list of pages of plain text, ready to be chunked.

    doc = read_document("guide.pdf")          # Document(source, kind="pdf", pages=[Page(1, "..."), ...])

- ``.txt`` and any other UTF-8 text file: one page, the text as it is;
- ``.md``: one page, the Markdown source (``chunking`` reads its headings);
- ``.html``/``.htm``: the visible text (scripts and styles dropped), block elements as paragraph breaks;
- ``.pdf``: one page per PDF page, numbered from 1, read with ``pypdf``.

Files that cannot be read become a :class:`DocumentError` that names the file and the reason (encrypted or
damaged PDF, binary file); an empty file is a document with no text, which ``ingest`` skips with a notice.
"""

from __future__ import annotations

import hashlib
import html.parser
import re
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.errors import ScratchLMError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf"}


class DocumentError(ScratchLMError):
    """A file that cannot be read as a document (encrypted or damaged PDF, binary, not UTF-8)."""


@dataclass(frozen=True)
class Page:
    number: int | None  # 1-based PDF page number; None for formats without pages
    text: str


@dataclass
class Document:
    source: str  # the path as stored in the index (absolute, POSIX)
    kind: str  # "text" | "markdown" | "html" | "pdf"
    pages: list[Page] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not any(p.text.strip() for p in self.pages)


def content_hash(data: bytes) -> str:
    """SHA-256 of a file's bytes: what makes re-ingesting an unchanged file a no-op."""
    return hashlib.sha256(data).hexdigest()


def kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html", ".pdf": "pdf"}.get(
        suffix, "text")


def read_document(path: str | Path, data: bytes | None = None) -> Document:
    """Read ``path`` (or its already-read bytes ``data``) into a :class:`Document`."""
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DocumentError(f"{path}: cannot read it ({e.strerror or e})") from None
    kind = kind_of(path)
    source = path.resolve().as_posix()
    if kind == "pdf":
        return Document(source, kind, read_pdf_pages(path, data))
    text = decode_text(path, data)
    if kind == "html":
        text = html_to_text(text)
    return Document(source, kind, [Page(None, text)])


def decode_text(path: Path, data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark dropped); a binary or non-UTF-8 file is a DocumentError."""
    # NUL bytes do not occur in text files; they are the cheapest sign of a binary (images, archives, .docx).
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{path}: a binary file, not text (give text, Markdown, HTML or PDF files)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def read_pdf_pages(path: Path, data: bytes) -> list[Page]:
    """The text of each PDF page, numbered from 1."""
    import io

    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise DocumentError(f"{path}: reading PDF files needs pypdf: pip install 'scratchlm[rag]'") from None
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # An owner-password-only PDF opens with the empty user password; anything else we cannot read.
            try:
                if not reader.decrypt(""):
                    raise DocumentError(f"{path}: an encrypted PDF; save a copy without a password and ingest that")
            except DocumentError:
                raise
            except Exception:
                raise DocumentError(f"{path}: an encrypted PDF; save a copy without a password and ingest that") \
                    from None
        return [Page(i + 1, _clean_pdf_text(page.extract_text() or "")) for i, page in enumerate(reader.pages)]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError(f"{path}: not a readable PDF ({type(e).__name__}: {str(e)[:80]})") from None


def _clean_pdf_text(text: str) -> str:
    # pypdf joins a hyphenated line break as "exam-\nple"; rejoin those, keep other line breaks.
    return re.sub(r"(\w)-\n(\w)", r"\1\2", text.replace("\r\n", "\n"))


_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
               "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "title", "dt", "dd"}


class _TextExtractor(html.parser.HTMLParser):
    """Visible text of an HTML page; block elements end a paragraph, headings become Markdown headings."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript", "template"):
            self.skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
            if len(tag) == 2 and tag[0] == "h" and tag[1].isdigit():
                self.parts.append("#" * int(tag[1]) + " ")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript", "template"):
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """The visible text of an HTML document, paragraphs separated by blank lines, headings as ``# ...``."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    lines = [line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
