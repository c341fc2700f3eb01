"""Our allowed-token masks equal xgrammar's (the engine behind vLLM and SGLang's structured output) on the same
vocabulary and schema, at every step of seeded random walks through the grammar.

xgrammar is configured for our compact form: no free whitespace, separators "," and ":", strict mode (no
properties beyond the listed ones). Left out of the comparison, where the two differ on purpose: the ``email``
format (each has its own regular expression), and strings with minLength/maxLength, where xgrammar 0.2.9 lets raw
control characters (U+0000-U+001F) into the string, which RFC 8259 forbids, and refuses a token that starts an
escape right after the opening quote.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from conftest import byte_tokenizer
from scratchlm.structured import json_schema_constraint
from structured_helpers import FIXED, random_schemas

xgr = pytest.importorskip("xgrammar")
pytestmark = pytest.mark.usefixtures("one_thread")


def _unbounded_strings(schema):
    """The schema with minLength/maxLength dropped and no email format (see the module docstring)."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            node.pop("maxLength", None)
            node.pop("minLength", None)
            if node.get("format") == "email":
                del node["format"]
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
    visit(schema)
    return schema


SCHEMAS = [_unbounded_strings(s) for s in FIXED.values()] + [_unbounded_strings(s) for s in random_schemas(16, 1)]


class XGrammarReference:
    def __init__(self, tokenizer):
        special = set(tokenizer.special_tokens.values())
        vocab = [b"" if i in special else tokenizer.bytes_of(i) for i in range(tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                 stop_token_ids=[tokenizer.eos_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.size = tokenizer.vocab_size
        self.index = torch.arange(self.size)

    def matcher(self, schema):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(",", ":"), strict_mode=True)
        return xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, self.size)

    def mask(self, matcher, bitmask) -> torch.Tensor:
        matcher.fill_next_token_bitmask(bitmask)
        return ((bitmask[0][self.index // 32] >> (self.index % 32)) & 1).bool()


def _compare_walk(tokenizer, reference, schema, seed: int, steps: int) -> int:
    """Walk ``steps`` random allowed tokens; assert equal masks at each. Returns the number of tokens compared."""
    matcher, bitmask = reference.matcher(schema)
    ours = json_schema_constraint(schema).start(tokenizer, {tokenizer.eos_id})
    rng = random.Random(seed)
    text = b""
    for step in range(steps):
        theirs, mine = reference.mask(matcher, bitmask), ours.allowed()
        if not torch.equal(mine, theirs):
            differ = (mine != theirs).nonzero().flatten().tolist()[:5]
            pytest.fail(f"masks differ after {text!r} for {json.dumps(schema)[:200]}: "
                        f"{[(tokenizer.bytes_of(i), bool(mine[i])) for i in differ]}")
        allowed = mine.nonzero().flatten().tolist()
        short = [i for i in allowed if len(tokenizer.bytes_of(i)) <= 2]
        token = rng.choice(short if short and rng.random() < 0.5 else allowed)  # short tokens: walks that finish
        if token == tokenizer.eos_id:
            return step + 1
        text += tokenizer.bytes_of(token)
        ours.advance(token)
        assert matcher.accept_token(token)
    return steps


def test_masks_equal_xgrammar_on_byte_vocabulary():
    tokenizer = byte_tokenizer()
    reference = XGrammarReference(tokenizer)
    compared = sum(_compare_walk(tokenizer, reference, schema, seed, steps=60)
                   for schema in SCHEMAS for seed in range(2))
    assert compared > 500


def test_masks_equal_xgrammar_on_smollm2_vocabulary(smollm2):
    tokenizer = smollm2.tokenizer
    reference = XGrammarReference(tokenizer)
    compared = sum(_compare_walk(tokenizer, reference, schema, 0, steps=25) for schema in SCHEMAS[:6] + SCHEMAS[-4:])
    assert compared > 100


# ---- counted repetitions: maxLength/minLength run on a counter, not n copies ---------------------------------
BOUNDED = {"type": "object", "properties": {
    "long": {"type": "string", "maxLength": 200},
    "word": {"type": "string", "minLength": 20, "maxLength": 30},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 18, "maxItems": 20}},
    "required": ["long", "word", "tags"]}


def _clean(tokenizer) -> torch.Tensor:
    """Tokens without a control byte or a backslash: where xgrammar 0.2.9's bounded strings differ from RFC 8259
    (module docstring), so the comparison of bounded strings leaves them out."""
    return torch.tensor([tokenizer.bytes_of(i) != b"" and all(b >= 0x20 and b != 0x5C for b in tokenizer.bytes_of(i))
                         for i in range(tokenizer.vocab_size)])


def _compare_bounded_walk(tokenizer, reference, seed: int, steps: int) -> tuple[int, bytes]:
    """A random walk through BOUNDED, long tokens preferred and quotes avoided so that the strings reach their
    bounds; masks equal
    on the clean tokens at every step. Returns (steps compared, text)."""
    clean = _clean(tokenizer)
    # Nor does the walk pick a token with a UTF-8 lead byte whose next byte is restricted (E0, ED, F0, F4): after
    # ED, xgrammar 0.2.9's bounded strings accept A0-BF, the encoding of a UTF-16 surrogate, which UTF-8 forbids.
    plain = torch.tensor([not {0xE0, 0xED, 0xF0, 0xF4} & set(tokenizer.bytes_of(i))
                          for i in range(tokenizer.vocab_size)])
    matcher, bitmask = reference.matcher(BOUNDED)
    ours = json_schema_constraint(BOUNDED).start(tokenizer, {tokenizer.eos_id})
    rng, text = random.Random(seed), b""
    for step in range(steps):
        theirs, mine = reference.mask(matcher, bitmask), ours.allowed()
        if not torch.equal(mine & clean, theirs & clean):
            differ = ((mine != theirs) & clean).nonzero().flatten().tolist()[:5]
            pytest.fail(f"masks differ after {text!r}: {[(tokenizer.bytes_of(i), bool(mine[i])) for i in differ]}")
        allowed = (mine & clean & plain).nonzero().flatten().tolist() + ([tokenizer.eos_id] if mine[tokenizer.eos_id]
                                                                          else [])
        token = max(rng.sample(allowed, min(8, len(allowed))),  # no closing quote while another token fits
                    key=lambda i: (b'"' not in tokenizer.bytes_of(i), len(tokenizer.bytes_of(i))))
        if token == tokenizer.eos_id:
            return step + 1, text
        text += tokenizer.bytes_of(token)
        ours.advance(token)
        assert matcher.accept_token(token)
    return steps, text


def test_bounded_strings_compile_to_a_counter_and_mask_like_xgrammar_on_byte_vocabulary():
    constraint = json_schema_constraint({"type": "string", "maxLength": 200})
    assert len(constraint.automaton.edges) < 100  # one copy of a character and a counter, not 200 copies
    assert constraint.matches('"' + "é" * 200 + '"') and not constraint.matches('"' + "é" * 201 + '"')
    tokenizer = byte_tokenizer()
    reference = XGrammarReference(tokenizer)
    for seed in range(2):
        compared, text = _compare_bounded_walk(tokenizer, reference, seed, steps=1500)
        value = json.loads(text)  # the walk reached the end: every bound was met on the way
        assert compared > 250 and len(value["long"]) == 200 and len(value["tags"]) >= 18


def test_bounded_strings_mask_like_xgrammar_on_smollm2_vocabulary(smollm2):
    tokenizer = smollm2.tokenizer
    reference = XGrammarReference(tokenizer)
    compared, text = _compare_bounded_walk(tokenizer, reference, 0, steps=120)
    assert compared > 40 and len(text.split(b'"')[3].decode()) == 200  # the counter's last positions compared too
