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

from scratchlm.explain.attention import Trace, attention_weights, trace
from scratchlm.explain.labels import token_label
from scratchlm.explain.lens import logit_lens
from scratchlm.explain.views import Explanation, explain

__all__ = ["Explanation", "Trace", "attention_weights", "explain", "logit_lens", "token_label", "trace"]
