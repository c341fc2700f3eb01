"""The next-token view: at every position, what the model expected next and how the actual next token fared.

For position i (having read tokens 0..i) the model gives a distribution p over the vocabulary for token i+1:

    top        the K most likely next tokens with their probabilities
    entropy    H(p) = -sum p log2 p, in bits: how undecided the model is (0 = certain, log2 V = uniform)
    next       the token that really came next: its probability, its rank (1 = the model's first choice)
               and its surprisal -log2 p(next), in bits (Shannon 1948; the per-token term of the loss, in bits)

``explain`` runs one traced forward pass (``attention.trace``) and gathers this view, the attention weights
and the logit lens (``lens.py``) into one ``Explanation``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from scratchlm.errors import ConfigError
from scratchlm.explain.attention import trace
from scratchlm.explain.labels import token_label
from scratchlm.explain.lens import logit_lens_from_trace


def entry(tokenizer, token_id: int, prob: float) -> dict:
    return {"id": token_id, "token": token_label(tokenizer, token_id), "prob": prob}


def next_token_positions(tokenizer, ids: list[int], logits: torch.Tensor, top_k: int = 5) -> list[dict]:
    """One dict per input token (see the module docstring) from the logits [T, V] of a forward pass over ids."""
    if top_k < 1:
        raise ConfigError(f"top-k must be at least 1, got {top_k}")
    logprobs = logits.float().log_softmax(dim=-1)
    probs = logprobs.exp()
    entropy = -(probs * logprobs).nan_to_num().sum(dim=-1) / math.log(2)  # bits; 0 * log 0 counts as 0
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    positions = []
    for i, token_id in enumerate(ids):
        item = {"index": i, "id": token_id, "token": token_label(tokenizer, token_id),
                "top": [entry(tokenizer, int(t), float(p)) for p, t in zip(top_p[i], top_i[i])],
                "entropy": float(entropy[i]), "next": None}
        if i + 1 < len(ids):
            nxt = ids[i + 1]
            p = float(probs[i, nxt])
            item["next"] = {**entry(tokenizer, nxt, p), "rank": int((probs[i] > probs[i, nxt]).sum()) + 1,
                            "surprisal": -float(logprobs[i, nxt]) / math.log(2)}
        positions.append(item)
    return positions


@dataclass
class Explanation:
    """Everything ``explain`` saw. ``positions``: the next-token view (one dict per token); ``attention``
    [layers, heads, T, T] or None; ``lens``: per layer, per position, the top tokens of the logit lens, or None;
    ``prompt_tokens``: how many of the tokens were the input (the rest a generated chat reply)."""

    model: str
    ids: list[int]
    tokens: list[str]
    positions: list[dict]
    attention: torch.Tensor | None = None
    lens: list[dict] | None = None
    prompt_tokens: int = 0
    text: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self, attention: bool = False) -> dict:
        """A JSON-ready dict: model, text, ids, tokens, positions, lens; the attention weights only when asked
        (they are layers x heads x T x T numbers)."""
        data = {"model": self.model, "text": self.text, "ids": self.ids, "tokens": self.tokens,
                "prompt_tokens": self.prompt_tokens, "positions": self.positions, "lens": self.lens}
        if attention and self.attention is not None:
            data["attention"] = [[[[round(w, 5) for w in row] for row in head] for head in layer]
                                 for layer in self.attention.tolist()]
        return data

    @property
    def mean_surprisal(self) -> float:
        """Mean surprisal of the actual next tokens, in bits (log2 of the perplexity)."""
        values = [p["next"]["surprisal"] for p in self.positions if p["next"] is not None]
        return sum(values) / len(values) if values else float("nan")


def chat_ids(llm, messages: str | list[dict], reply_tokens: int = 40) -> tuple[list[int], int]:
    """The ids of a conversation rendered with the chat template and the model's greedy reply to it (at most
    ``reply_tokens``), and how many ids the prompt has."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = llm.encode_chat(messages)
    if reply_tokens <= 0:
        return prompt, len(prompt)
    completion = llm.complete(prompt, max_new_tokens=reply_tokens, temperature=0.0)
    return prompt + list(completion.token_ids), len(prompt)


def explain(llm, text: str | list, top_k: int = 5, chat: bool = False, reply_tokens: int = 40,
            attention: bool = True, lens: bool = True) -> Explanation:
    """The next-token view, attention weights and logit lens of ``llm`` (an ``LLM``) over ``text``.

    ``text`` is a string (encoded with special tokens allowed) or token ids; with ``chat=True`` a user message
    (or a list of messages) rendered with the chat template, followed by the model's greedy reply of at most
    ``reply_tokens`` tokens, so that the views show why each reply token was chosen.
    """
    if not llm.config.causal:
        raise ConfigError(f"{llm.name} is an encoder: explain's views are of next-token prediction, which needs "
                          "a decoder (a causal language model)")
    if chat:
        ids, prompt_tokens = chat_ids(llm, text, reply_tokens)
    elif isinstance(text, str):
        ids = llm.tokenizer.encode(text, allowed_special="all")
        prompt_tokens = len(ids)
    elif isinstance(text, list) and all(isinstance(t, int) for t in text):
        ids, prompt_tokens = list(text), len(text)
    else:
        raise ConfigError("explain takes a text, a list of token ids, or (with chat=True) chat messages")
    run = trace(llm.model, ids, attention=attention)
    return Explanation(
        model=llm.name, ids=ids, tokens=[token_label(llm.tokenizer, t) for t in ids],
        positions=next_token_positions(llm.tokenizer, ids, run.logits, top_k),
        attention=run.attention.cpu() if run.attention is not None else None,
        lens=logit_lens_from_trace(llm.model, llm.tokenizer, run, top_k=min(top_k, 3)) if lens else None,
        prompt_tokens=prompt_tokens, text=llm.tokenizer.decode(ids),
    )
