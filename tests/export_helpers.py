"""Small models for the export tests: random weights and a byte-level BPE tokenizer that has merges.

The conftest byte tokenizer has no merges, which GGUF cannot store (llama.cpp needs the merges list), so
these tests build a tokenizer with a handful of real merges and a vocabulary with holes (the model's
embedding is larger than the tokenizer, as with padded vocabularies).
"""

from __future__ import annotations

import functools

import torch

from conftest import SPECIALS, tiny_config
from scratchlm.llm import LLM
from scratchlm.model import Transformer
from scratchlm.tokenizer import BYTE_TO_UNICODE, Tokenizer

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "w"),
          ("r", "e"), ("Ġ", "s"), ("1", "2"), ("Ġa", "n")]
VOCAB_SIZE = 256 + len(MERGES) + len(SPECIALS) + 5  # five unused ids at the end
TEXT = "Hello the world, then another: 12345 in water\n\n  spaces\tand ünïcödé ✓ <|im_end|> done"


def merged_tokenizer(pretokenizer: str = "gpt2") -> Tokenizer:
    """256 byte tokens, ``MERGES``, then the ChatML special tokens; BOS <|im_start|>, EOS <|im_end|>."""
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    specials = {t: len(vocab) + i for i, t in enumerate(SPECIALS)}
    return Tokenizer(vocab, MERGES, specials, pretokenizer=pretokenizer, bos_token="<|im_start|>",
                     eos_token="<|im_end|>")


def export_llm(kind: str = "llama", pretokenizer: str = "gpt2", seed: int = 0, **changes) -> LLM:
    """A random tiny model (``tiny_config(kind)``) with ``merged_tokenizer``; biases are random, not zero."""
    torch.manual_seed(seed)
    config = tiny_config(kind, vocab_size=VOCAB_SIZE, **changes)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # so that a dropped or misplaced norm/bias shows
    return LLM(model, merged_tokenizer(pretokenizer), name=config.name)


def logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(torch.tensor([ids]))[0]


@functools.cache
def trained_from_scratch(steps: int = 30) -> LLM:
    """A GPT-2-style model trained here on the bundled Shakespeare with its own BPE (scratchlm.train.bpe).

    nanoGPT's layout (learned positions, LayerNorm, GELU, no biases, tied head) at a tiny size; a few dozen
    AdamW steps move it well away from its random start. Skips the test while the BPE trainer is missing.
    Built once per test session (tests must not modify it).
    """
    import pytest

    train_bpe = pytest.importorskip("scratchlm.train.bpe").train_bpe
    from importlib.resources import files

    from scratchlm.train.loop import TrainConfig, train

    text = (files("scratchlm") / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:60_000]
    tokenizer = train_bpe([text], 400, ["<|endoftext|>"])
    tokenizer.eos_token = "<|endoftext|>"
    ids = torch.tensor(tokenizer.encode(text))
    torch.manual_seed(0)
    config = tiny_config("gpt2", vocab_size=tokenizer.vocab_size, context_length=64, bias=False)
    model = Transformer(config)

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
            window = torch.stack([ids[s:s + 65] for s in starts])
            yield window[:, :-1], window[:, 1:]

    train(model, TrainConfig(max_steps=steps, batch_size=8, warmup_steps=5, eval_interval=10**6), batches())
    return LLM(model.eval(), tokenizer, name="shakespeare-tiny")
