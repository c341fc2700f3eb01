"""Where training text comes from: a text file, a folder of ``.txt``/``.md`` files, or JSONL.

    read_documents("plays.txt")             # one document: the whole file
    read_documents("notes/")                # every .txt, .md and .jsonl file below it, in sorted order
    read_documents("chats.jsonl", "text")   # one document per line: the line's "text" field (read line by line)
    read_documents("clean/")                # the JSONL shards that `scratchlm data clean` writes

Every problem is a ``DataError`` that names the file (and the byte offset or line) and says what to do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from scratchlm.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
BUNDLED_CORPUS = "shakespeare.txt"


def bundled_corpus() -> Path:
    """Path of the Shakespeare corpus that ships inside the package (built by scripts/build_corpus.py)."""
    return Path(str(resources.files("scratchlm") / "data" / BUNDLED_CORPUS))


def list_sources(path: str | Path) -> list[Path]:
    """The files a data path stands for: the file itself, or the text/JSONL files below a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path} holds no .txt, .md or .jsonl files: put your training text there")
        return files
    raise DataError(f"training data {path} does not exist: give a text file, a folder of .txt/.md files, "
                    "or a .jsonl file")


def decode_utf8(data: bytes, source: Path) -> str:
    """Decode bytes as UTF-8, or raise a DataError naming the file and the first bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{source}: invalid UTF-8 at byte offset {exc.start} (line {line}, byte 0x{data[exc.start]:02x}); "
            "convert the file to UTF-8 first, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`"
        ) from None


def jsonl_objects(lines: Iterable[str], source: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of JSONL text; a DataError names the first bad line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{source}, line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def jsonl_texts(lines: Iterable[str], source: str | Path, text_field: str) -> Iterator[tuple[int, str]]:
    """(line number, ``text_field`` string) for every non-blank line of JSONL text."""
    for number, record in jsonl_objects(lines, source):
        if text_field not in record:
            raise DataError(f"{source}, line {number}: no {text_field!r} field; pass --text-field NAME to "
                            "choose the field that holds the text")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{source}, line {number}: field {text_field!r} is {type(text).__name__}, "
                            "not a string")
        yield number, text


def read_jsonl(data: str, source: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` string of every non-blank line of a JSONL file."""
    for _, text in jsonl_texts(data.splitlines(), source, text_field):
        yield text


def utf8_lines(source: Path, consumed: list[int] | None = None) -> Iterator[str]:
    """The lines of a file, decoded one at a time (memory: one line); ``consumed[0]`` counts the bytes read.

    Invalid UTF-8 is a DataError naming the file, the byte offset and the line.
    """
    offset = 0
    try:
        with open(source, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading byte-order mark dropped
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{source}: invalid UTF-8 at byte offset {offset + exc.start} (line {number}, byte "
                        f"0x{raw[exc.start]:02x}); convert the file to UTF-8 first, e.g. "
                        "`iconv -f latin1 -t utf-8 FILE > FILE.utf8`") from None
                offset += len(raw)
                if consumed is not None:
                    consumed[0] += len(raw)
                yield line
    except OSError as exc:
        raise DataError(f"cannot read training data {source}: {exc.strerror}") from None


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[tuple[Path, str]]:
    """Yield ``(file, text)`` for every document under ``path`` (see the module docstring)."""
    for source in list_sources(path):
        if source.suffix.lower() in JSONL_SUFFIXES:  # streamed: a large JSONL file is never whole in memory
            for _, doc in jsonl_texts(utf8_lines(source), source, text_field):
                yield source, doc
            continue
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read training data {source}: {exc.strerror}") from None
        yield source, decode_utf8(data, source)


def fingerprint_sources(path: str | Path) -> list[dict]:
    """Name, size and SHA-256 of every source file: what decides whether prepared data is still valid."""
    rows = []
    for source in list_sources(path):
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        rows.append({"path": str(source.resolve()), "size": source.stat().st_size, "sha256": digest.hexdigest()})
    return rows
