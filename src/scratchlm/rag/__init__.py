"""Retrieval-augmented generation over a folder of documents, offline.

    from scratchlm.encoder import Encoder
    from scratchlm.rag import open_store, ingest, search, ask

    encoder = Encoder.load("all-minilm-l6-v2")
    with open_store("docs.db", encoder) as store:          # or "postgresql://user@host/db"
        ingest(store, encoder, ["docs/"])                  # idempotent: unchanged files are skipped
        for hit in search(store, encoder, "how do I rotate the keys?", k=5):
            print(hit.citation(), hit.score)

Modules, one concept each: ``documents`` (readers), ``chunking``, ``store`` (the interface and schema),
``sqlite_store`` and ``postgres_store`` (the two engines), ``ingest``, ``search`` (dense, keyword, hybrid,
rerank), ``answer`` (cited answers), ``summarize`` (map-reduce and refine). The command line is
``scratchlm/rag_cli.py``, outside the package: these imports load torch, and `scratchlm --help` must not.
"""

from scratchlm.rag.answer import Answer, ask
from scratchlm.rag.ingest import IngestReport, ingest, remove
from scratchlm.rag.search import Hit, search
from scratchlm.rag.store import Store, open_store
from scratchlm.rag.summarize import summarize

__all__ = ["Answer", "Hit", "IngestReport", "Store", "ask", "ingest", "open_store", "remove", "search", "summarize"]
