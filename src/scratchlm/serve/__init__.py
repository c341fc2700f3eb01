"""Serving: an OpenAI-compatible HTTP API with continuous batching, and a web chat page.

``create_app(llm_or_loader, ...)`` builds the FastAPI app (``app.py``); ``Engine`` (``engine.py``) is the
batching scheduler; ``scratchlm serve MODEL`` runs it on uvicorn (``cli.py``).
"""
