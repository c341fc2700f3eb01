"""A pushdown automaton over bytes that recognises prefixes of a grammar, one byte at a time.

Each rule becomes a small NFA (Thompson's construction) whose edges read a byte range, do nothing (epsilon) or
call another rule; calling pushes the state to return to. A matcher state is the set of stacks that are still
alive: (return states..., current state), the current state always one that reads a byte. A set of stacks, not
one, because the grammar may be ambiguous for a while (``"a" | "ab"``); recursion (nested JSON) just grows the
stacks. This is the recursive transition network of Woods (1970), run breadth-first like a GLR parser without
sharing. States are interned as integers, and the step ``(state, byte) -> state`` is memoised, so that walking the
token trie (``masks.py``) mostly costs dictionary look-ups.
"""

from __future__ import annotations

import time

from scratchlm.structured.grammar import Alt, Bytes, ByteSet, Grammar, GrammarError, Ref, Repeat, Seq

DEAD = -1
MAX_NFA_STATES = 200_000  # a size limit on compiled constraints (bounded repeats unroll)
COMPILE_SECONDS = 10.0  # a time limit on compiling one constraint


class Automaton:
    """The compiled grammar: NFA states, and the interned matcher states reached so far."""

    def __init__(self, grammar: Grammar, max_states: int = MAX_NFA_STATES, time_limit: float = COMPILE_SECONDS):
        grammar.check()
        self._deadline = time.monotonic() + time_limit
        self._max_states = max_states
        self.edges: list[list[tuple[int, int, int]]] = []  # byte edges (lo, hi, target)
        self.eps: list[list[int]] = []
        self.calls: list[list[tuple[str, int]]] = []  # (rule, state to return to)
        self.final: list[bool] = []  # the end state of its rule
        self.start: dict[str, int] = {}
        for name in grammar.rules:
            self.start[name] = self._new()
        for name, expr in grammar.rules.items():
            end = self._build(expr, self.start[name])
            self.final[end] = True
        self._closures: dict[int, tuple[tuple, bool]] = {}
        self._bytemaps: dict[int, dict[int, tuple[int, ...]]] = {}
        # Interned matcher states: id -> (frozenset of stacks, complete); complete = the root rule may end here.
        self.states: list[tuple[frozenset, bool]] = []
        self._ids: dict[tuple[frozenset, bool], int] = {}
        self._steps: dict[int, int] = {}
        stacks, complete = self._expand((self.start[grammar.root],))
        self.initial = self._intern(frozenset(stacks), complete)

    # ---- construction --------------------------------------------------------------------------------
    def _new(self) -> int:
        if len(self.edges) >= self._max_states:
            raise GrammarError(f"the constraint is too large (over {self._max_states} automaton states): "
                               "lower maxLength/maxItems or simplify it")
        if len(self.edges) % 1024 == 0 and time.monotonic() > self._deadline:
            raise GrammarError("compiling the constraint took too long: simplify it")
        self.edges.append([])
        self.eps.append([])
        self.calls.append([])
        self.final.append(False)
        return len(self.edges) - 1

    def _build(self, expr, s: int) -> int:
        """Add ``expr`` starting at state ``s``; returns its end state."""
        if isinstance(expr, Bytes):
            for b in expr.data:
                t = self._new()
                self.edges[s].append((b, b, t))
                s = t
            return s
        if isinstance(expr, ByteSet):
            t = self._new()
            self.edges[s].extend((lo, hi, t) for lo, hi in expr.ranges)
            return t
        if isinstance(expr, Ref):
            t = self._new()
            self.calls[s].append((expr.name, t))
            return t
        if isinstance(expr, Seq):
            for item in expr.items:
                s = self._build(item, s)
            return s
        if isinstance(expr, Alt):
            end = self._new()
            for item in expr.items:
                a = self._new()
                self.eps[s].append(a)
                self.eps[self._build(item, a)].append(end)
            return end
        if isinstance(expr, Repeat):
            for _ in range(expr.min):
                s = self._build(expr.item, s)
            if expr.max is None:  # s -> item -> s, and out
                a = self._new()
                self.eps[s].append(a)
                self.eps[self._build(expr.item, a)].append(s)
                end = self._new()
                self.eps[s].append(end)
                return end
            end = self._new()
            for _ in range(expr.max - expr.min):
                self.eps[s].append(end)
                s = self._build(expr.item, s)
            self.eps[s].append(end)
            return end
        raise TypeError(f"not a grammar expression: {expr!r}")

    # ---- running ---------------------------------------------------------------------------------------
    def _closure(self, s: int) -> tuple[tuple, bool]:
        """From NFA state ``s`` without reading: ((pushed returns, reading state), ...) and whether the rule
        of ``s`` can end (pop). Memoised per state."""
        hit = self._closures.get(s)
        if hit is not None:
            return hit
        out, finishes, seen = set(), False, set()
        todo = [((), s)]
        limit = len(self.start) + 1
        while todo:
            item = todo.pop()
            if item in seen:
                continue
            seen.add(item)
            pushed, q = item
            if len(pushed) > limit:
                raise GrammarError("the grammar is left-recursive (a rule can call itself before reading a byte): "
                                   "rewrite it with repetition")
            if self.edges[q]:
                out.add(item)
            for t in self.eps[q]:
                todo.append((pushed, t))
            for rule, ret in self.calls[q]:
                todo.append((pushed + (ret,), self.start[rule]))
            if self.final[q]:
                if pushed:
                    todo.append((pushed[:-1], pushed[-1]))
                else:
                    finishes = True
        result = (tuple(out), finishes)
        self._closures[s] = result
        return result

    def _expand(self, stack: tuple) -> tuple[set, bool]:
        """The reading stacks reachable from ``stack`` (top = an NFA state) without reading, and whether all
        rules can end (the match is complete)."""
        base = stack[:-1]
        pushes, finishes = self._closure(stack[-1])
        out = {base + pushed + (q,) for pushed, q in pushes}
        complete = False
        if finishes:
            if base:
                more, complete = self._expand(base)
                out |= more
            else:
                complete = True
        return out, complete

    def _intern(self, stacks: frozenset, complete: bool) -> int:
        if not stacks and not complete:
            return DEAD
        key = (stacks, complete)
        sid = self._ids.get(key)
        if sid is None:
            sid = self._ids[key] = len(self.states)
            self.states.append(key)
        return sid

    def _bytemap(self, q: int) -> dict[int, tuple[int, ...]]:
        m = self._bytemaps.get(q)
        if m is None:
            targets: dict[int, list[int]] = {}
            for lo, hi, t in self.edges[q]:
                for b in range(lo, hi + 1):
                    targets.setdefault(b, []).append(t)
            m = self._bytemaps[q] = {b: tuple(ts) for b, ts in targets.items()}
        return m

    def step(self, sid: int, byte: int) -> int:
        """The state after reading ``byte`` in state ``sid`` (``DEAD`` if the byte cannot come next)."""
        key = sid * 256 + byte
        hit = self._steps.get(key)
        if hit is not None:
            return hit
        out: set = set()
        complete = False
        if sid != DEAD:
            for stack in self.states[sid][0]:
                for t in self._bytemap(stack[-1]).get(byte, ()):
                    more, done = self._expand(stack[:-1] + (t,))
                    out |= more
                    complete = complete or done
        result = self._intern(frozenset(out), complete)
        self._steps[key] = result
        return result

    def advance(self, sid: int, data: bytes) -> int:
        for b in data:
            sid = self.step(sid, b)
            if sid == DEAD:
                return DEAD
        return sid

    def is_complete(self, sid: int) -> bool:
        return sid != DEAD and self.states[sid][1]

    def can_continue(self, sid: int) -> bool:
        return sid != DEAD and bool(self.states[sid][0])

    def accepts(self, data: bytes) -> bool:
        """Whether ``data`` is a complete match (for tests and for checking outputs)."""
        return self.is_complete(self.advance(self.initial, data))

    def signature(self, q: int, limit: int = 4096) -> tuple | None:
        """A canonical description of everything reachable from NFA state ``q`` without popping (states renumbered
        in breadth-first order): two automata with equal signatures accept the same bytes from ``q``, so their
        per-top masks can be shared (the string rule of every JSON schema, for one). None beyond ``limit``."""
        order = {q: 0}
        queue = [q]
        parts = []

        def num(t: int) -> int:
            if t not in order:
                order[t] = len(queue)
                queue.append(t)
            return order[t]

        for s in queue:
            if len(queue) > limit:
                return None
            parts.append((tuple((lo, hi, num(t)) for lo, hi, t in self.edges[s]), tuple(num(t) for t in self.eps[s]),
                          tuple((num(self.start[r]), num(ret)) for r, ret in self.calls[s]), self.final[s]))
        return tuple(parts)

    def relative_state(self, q: int) -> int:
        """The state whose only stack is the reading NFA state ``q`` alone: a walk from it sees what the top
        of any stack with ``q`` on top accepts by itself; "complete" there means the rule of ``q`` ended and
        the rest depends on the stack below (xgrammar's context-dependent tokens)."""
        return self._intern(frozenset({(q,)}), False)
