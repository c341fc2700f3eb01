"""The agent's ``search`` tool: the best passages of a RAG store (``scratchlm rag ingest``) for a query.

    with DocumentSearch.open("docs.db") as docs:     # the store's own embedding model is loaded
        docs.search("how do I rotate the keys?")     # "[1] guide.md (Keys): ...\n\n[2] ..."
        agent = Agent(llm, tools=[docs.tool()])

Hybrid search (dense + BM25, ``scratchlm.rag.search``); each passage is cut to ``max_chars`` so that a few of them
fit a small model's context.
"""

from __future__ import annotations

from scratchlm.errors import ConfigError
from scratchlm.function_schema import ToolError


class DocumentSearch:
    """Search over an open ``scratchlm.rag`` store with its embedder."""

    def __init__(self, store, embedder, k: int = 3, mode: str = "hybrid", max_chars: int = 600):
        self.store, self.embedder, self.k, self.mode, self.max_chars = store, embedder, k, mode, max_chars

    @classmethod
    def open(cls, location: str, embedder=None, **options) -> DocumentSearch:
        """The store at ``location`` (an SQLite file or a postgresql:// URL), with the embedding model that made it
        (loaded here unless ``embedder`` is given)."""
        from scratchlm.rag.store import open_store, stored_model

        recorded = stored_model(str(location))
        if recorded is None:
            raise ConfigError(f"no document store at {location}: make one with "
                              f"`scratchlm rag ingest {location} FILES...`, then pass it as --store")
        if embedder is None:
            from scratchlm.encoder import Encoder

            embedder = Encoder.load(recorded[0])
        return cls(open_store(str(location), embedder, create=False), embedder, **options)

    def search(self, query: str) -> str:
        """The best passages for ``query``, numbered, each with its source."""
        from scratchlm.rag.search import search

        if not isinstance(query, str) or not query.strip():
            raise ToolError("give the search a query: a few words about what to find")
        hits = search(self.store, self.embedder, query, k=self.k, mode=self.mode)
        if not hits:
            return "no passages found"
        out = []
        for i, hit in enumerate(hits, 1):
            text = " ".join(hit.text.split())
            if len(text) > self.max_chars:
                text = text[:self.max_chars] + " ..."
            heading = f" ({hit.heading})" if hit.heading else ""
            out.append(f"[{i}] {hit.citation()}{heading}: {text}")
        return "\n\n".join(out)

    def tool(self):
        """The ``search`` tool (one argument, ``query``).

        The query has no description on purpose: SmolLM2-135M copied the one it had ("what to look for") as its
        query, and the search then ranked the answering passage third; without one it wrote "ZX-4021" and "How to
        Restart a Wireless Router" for tasks about them, which rank it first (tests/test_agent_search.py)."""
        from scratchlm.tools import Tool

        schema = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
                  "additionalProperties": False}
        return Tool("search", "Search the user's documents; returns the best passages with their sources.",
                    schema, function=self.search)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> DocumentSearch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
