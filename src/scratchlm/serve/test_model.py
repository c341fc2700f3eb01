"""``scratchlm serve test-model``: a stand-in model for developers of clients, front ends and LangChain apps.

It loads no file and starts at once, and every request gets the same reply, so a client's tests can assert on it:

    REPLY = "Hello! This is the scratchlm test model: a tiny stand-in that always gives this reply."

Every route works as with a real model (chat, completions, streaming, logprobs, embeddings, n, stop, max_tokens,
seeds, LoRA-free multi-request batching), because it *is* a real ``Transformer``: two random layers, built so that
they barely matter, around an output head that makes it a bigram model. Token embeddings are one-hot, so the
final hidden state of a position is (almost exactly) its own token's axis; row ``next(t)`` of the output head
points along token t's axis with a logit margin of ``MARGIN``. The reply's tokens are all distinct, each one's
successor is the next reply token (the last one's is ``<|im_end|>``), and every other token's successor is the
first reply token. So a chat turn, which ends with ``<|im_start|>assistant\\n``, is answered with REPLY, greedy or
sampled (the runner-up is at least 60 nats behind), and a completion of ``"Hello! This"`` goes on from there.
One more embedding axis is the same for every token and carries a small fixed preference (``FALLBACK``) for the
tokens that close JSON, which decides wherever a grammar forbids the successor: a tool call (``tools``) comes out
as ``{"city": REPLY}``-like arguments, closed. Embeddings are the mean of the hidden states: a bag of tokens plus
that shared axis, deterministic, and similar for similar texts.
"""

from __future__ import annotations

import math

import torch

from scratchlm.bpe_pretokenize import pretokenize
from scratchlm.config import ModelConfig
from scratchlm.llm import LLM
from scratchlm.model import Transformer
from scratchlm.tokenizer import BYTE_TO_UNICODE, Tokenizer

TEST_MODEL = "test-model"
REPLY = "Hello! This is the scratchlm test model: a tiny stand-in that always gives this reply."
MARGIN = 100.0  # logit of a token's successor over every other token
# Where a grammar forbids the successor (a tool call's JSON, response_format), the best of these wins, in this order:
# a string closes, then objects, then arrays, then the reply ends. So a string argument is REPLY, and the call closes.
FALLBACK = {'"': 40.0, "}": 30.0, "]": 20.0, "<|im_end|>": 10.0}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def test_tokenizer() -> Tokenizer:
    """Byte-level BPE: the 256 bytes, merges that make each word of REPLY one token, and ChatML's special tokens."""
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    merges = []
    for piece in pretokenize(REPLY, "gpt2"):
        chars = [BYTE_TO_UNICODE[b] for b in piece.encode("utf-8")]
        left = chars[0]
        for char in chars[1:]:  # left to right: " tiny" = ((("Ġ" + "t") + "i") + "n") + "y"
            if left + char not in vocab:
                vocab[left + char] = len(vocab)
                merges.append((left, char))
            left += char
    specials = {token: len(vocab) + i for i, token in enumerate(SPECIALS)}
    return Tokenizer(vocab, merges, specials, pretokenizer="gpt2", eos_token="<|im_end|>")


def build_test_model(context_length: int = 1024) -> LLM:
    """The test model (see the module docstring): deterministic, built in milliseconds."""
    tokenizer = test_tokenizer()
    vocab = tokenizer.vocab_size
    d_model = -(-(vocab + 1) // 64) * 64  # one axis per token, and a shared one
    config = ModelConfig(vocab_size=vocab, context_length=context_length, d_model=d_model, n_layers=2, n_heads=4,
                         n_kv_heads=2, d_ff=128, positions="rope", norm="rmsnorm", mlp="swiglu",
                         tie_embeddings=False, rope_theta=10000.0, name=TEST_MODEL)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    reply = tokenizer.encode(REPLY)
    assert len(set(reply)) == len(reply), "every reply token must be distinct: each has one successor"
    successor = dict.fromkeys(range(vocab), reply[0])
    successor.update(zip(reply, reply[1:] + [tokenizer.eos_id]))
    shared = vocab  # the axis every token's embedding also points along
    with torch.no_grad():
        embeddings = torch.eye(vocab, d_model)
        embeddings[:, shared] = 1.0
        model.tok_embeddings.weight.copy_(embeddings)
        for block in model.blocks:  # the layers' updates to the residual stream: about 1e-4 of it
            block.attn.o_proj.weight.mul_(1e-3)
            block.mlp.down_proj.weight.mul_(1e-3)
        # The final RMSNorm turns e_t + e_shared into sqrt(d_model / 2) (e_t + e_shared): scale the head back.
        scale = math.sqrt(d_model / 2)
        head = torch.zeros(vocab, d_model)
        for token, nxt in successor.items():
            head[nxt, token] = MARGIN / scale
        for text, logit in FALLBACK.items():
            head[tokenizer.encode(text)[0], shared] = logit / scale
        model.lm_head.weight.copy_(head)
    return LLM(model, tokenizer, name=TEST_MODEL)
