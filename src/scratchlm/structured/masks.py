"""Which tokens may come next: the vocabulary as a byte trie, walked with the automaton, with masks cached.

A token is allowed when all its bytes keep the output a prefix of the grammar. Checking the ~49k tokens of
SmolLM2 one by one costs about as much as a decode step in Python, so:

- the tokens are a trie of their bytes: a shared prefix is read once, and a dead prefix prunes its subtree
  (outlines' index and xgrammar walk the vocabulary the same way);
- most tokens' fate depends only on the top of the stack (xgrammar's context-independent tokens, Dong et al.
  2024, sec. 3.2): for each reading NFA state ``q`` the trie is walked once from ``q`` alone; a token that stays
  inside ``q``'s rule is accepted or rejected for good, and only the few that end the rule and read on (``",``
  after a string) are "uncertain" and checked against the real stack; these per-top results are shared by every
  constraint whose automaton looks the same from that top (``Automaton.signature``): a JSON string's contents
  are walked once per vocabulary, not once per schema;
- the walks that visit much of the vocabulary (a JSON string's characters, a pattern's ``.*``) are done when the
  constraint first meets a tokenizer, so that no decoding step pays tens of milliseconds for one; the others
  are cheap because a walk reads only the trie children whose byte the state can read next;
- the final mask of each matcher state is cached, so a state seen before costs one dictionary look-up; states
  that differ only in counts beyond what one token can read share their mask (``Automaton.canonical``).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from scratchlm.structured.automaton import DEAD, Automaton, top_of

FULL_WALK_ABOVE = 4096  # uncertain tokens beyond which one trie walk is cheaper than checking each
SHARED_TOPS = 256  # per-top masks shared across constraints by signature (49k bools each: 12 MB in all)
BROAD_TOKENS = 4096  # a top whose first bytes start this many tokens is walked up front, and shared by signature
WIDE_NODE = 16  # trie nodes with more children than this also get a byte -> child dictionary


@dataclass(eq=False)  # hashed by identity: a key of the shared caches
class VocabularyTrie:
    """The byte strings of a tokenizer's ordinary tokens (special tokens excluded) as a trie.

    Tokens are inserted in sorted byte order, so the tokens below a node are ``order[lo[n]:hi[n]]``.
    """

    children: list[list[tuple[int, int]]]  # node -> [(byte, child)]
    ends: list[list[int]]  # node -> token ids whose bytes end here
    lo: list[int]
    hi: list[int]
    order: list[int]  # token ids in sorted byte order
    token_bytes: dict[int, bytes]
    size: int  # mask length: the tokenizer's vocabulary size
    depth: int  # the longest token, in bytes
    wide: dict[int, dict[int, int]]  # node with many children -> {byte: child}
    starting: list[int]  # byte -> how many tokens start with it


_TRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Per vocabulary trie: stack-top signature -> (accepted mask, uncertain tokens), shared by every constraint.
_SHARED_TOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocabulary_trie(tokenizer) -> VocabularyTrie:
    """The trie of ``tokenizer``'s tokens, built once per tokenizer (about half a second for 49k tokens)."""
    trie = _TRIES.get(tokenizer)
    if trie is not None:
        return trie
    special = set(tokenizer.special_tokens.values())
    token_bytes = {i: tokenizer.bytes_of(i) for i in range(tokenizer.vocab_size) if i not in special}
    token_bytes = {i: b for i, b in token_bytes.items() if b}
    order = sorted(token_bytes, key=token_bytes.__getitem__)
    # Sorted insertion: a token shares its path with the previous one up to their common prefix, so only the
    # nodes past it are new (no per-byte dictionary look-ups).
    children: list[list[tuple[int, int]]] = [[]]
    ends: list[list[int]] = [[]]
    lo, hi = [0], [len(order)]
    path = [0]  # path[d]: the node after d bytes of the previous token
    previous = b""
    for rank, tid in enumerate(order):
        data = token_bytes[tid]
        common = 0
        for a, b in zip(previous, data):
            if a != b:
                break
            common += 1
        del path[common + 1:]
        for d in range(1, common + 1):
            hi[path[d]] = rank + 1
        node = path[common]
        for b in data[common:]:
            child = len(children)
            children[node].append((b, child))
            children.append([])
            ends.append([])
            lo.append(rank)
            hi.append(rank + 1)
            path.append(child)
            node = child
        ends[node].append(tid)
        previous = data
    wide = {node: dict(kids) for node, kids in enumerate(children) if len(kids) > WIDE_NODE}
    starting = [0] * 256
    for b, child in children[0]:
        starting[b] = hi[child] - lo[child]
    trie = VocabularyTrie(children, ends, lo, hi, order, token_bytes, tokenizer.vocab_size,
                          max(map(len, token_bytes.values()), default=0), wide, starting)
    _TRIES[tokenizer] = trie
    return trie


def walk(automaton: Automaton, trie: VocabularyTrie, sid: int, relative: bool) -> tuple[list[int], list[int]]:
    """Tokens accepted from state ``sid``, and (``relative``: ``sid`` is one stack top alone) the tokens whose
    acceptance depends on the stack below because they read on after the top rule ended."""
    accepted: list[int] = []
    uncertain: list[int] = []
    steps, step, states, first_bytes = automaton._steps, automaton.step, automaton.states, automaton.first_bytes
    children, ends, lo, hi, order, wide = trie.children, trie.ends, trie.lo, trie.hi, trie.order, trie.wide
    todo = [(0, sid, False)]
    while todo:
        node, state, popped = todo.pop()
        base = state * 256
        kids = children[node]
        if not popped and node in wide:  # read only the children whose byte can come next (a literal: one)
            readable = first_bytes(state)
            if len(readable) * 4 < len(kids):
                by_byte = wide[node]
                kids = [(b, by_byte[b]) for b in readable if b in by_byte]
        for b, child in kids:
            nxt = steps.get(base + b)
            if nxt is None:
                nxt = step(state, b)
            if nxt == DEAD:
                if popped:
                    uncertain.extend(order[lo[child]:hi[child]])
                continue
            if ends[child]:
                accepted.extend(ends[child])
            if children[child]:
                todo.append((child, nxt, popped or (relative and states[nxt][1])))
    return accepted, uncertain


class TokenMasks:
    """Allowed-token masks of one automaton over one vocabulary, cached per stack top and per state."""

    def __init__(self, automaton: Automaton, tokenizer, eos_ids: set[int]):
        self.automaton = automaton
        self.trie = vocabulary_trie(tokenizer)
        self.eos_ids = sorted(i for i in eos_ids if i < self.trie.size)
        self.cap = self.trie.depth + 1  # counts clamped here: no token reads further (Automaton.canonical)
        self._by_top: dict[tuple, tuple[torch.Tensor, list[int]]] = {}
        self._by_state: dict[int, torch.Tensor] = {}
        self._forbidden: dict[int, torch.Tensor] = {}
        self._canonical: dict[int, int] = {}
        self.precompute()

    def precompute(self) -> None:
        """Walk the broad stack tops now, once per constraint and tokenizer, rather than at the decoding step
        that first meets them: every reading NFA state outside counted items, and the steady state of each
        counted item (enough items done, room beyond one token). Narrow tops are left for their first visit:
        reading only the trie children their bytes allow, each costs well under a millisecond."""
        a = self.automaton
        inside = set()
        for _, _, item, exit_ in a.loops:  # an item's states run from its start to just before its exit
            inside.update(range(item, exit_))
        for q in range(len(a.edges)):
            if a.edges[q] and q not in inside and self._broad((q,)):
                self._top((q,))
        for loop, (_, hi, item, _) in enumerate(a.loops):
            frame = a.frame(loop, 0, None if hi is None else min(hi, self.cap))
            for pushed, q in a._closure(item)[0]:
                if not pushed and self._broad((frame, q)):
                    self._top((frame, q))

    def _broad(self, top: tuple) -> bool:
        """Whether more than BROAD_TOKENS tokens start with a byte ``top`` can read (its walk visits much of the
        trie)."""
        first = self.automaton.first_bytes(self.automaton.relative_state(top))
        return sum(self.trie.starting[b] for b in first) > BROAD_TOKENS

    def canonical(self, sid: int) -> int:
        """The state whose mask ``sid`` shares (itself, unless it holds counts beyond ``cap``)."""
        hit = self._canonical.get(sid)
        if hit is None:
            hit = self._canonical[sid] = self.automaton.canonical(sid, self.cap)
        return hit

    def forbidden(self, sid: int) -> torch.Tensor:
        """The negation of ``mask(sid)``, cached too: applying it is then one masked_fill per token."""
        sid = self.canonical(sid)
        hit = self._forbidden.get(sid)
        if hit is None:
            hit = self._forbidden[sid] = ~self.mask(sid)
        return hit

    def _top(self, top: tuple) -> tuple[torch.Tensor, list[int]]:
        hit = self._by_top.get(top)
        if hit is None:
            # Only broad walks are worth sharing across constraints (and the signature costs a walk of the NFA).
            signature = self.automaton.signature(top[0]) if len(top) == 1 and self._broad(top) else None
            shared = _SHARED_TOPS.setdefault(self.trie, OrderedDict())
            hit = shared.get(signature) if signature is not None else None
            if hit is None:
                accepted, uncertain = walk(self.automaton, self.trie, self.automaton.relative_state(top),
                                           relative=True)
                mask = torch.zeros(self.trie.size, dtype=torch.bool)
                mask[accepted] = True
                hit = (mask, uncertain)
                if signature is not None:
                    shared[signature] = hit
                    if len(shared) > SHARED_TOPS:
                        shared.popitem(last=False)
            else:
                shared.move_to_end(signature)
            self._by_top[top] = hit
        return hit

    def mask(self, sid: int) -> torch.Tensor:
        """Bool [vocabulary size]: the tokens allowed in state ``sid`` (EOS only where the match is complete)."""
        hit = self._by_state.get(sid)
        if hit is not None:
            return hit
        canonical = self.canonical(sid)
        if canonical != sid:
            hit = self._by_state[sid] = self.mask(canonical)
            return hit
        automaton, trie = self.automaton, self.trie
        stacks, complete = automaton.states[sid] if sid != DEAD else (frozenset(), False)
        mask = torch.zeros(trie.size, dtype=torch.bool)
        uncertain: set[int] = set()
        for top in {top_of(stack) for stack in stacks}:
            top_mask, top_uncertain = self._top(top)
            mask |= top_mask
            uncertain.update(top_uncertain)
        if len(uncertain) > FULL_WALK_ABOVE:  # a tiny top rule: most tokens read past it; walk the whole stack
            accepted, _ = walk(automaton, trie, sid, relative=False)
            mask[accepted] = True
        else:
            extra = [t for t in uncertain if not mask[t] and automaton.advance(sid, trie.token_bytes[t]) != DEAD]
            mask[extra] = True
        if complete:
            mask[self.eos_ids] = True
        self._by_state[sid] = mask
        return mask


class TokenConstraint:
    """One sequence's position in a constraint: which tokens may come next, and the step after each token."""

    def __init__(self, masks: TokenMasks):
        self.masks = masks
        self.automaton = masks.automaton
        self.state = self.automaton.initial

    def allowed(self) -> torch.Tensor:
        return self.masks.mask(self.state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [V] with every token the constraint forbids at -inf. When nothing but EOS may follow and
        the model has no EOS token, the sequence ends through ``finished`` instead."""
        forbidden = self.masks.forbidden(self.state)
        if logits.shape[-1] != forbidden.shape[0]:  # embedding rows beyond the tokenizer (padding): never allowed
            full = torch.ones(logits.shape[-1], dtype=torch.bool)
            n = min(forbidden.shape[0], logits.shape[-1])
            full[:n] = forbidden[:n]
            forbidden = full
        return logits.masked_fill(forbidden.to(logits.device), -math.inf)

    def advance(self, token_id: int) -> None:
        if token_id in self.masks.eos_ids:
            return
        self.state = self.automaton.advance(self.state, self.masks.trie.token_bytes.get(token_id, b"\xff"))

    @property
    def complete(self) -> bool:
        return self.automaton.is_complete(self.state)

    @property
    def finished(self) -> bool:
        """The match is complete and no byte can follow: the sequence must end now."""
        return not self.automaton.can_continue(self.state)
