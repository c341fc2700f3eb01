"""Readers, chunking and idempotent ingest (on both store engines). Ingest mechanics use the hashed bag-of-words
stand-in embedder; retrieval with the real encoder is in test_rag_search.py."""

from __future__ import annotations

import pytest

from rag_helpers import HashedBagOfWords, fresh_postgres_url, postgres_server, write_pdf  # noqa: F401  (fixtures)
from scratchlm.rag.chunking import chunk_document, chunk_text
from scratchlm.rag.documents import DocumentError, html_to_text, read_document
from scratchlm.rag.ingest import ingest, remove
from scratchlm.rag.store import open_store

pytestmark = pytest.mark.usefixtures("one_thread")

EMBEDDER = HashedBagOfWords()
COUNT = lambda s: len(EMBEDDER.tokenizer.encode(s))  # noqa: E731

PROSE = ("The bridge was rebuilt in 1871 after the flood. Its stone came from the north quarry. "
         "Traffic doubled within ten years! Was it worth the cost? The council thought so.\n\n"
         "A second paragraph talks about the river. It floods every spring. Boats wait at the lock.\n\n")


# -- readers --------------------------------------------------------------------------------------
def test_pdf_pages_are_numbered_from_one(tmp_path):
    pdf = write_pdf(tmp_path / "guide.pdf", ["Installing the pump", "Cleaning the filter monthly"])
    doc = read_document(pdf)
    assert doc.kind == "pdf" and [p.number for p in doc.pages] == [1, 2]
    assert "Cleaning the filter monthly" in doc.pages[1].text


def test_encrypted_pdf_is_refused_with_the_reason(tmp_path):
    pdf = write_pdf(tmp_path / "secret.pdf", ["hidden"], password="pw")
    with pytest.raises(DocumentError, match="secret.pdf: an encrypted PDF"):
        read_document(pdf)


def test_damaged_pdf_and_binary_files_are_refused(tmp_path):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n garbage")
    with pytest.raises(DocumentError, match="broken.pdf: not a readable PDF"):
        read_document(tmp_path / "broken.pdf")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DocumentError, match="a binary file"):
        read_document(tmp_path / "image.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentError, match="not UTF-8"):
        read_document(tmp_path / "latin1.txt")


def test_html_keeps_visible_text_and_headings():
    text = html_to_text("<html><head><title>T</title><style>p{}</style><script>var x=1;</script></head>"
                        "<body><h2>Setup</h2><p>Run the <b>installer</b>.</p><p>Then reboot &amp; log in.</p>")
    assert "var x" not in text and "p{}" not in text
    assert "## Setup" in text and "Run the installer." in text and "Then reboot & log in." in text


# -- chunking -------------------------------------------------------------------------------------
def test_chunks_are_exact_spans_under_the_budget():
    text = PROSE * 6
    chunks = chunk_text(text, COUNT, chunk_tokens=40, overlap=8)
    assert len(chunks) > 5
    for c in chunks:
        assert text[c.start:c.end] == c.text and COUNT(c.text) <= 40
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())  # nothing lost
    # Cuts fall at sentence ends (each chunk ends with . ! or ?), and consecutive chunks overlap.
    assert all(c.text[-1] in ".!?" for c in chunks)
    assert any(b.start < a.end for a, b in zip(chunks, chunks[1:]))


def test_a_sentence_longer_than_the_budget_is_cut_between_words():
    text = " ".join(f"word{i}" for i in range(100)) + "."
    chunks = chunk_text(text, COUNT, chunk_tokens=16, overlap=0)
    assert all(COUNT(c.text) <= 16 for c in chunks) and len(chunks) >= 6
    assert " ".join(c.text for c in chunks) == text


def test_markdown_chunks_carry_their_heading_path(tmp_path):
    md = tmp_path / "guide.md"
    md.write_text("# Install\nIntro text.\n\n## On Linux\nUse apt.\n\n## On Mac\nUse brew.\n\n# Usage\nRun it.\n")
    chunks = chunk_document(read_document(md), COUNT, chunk_tokens=64, overlap=0)
    by_heading = {c.heading: c.text for c in chunks}
    assert by_heading["Install > On Linux"].startswith("## On Linux") and "apt" in by_heading["Install > On Linux"]
    assert "brew" in by_heading["Install > On Mac"] and "Run it." in by_heading["Usage"]
    assert all("apt" not in c.text for c in chunks if c.heading != "Install > On Linux")  # no crossing sections


# -- ingest ---------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("fresh_postgres_url")


def make_folder(root):
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text(PROSE * 3)
    (root / "docs" / "sub" / "b.md").write_text("# Title\n\n" + PROSE)
    write_pdf(root / "docs" / "c.pdf", ["Pump manual page one", "Filter care on page two"])
    (root / "docs" / "ignored.bin").write_bytes(b"\x00\x01")
    return root / "docs"


def chunk_rows(store):
    hits = store.keyword_search("the bridge river pump filter title", 1000)
    return sorted((r.source, r.start, r.end, r.text) for r in store.chunks([i for i, _ in hits]).values())


def test_ingest_is_idempotent_and_replaces_changed_files(location, tmp_path):
    docs = make_folder(tmp_path)
    with open_store(location, EMBEDDER) as store:
        first = ingest(store, EMBEDDER, [docs], chunk_tokens=32, overlap=4)
        assert len(first.added) == 3 and not first.skipped  # .bin is not a document suffix
        counts, rows = store.count(), chunk_rows(store)
        again = ingest(store, EMBEDDER, [docs], chunk_tokens=32, overlap=4)
        assert len(again.unchanged) == 3 and again.chunks == 0
        assert store.count() == counts and chunk_rows(store) == rows  # no duplicate chunks
        (docs / "a.txt").write_text("Only one new sentence about ferries.")
        changed = ingest(store, EMBEDDER, [docs], chunk_tokens=32, overlap=4)
        assert [s.rsplit("/", 1)[1] for s in changed.updated] == ["a.txt"] and len(changed.unchanged) == 2
        hits = store.keyword_search("ferries", 5)
        assert len(hits) == 1
        a_source = (docs / "a.txt").resolve().as_posix()
        assert all(r.source != a_source or "ferries" in r.text for r in store.chunks(
            [i for i, _ in store.keyword_search("bridge ferries", 1000)]).values())
        pages = {r.page for r in store.chunks([i for i, _ in store.keyword_search("pump filter", 10)]).values()}
        assert pages == {1, 2}


def test_sync_removes_vanished_files_and_remove_drops_a_folder(location, tmp_path):
    docs = make_folder(tmp_path)
    with open_store(location, EMBEDDER) as store:
        ingest(store, EMBEDDER, [docs])
        (docs / "a.txt").unlink()
        plain = ingest(store, EMBEDDER, [docs])
        assert plain.removed == [] and store.count()[0] == 3  # without --sync nothing is removed
        synced = ingest(store, EMBEDDER, [docs], sync=True)
        assert [s.rsplit("/", 1)[1] for s in synced.removed] == ["a.txt"] and store.count()[0] == 2
        removed = remove(store, [docs / "sub"])
        assert [s.rsplit("/", 1)[1] for s in removed] == ["b.md"] and store.count()[0] == 1


def test_bad_files_are_skipped_with_reasons_and_the_rest_goes_in(location, tmp_path):
    (tmp_path / "good.txt").write_text(PROSE)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.txt").write_bytes(b"\x00\xff" * 50)
    write_pdf(tmp_path / "locked.pdf", ["secret"], password="pw")
    with open_store(location, EMBEDDER) as store:
        report = ingest(store, EMBEDDER, [tmp_path], glob="*")
        reasons = dict((p.rsplit("/", 1)[1], r) for p, r in report.skipped)
        assert set(reasons) == {"empty.txt", "blob.txt", "locked.pdf"}
        assert "empty" in reasons["empty.txt"] and "binary" in reasons["blob.txt"] and "encrypted" in \
            reasons["locked.pdf"]
        assert [s.rsplit("/", 1)[1] for s in report.added] == ["good.txt"]


class FailingOnSecondFile(HashedBagOfWords):
    """The stand-in embedder that raises while embedding the second file (fault injection)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def embed(self, texts):
        if any("second" in t for t in texts):
            raise RuntimeError("embedding failed")
        return super().embed(texts)


def test_a_failure_midway_leaves_every_file_fully_in_or_out(location, tmp_path):
    (tmp_path / "1.txt").write_text("The first file. " * 30)
    (tmp_path / "2.txt").write_text("The second file. " * 30)
    with open_store(location, EMBEDDER) as store:
        with pytest.raises(RuntimeError, match="embedding failed"):
            ingest(store, FailingOnSecondFile(), [tmp_path], chunk_tokens=16, overlap=0)
        assert [s.rsplit("/", 1)[1] for s in store.sources()] == ["1.txt"]
        n_first = store.count()[1]
        report = ingest(store, EMBEDDER, [tmp_path], chunk_tokens=16, overlap=0)  # the rerun completes the job
        assert len(report.unchanged) == 1 and len(report.added) == 1 and store.count()[1] > n_first
