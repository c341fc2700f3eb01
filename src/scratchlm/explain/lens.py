"""The logit lens (nostalgebraist 2020): read the residual stream after each layer as if it were the last.

Each layer adds its update to the residual stream; passing the stream after layer l through the final norm and
the LM head, as the model does after its last layer, shows what the model "would predict" at that depth. Early
layers usually predict the input token itself or common words; the answer forms in the later layers. The last
row of the lens is the model's real prediction (the final norm and head applied to the last layer's output).
"""

from __future__ import annotations

import torch

from scratchlm.explain.attention import trace
from scratchlm.explain.labels import token_label


def layer_names(n_layers: int) -> list[str]:
    """"embed" (the stream before any block), then "1".."n_layers" (after each block)."""
    return ["embed"] + [str(i) for i in range(1, n_layers + 1)]


def logit_lens_from_trace(model, tokenizer, run, top_k: int = 3) -> list[dict]:
    """One dict per layer: ``layer`` (its name) and ``positions``, one per token, each with ``top`` (the lens's
    top-k ``id``/``token``/``prob``) and, but for the last token, ``next_prob`` and ``next_rank`` of the token
    that really came next. Computed a layer at a time: a full [layers, T, V] tensor would be large."""
    ids = run.ids
    nxt = torch.tensor(ids[1:], device=run.residuals.device)
    layers = []
    with torch.no_grad():
        for name, stream in zip(layer_names(len(run.residuals) - 1), run.residuals):
            probs = model.logits(model.final_norm(stream)).float().softmax(dim=-1)  # (T, V)
            top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
            p_next = probs[torch.arange(len(nxt)), nxt] if len(nxt) else probs[:0, 0]
            rank = (probs[: len(nxt)] > p_next[:, None]).sum(dim=-1) + 1
            positions = []
            for t in range(len(ids)):
                item = {"top": [{"id": int(i), "token": token_label(tokenizer, int(i)), "prob": float(p)}
                                for p, i in zip(top_p[t], top_i[t])]}
                if t < len(nxt):
                    item.update(next_prob=float(p_next[t]), next_rank=int(rank[t]))
                positions.append(item)
            layers.append({"layer": name, "positions": positions})
    return layers


def logit_lens(llm, text: str | list[int], top_k: int = 3) -> list[dict]:
    """The logit lens of ``llm`` over ``text`` (a string or token ids): see ``logit_lens_from_trace``."""
    ids = text if isinstance(text, list) else llm.tokenizer.encode(text, allowed_special="all")
    return logit_lens_from_trace(llm.model, llm.tokenizer, trace(llm.model, ids, attention=False), top_k)
