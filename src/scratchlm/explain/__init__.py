"""Views into a running model, for learning how it works (docs/explain.md).

    from scratchlm.explain import explain, attention_weights, logit_lens
    view = explain(llm, "The capital of France is Paris")
    view.positions[5]["top"]            # the top-k next tokens after "is", with probabilities
    attention_weights(llm, "...")       # [layers, heads, T, T], as HF's output_attentions=True

Modules, in reading order: ``attention.py`` (one traced forward pass: attention weights and the residual
stream), ``views.py`` (the next-token view and ``explain``), ``lens.py`` (the logit lens), ``labels.py``
(readable token labels), ``render.py`` (the terminal), ``plots.py`` (PNG heat maps), ``html.py`` (the
browsable page), ``cli.py`` (``scratchlm explain``).
"""

from scratchlm.lazy import lazy_exports

# Loaded on first use (PEP 562), so that `scratchlm --help`, which imports explain/cli.py, does not import torch.
_EXPORTS = {"Trace": "attention", "attention_weights": "attention", "trace": "attention", "token_label": "labels",
            "logit_lens": "lens", "Explanation": "views", "explain": "views"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
