"""Data curation in one streaming pass: exact dedup, Gopher quality rules, MinHash near-dedup, JSONL shards out.

    report = clean_corpus(["crawl/", "extra.jsonl"], "clean/", CleanOptions(threshold=0.8))
    print(format_report(report))          # what each filter removed, with examples (also clean/report.json)
    # then: scratchlm train clean/ ...    (documents packed back to back, separated by the end-of-text token)

Each document goes through the filters in order of cost and stops at the first that removes it, so the counts
add up: documents in = kept + the sum over filters.

1. ``empty``: nothing but white space;
2. ``exact_duplicate``: the same text as an earlier document after normalisation (Unicode NFKC, case folded,
   runs of white space made one space): a 64-bit BLAKE2b hash of it is looked up in a set;
3. the Gopher rules (``quality.py``), first failed rule by name;
4. ``near_duplicate``: MinHash + LSH (``minhash.py``) finds an earlier kept document that shares a band of its
   signature, so that their Jaccard similarity of shingles is probably above the threshold; with ``verify`` the
   candidate must also have an estimated similarity (fraction of equal minima) of at least the threshold, which
   trades a few near-threshold removals for precision.

Memory. Documents stream one at a time from the inputs to the shards (a text file is one document, a JSONL file
is read line by line), so memory does not grow with the corpus' size in bytes but with the number of documents
kept: per distinct document one 64-bit hash in a set (70-140 bytes), and per kept document ``bands`` entries in
the LSH tables (~70 bytes each) and 8 bytes of provenance: under 1 KB per kept document with the defaults
(9 bands), under 1 GB for a million; ``verify`` adds the kept signatures, 4 bytes per permutation (512 bytes with 128).
Fewer bands (a lower --num-perm) shrink it; the largest document must fit in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import unicodedata
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import regex

from scratchlm.data.minhash import (
    SHINGLE_UNITS,
    LSHIndex,
    Permutations,
    SignatureStore,
    estimate_jaccard,
    lsh_parameters,
    minhash,
    shingle_hashes,
)
from scratchlm.data.quality import QualityRules, check
from scratchlm.errors import ConfigError, DataError
from scratchlm.files import atomic_write_json
from scratchlm.train.sources import JSONL_SUFFIXES, decode_utf8, jsonl_texts, list_sources, utf8_lines

REPORT_FILE = "report.json"
SHARD_PATTERN = "part-{:05d}.jsonl"


@dataclass(frozen=True)
class CleanOptions:
    """What ``clean_corpus`` removes and how. ``quality=None`` turns the Gopher rules off."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity of shingle sets above which a document is a near-dup
    shingle_size: int = 5
    shingle_unit: str = "word"
    num_perm: int = 128
    bands: int | None = None  # None: chosen from the threshold (lsh_parameters)
    rows: int | None = None
    verify: bool = False  # keep a candidate unless its estimated Jaccard similarity reaches the threshold
    seed: int = 1
    quality: QualityRules | None = field(default_factory=QualityRules)
    text_field: str = "text"
    shard_docs: int = 10_000
    examples: int = 3  # removed documents shown per filter in the report
    snippet_chars: int = 200

    def __post_init__(self):
        if self.shingle_unit not in SHINGLE_UNITS:
            raise ConfigError(f"--shingle-unit must be one of {', '.join(SHINGLE_UNITS)}, got {self.shingle_unit!r}")
        if self.shingle_size < 1:
            raise ConfigError(f"--shingle-size must be at least 1, got {self.shingle_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if self.num_perm < 2:
            raise ConfigError(f"--num-perm must be at least 2, got {self.num_perm}")
        if (self.bands is None) != (self.rows is None):
            raise ConfigError("give both --bands and --rows, or neither (then they follow from --threshold)")
        if self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
            raise ConfigError(f"--bands {self.bands} x --rows {self.rows} must be positive and use at most "
                              f"--num-perm {self.num_perm} permutations")
        if self.shard_docs < 1:
            raise ConfigError(f"--shard-docs must be at least 1, got {self.shard_docs}")
        if self.examples < 0:
            raise ConfigError(f"--examples must be at least 0, got {self.examples}")

    def lsh_shape(self) -> tuple[int, int]:
        """(bands, rows): the given ones, or the best for the threshold."""
        if self.bands is not None:
            return self.bands, self.rows
        return lsh_parameters(self.threshold, self.num_perm)


@dataclass
class Document:
    text: str
    path: str
    line: int = 0  # the JSONL line number; 0 for a text file (the whole file is the document)

    @property
    def source(self) -> str:
        """Where the document came from: ``file`` or ``file:line``."""
        return f"{self.path}:{self.line}" if self.line else self.path


def normalise_exact(text: str) -> str:
    """The text that exact deduplication compares: NFKC, case folded, white space runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(text: str) -> int:
    """A 64-bit hash of the normalised text (collisions: ~N^2 / 2^65, negligible below billions of documents)."""
    digest = hashlib.blake2b(normalise_exact(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def input_files(inputs: Iterable[str | Path], out: Path | None = None) -> list[Path]:
    """The files the inputs stand for (folders expanded to their .txt/.md/.jsonl files), each once.

    A folder that holds ``out`` does not bring in a previous output's shards (``out`` itself, named, does).
    """
    files: list[Path] = []
    seen: set[Path] = set()
    inputs = list(inputs)
    if not inputs:
        raise DataError("no input given: name text files, folders or .jsonl files to clean")
    out = out.resolve() if out is not None else None
    for item in inputs:
        inside_out = out is not None and Path(item).resolve().is_relative_to(out)
        for path in list_sources(item):
            resolved = path.resolve()
            if out is not None and not inside_out and resolved.is_relative_to(out):
                continue
            if resolved not in seen:
                seen.add(resolved)
                files.append(path)
    return files


def read_inputs(files: list[Path], text_field: str, consumed: list[int]) -> Iterator[Document]:
    """Every document of ``files``, one at a time; ``consumed[0]`` counts the bytes read (for progress)."""
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            for number, text in jsonl_texts(utf8_lines(path, consumed), path, text_field):
                yield Document(text, str(path), number)
        else:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc.strerror}") from None
            consumed[0] += len(data)
            yield Document(decode_utf8(data, path).removeprefix("\ufeff"), str(path))


# --------------------------------------------------------------------------------------------------
class Tally:
    """Documents and characters removed by one filter, with the first few examples."""

    def __init__(self, examples: int, snippet_chars: int):
        self.documents = self.characters = 0
        self.examples: list[dict] = []
        self.limit, self.snippet_chars = examples, snippet_chars

    def add(self, doc: Document, **detail) -> None:
        self.documents += 1
        self.characters += len(doc.text)
        if len(self.examples) < self.limit:
            snippet = doc.text[:self.snippet_chars] + ("…" if len(doc.text) > self.snippet_chars else "")
            self.examples.append({"source": doc.source, **detail, "text": snippet})

    def as_dict(self) -> dict:
        return {"documents": self.documents, "characters": self.characters, "examples": self.examples}


class ShardWriter:
    """JSONL shards of at most ``shard_docs`` records ``{"text": ..., "source": ...}`` in ``directory``."""

    def __init__(self, directory: Path, shard_docs: int):
        self.directory, self.shard_docs = directory, shard_docs
        self.shards: list[str] = []
        self.file = None
        self.in_shard = 0

    def write(self, doc: Document) -> None:
        if self.file is None or self.in_shard == self.shard_docs:
            self.close()
            name = SHARD_PATTERN.format(len(self.shards))
            self.file = open(self.directory / name, "w", encoding="utf-8")
            self.shards.append(name)
            self.in_shard = 0
        self.file.write(json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n")
        self.in_shard += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


def clean_documents(documents: Iterable[Document], writer: ShardWriter | None, options: CleanOptions,
                    on_document=None) -> dict:
    """Run the filters over ``documents`` (any iterable, consumed once) and write the kept ones to ``writer``.

    Returns the report's counts (see ``clean_corpus``); ``on_document(kept_so_far)`` is called after each one.
    """
    bands, rows = options.lsh_shape()
    perms = Permutations(options.num_perm, options.seed)
    index = LSHIndex(bands, rows, seed=options.seed)
    seen: set[int] = set()
    signatures = SignatureStore(options.num_perm) if options.verify else None
    kept_sources = array("Q")  # provenance of each kept document: (file number << 40) | line
    paths: dict[str, int] = {}
    names = ["empty", "exact_duplicate", *(options.quality.active() if options.quality else ()), "near_duplicate"]
    tallies = {name: Tally(options.examples, options.snippet_chars) for name in names}
    n_in = chars_in = n_kept = chars_kept = 0
    start = time.perf_counter()

    def unpacked(value: int) -> str:  # only for the few examples: a linear search is fine
        path = next(p for p, i in paths.items() if i == value >> 40)
        return Document("", path, value & ((1 << 40) - 1)).source

    for doc in documents:
        n_in += 1
        chars_in += len(doc.text)
        removed = _first_filter(doc, options, seen, index, perms, tallies, unpacked, kept_sources, signatures)
        if removed is None:
            n_kept += 1
            chars_kept += len(doc.text)
            kept_sources.append(paths.setdefault(doc.path, len(paths)) << 40 | doc.line)
            if writer is not None:
                writer.write(doc)
        if on_document is not None:
            on_document(n_kept)
    seconds = time.perf_counter() - start
    removed = {name: tally.as_dict() for name, tally in tallies.items()}
    assert n_in == n_kept + sum(t["documents"] for t in removed.values())  # every document counted once
    return {
        "documents_in": n_in, "characters_in": chars_in, "documents_kept": n_kept, "characters_kept": chars_kept,
        "removed": removed, "seconds": round(seconds, 3), "documents_per_second": round(n_in / max(seconds, 1e-9), 1),
        "lsh": {"bands": bands, "rows": rows, "num_perm": options.num_perm, "threshold": options.threshold,
                "verify": options.verify, "indexed_documents": index.size,
                "approximate_index_bytes": index.approximate_bytes() + (signatures.nbytes() if signatures else 0)},
        "exact_hashes": len(seen),
    }


def _first_filter(doc, options, seen, index, perms, tallies, unpacked, kept_sources, signatures) -> str | None:
    """The name of the filter that removes ``doc`` (its tally updated), or None when it is kept."""
    if not doc.text.strip():
        tallies["empty"].add(doc)
        return "empty"
    if options.exact:
        key = exact_key(doc.text)
        if key in seen:
            tallies["exact_duplicate"].add(doc)
            return "exact_duplicate"
        seen.add(key)
    if options.quality is not None:
        failed = check(doc.text, options.quality)
        if failed is not None:
            rule, value = failed
            tallies[rule].add(doc, value=round(value, 4))
            return rule
    if options.near:
        shingles = shingle_hashes(doc.text, options.shingle_size, options.shingle_unit)
        if len(shingles):
            signature = minhash(shingles, perms)
            keys = index.band_keys(signature)
            kept_id = len(kept_sources)  # the number this document gets if it is kept
            if signatures is None:
                match = index.query(signature, keys)
                if match is not None:
                    tallies["near_duplicate"].add(doc, similar_to=unpacked(kept_sources[match]))
                    return "near_duplicate"
            else:
                for match in index.candidates(signature, keys):
                    similarity = estimate_jaccard(signature, signatures[match])
                    if similarity >= options.threshold:
                        tallies["near_duplicate"].add(doc, similar_to=unpacked(kept_sources[match]),
                                                      estimated_jaccard=round(similarity, 4))
                        return "near_duplicate"
                signatures.append(kept_id, signature)
            index.insert(signature, kept_id, keys)
    return None


# --------------------------------------------------------------------------------------------------
def _is_our_output(path: Path) -> bool:
    """A directory that ``clean_corpus`` wrote: report.json and part-*.jsonl files, nothing else."""
    if not (path / REPORT_FILE).is_file():
        return False
    return all(p.name == REPORT_FILE or regex.fullmatch(r"part-\d{5}\.jsonl", p.name) for p in path.iterdir())


def _check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise ConfigError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir() or not _is_our_output(out):
            raise ConfigError(f"{out} is not a folder that `scratchlm data clean` wrote (report.json and "
                              "part-*.jsonl only); refusing to replace it even with --force: choose another --out")


@contextlib.contextmanager
def _output_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it when the body succeeds and is deleted otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~mask)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old")) / "previous"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_corpus(inputs: Iterable[str | Path], out: str | Path, options: CleanOptions | None = None,
                 force: bool = False, progress: bool = False) -> dict:
    """Clean ``inputs`` (text files, folders, JSONL) into JSONL shards in ``out``; returns the report.

    The report (also written to ``out/report.json``) gives, per filter, the documents and characters it removed
    with examples, the counts in and kept, the LSH shape and the throughput.
    """
    options = options or CleanOptions()
    out = Path(out).expanduser()
    files = input_files(inputs, out)
    _check_out(out, force)
    total = sum(f.stat().st_size for f in files)
    consumed = [0]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="cleaning", file=sys.stderr, dynamic_ncols=True)

    def on_document(kept: int) -> None:
        if bar is not None and consumed[0] - bar.n >= 1 << 16:
            bar.update(consumed[0] - bar.n)
            bar.set_postfix(kept=kept, refresh=False)

    try:
        with _output_dir(out) as tmp:
            writer = ShardWriter(tmp, options.shard_docs)
            try:
                counts = clean_documents(read_inputs(files, options.text_field, consumed), writer, options,
                                         on_document)
            finally:
                writer.close()
            report = {"inputs": [str(f) for f in files], "input_bytes": total, **counts, "shards": writer.shards,
                      "options": _options_record(options)}
            atomic_write_json(tmp / REPORT_FILE, report)
    finally:
        if bar is not None:
            bar.update(consumed[0] - bar.n)
            bar.close()
    return report


def _options_record(options: CleanOptions) -> dict:
    record = {k: v for k, v in vars(options).items() if k != "quality"}
    record["quality"] = None if options.quality is None else {
        **options.quality.active(), "stop_words": list(options.quality.stop_words)}
    return record


def format_report(report: dict) -> str:
    """The report as a table: one row per filter that removed something, then what was kept."""
    n_in = max(1, report["documents_in"])
    rows = [("input", report["documents_in"], report["characters_in"])]
    rows += [(name, t["documents"], t["characters"]) for name, t in report["removed"].items() if t["documents"]]
    rows.append(("kept", report["documents_kept"], report["characters_kept"]))
    lines = [f"{'filter':<24} {'documents':>10} {'%':>6} {'characters':>13}"]
    lines += [f"{name:<24} {docs:>10,} {100 * docs / n_in:>6.1f} {chars:>13,}" for name, docs, chars in rows]
    lsh = report["lsh"]
    lines.append(f"{report['documents_per_second']:,.0f} documents/s; near-duplicates: threshold {lsh['threshold']}, "
                 f"{lsh['bands']} bands x {lsh['rows']} rows of {lsh['num_perm']} permutations, "
                 f"index ~{lsh['approximate_index_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)
