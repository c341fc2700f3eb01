"""Evaluation: perplexity (``perplexity.py``) and, beside it, task metrics; ``cli.py`` is ``scratchlm eval``."""
