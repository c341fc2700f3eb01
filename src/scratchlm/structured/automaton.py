"""A pushdown automaton over bytes that recognises prefixes of a grammar, one byte at a time.

Each rule becomes a small NFA (Thompson's construction) whose edges read a byte range, do nothing (epsilon) or
call another rule; calling pushes the state to return to. A matcher state is the set of stacks that are still
alive: (return states..., current state), the current state always one that reads a byte. A set of stacks, not
one, because the grammar may be ambiguous for a while (``"a" | "ab"``); recursion (nested JSON) just grows the
stacks. This is the recursive transition network of Woods (1970), run breadth-first like a GLR parser without
sharing. States are interned as integers, and the step ``(state, byte) -> state`` is memoised, so that walking the
token trie (``masks.py``) mostly costs dictionary look-ups.

A long bounded repetition (``maxLength: 200`` on a string, ``{2,500}`` in a regular expression) is not unrolled into
n copies of its item: its item is built once, and entering it pushes a *counter frame* (how many more items are
needed, how many are still allowed) where a call would push its return state; when the item ends, the frame
either starts it again or leaves by the exit. The count lives in the matcher state, the NFA stays small (the
counted repetitions of regular-expression engines such as RE2's and of xgrammar's repetition expressions work
likewise). Counts above what one token can read are equivalent for masks, so ``masks.py`` clamps them
(``canonical``) and one mask serves most positions of a long string.
"""

from __future__ import annotations

import time

from scratchlm.structured.grammar import Alt, Bytes, ByteSet, Grammar, GrammarError, Ref, Repeat, Seq

DEAD = -1
MAX_NFA_STATES = 200_000  # a size limit on compiled constraints
COMPILE_SECONDS = 10.0  # a time limit on compiling one constraint
UNROLL_UP_TO = 16  # bounded repetitions of at most this many items are unrolled; longer ones run on a counter


class Automaton:
    """The compiled grammar: NFA states, and the interned matcher states reached so far."""

    def __init__(self, grammar: Grammar, max_states: int = MAX_NFA_STATES, time_limit: float = COMPILE_SECONDS):
        grammar.check()
        self._deadline = time.monotonic() + time_limit
        self._max_states = max_states
        self.edges: list[list[tuple[int, int, int]]] = []  # byte edges (lo, hi, target)
        self.eps: list[list[int]] = []
        self.calls: list[list[tuple[str, int]]] = []  # (rule, state to return to)
        self.final: list[bool] = []  # the end state of its rule (or of a counted item)
        self.counters: list[list[int]] = []  # NFA state -> counted repetitions entered there
        self.loops: list[tuple[int, int | None, int, int]] = []  # (min, max, item start, exit)
        self.frames: list[tuple[int, int, int | None]] = []  # (loop, items still needed, items still allowed)
        self._frame_ids: dict[tuple[int, int, int | None], int] = {}
        self.start: dict[str, int] = {}
        self._nullable = nullable_rules(grammar)
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
        self._first: dict[int, frozenset] = {}
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
        self.counters.append([])
        self.final.append(False)
        return len(self.edges) - 1

    def frame(self, loop: int, need: int, room: int | None) -> int:
        """The stack entry of a counter frame, a negative integer (NFA states are >= 0)."""
        key = (loop, need, room)
        fid = self._frame_ids.get(key)
        if fid is None:
            fid = self._frame_ids[key] = -2 - len(self.frames)
            self.frames.append(key)
        return fid

    def _resume(self, entry: int) -> list[tuple[tuple, int]]:
        """Where a match goes when the rule or counted item on top of ``entry`` ends: ((entries pushed), state).
        A return state simply continues; a counter frame starts its item again and/or leaves by its exit."""
        if entry >= 0:
            return [((), entry)]
        loop, need, room = self.frames[-2 - entry]
        _, _, item, exit_ = self.loops[loop]
        need, room = max(need - 1, 0), None if room is None else room - 1
        out = []
        if room is None or room > 0:
            out.append(((self.frame(loop, need, room),), item))
        if need == 0:
            out.append(((), exit_))
        return out

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
            if max(expr.min, expr.max or 0) > UNROLL_UP_TO and not matches_empty(expr.item, self._nullable):
                return self._build_counted(expr, s)
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

    def _build_counted(self, expr: Repeat, s: int) -> int:
        """``expr.item`` built once as a counted loop entered at ``s``; returns the loop's exit state."""
        item = self._new()
        self.final[self._build(expr.item, item)] = True
        exit_ = self._new()
        self.counters[s].append(len(self.loops))
        self.loops.append((expr.min, expr.max, item, exit_))
        return exit_

    # ---- running ---------------------------------------------------------------------------------------
    def _closure(self, s: int) -> tuple[tuple, bool]:
        """From NFA state ``s`` without reading: ((pushed returns, reading state), ...) and whether the rule
        of ``s`` can end (pop). Memoised per state."""
        hit = self._closures.get(s)
        if hit is not None:
            return hit
        out, finishes, seen = set(), False, set()
        todo = [((), s)]
        limit = len(self.start) + len(self.loops) + 1
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
            for loop in self.counters[q]:
                need, room, item, exit_ = self.loops[loop]
                if room is None or room > 0:
                    todo.append((pushed + (self.frame(loop, need, room),), item))
                if need == 0:
                    todo.append((pushed, exit_))
            if self.final[q]:
                if pushed:
                    todo.extend((pushed[:-1] + more, t) for more, t in self._resume(pushed[-1]))
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
                for pushed, t in self._resume(base[-1]):
                    more, done = self._expand(base[:-1] + pushed + (t,))
                    out |= more
                    complete = complete or done
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
            loops = tuple((lo, hi, num(item), num(exit_)) for lo, hi, item, exit_ in
                          (self.loops[i] for i in self.counters[s]))
            parts.append((tuple((lo, hi, num(t)) for lo, hi, t in self.edges[s]), tuple(num(t) for t in self.eps[s]),
                          tuple((num(self.start[r]), num(ret)) for r, ret in self.calls[s]), loops, self.final[s]))
        return tuple(parts)

    def relative_state(self, top: tuple) -> int:
        """The state whose only stack is ``top`` (a reading NFA state, under the counter frames directly below
        it): a walk from it sees what any stack ending in ``top`` accepts by itself; "complete" there means the
        rule of ``top`` ended and the rest depends on the stack below (xgrammar's context-dependent tokens)."""
        return self._intern(frozenset({top}), False)

    def first_bytes(self, sid: int) -> frozenset:
        """The bytes that may be read next in state ``sid`` (a superset of those that keep it alive). Memoised."""
        hit = self._first.get(sid)
        if hit is None:
            out: set = set()
            for stack in self.states[sid][0]:
                out.update(self._bytemap(stack[-1]))
            hit = self._first[sid] = frozenset(out)
        return hit

    def canonical(self, sid: int, cap: int) -> int:
        """``sid`` with every counter clamped to ``cap``: equivalent for any ``cap - 1`` bytes read from it (an
        item reads at least one byte), so the masks of all positions of a long string but the last few agree."""
        if not self.frames or sid == DEAD:
            return sid
        stacks, complete = self.states[sid]
        if not any(e < 0 for stack in stacks for e in stack):
            return sid

        def clamp(e: int) -> int:
            if e >= 0:
                return e
            loop, need, room = self.frames[-2 - e]
            return self.frame(loop, min(need, cap), None if room is None else min(room, cap))

        return self._intern(frozenset(tuple(clamp(e) for e in stack) for stack in stacks), complete)


def top_of(stack: tuple) -> tuple:
    """The top of a stack as masks see it: the reading NFA state with the counter frames directly below it."""
    i = len(stack) - 1
    while i > 0 and stack[i - 1] < 0:
        i -= 1
    return stack[i:]


def matches_empty(expr, empty_rules: set[str]) -> bool:
    """Whether ``expr`` matches the empty string, given the rules that do. A counted item must not: then a token
    of n bytes moves a counter by at most n (``Automaton.canonical``)."""
    if isinstance(expr, Bytes):
        return not expr.data
    if isinstance(expr, ByteSet):
        return False
    if isinstance(expr, Ref):
        return expr.name in empty_rules
    if isinstance(expr, Seq):
        return all(matches_empty(i, empty_rules) for i in expr.items)
    if isinstance(expr, Alt):
        return any(matches_empty(i, empty_rules) for i in expr.items)
    return expr.min == 0 or matches_empty(expr.item, empty_rules)


def nullable_rules(grammar: Grammar) -> set[str]:
    """Rules that match the empty string (a fixed point, as ``grammar.productive_rules``)."""
    done: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, expr in grammar.rules.items():
            if name not in done and matches_empty(expr, done):
                done.add(name)
                changed = True
    return done
