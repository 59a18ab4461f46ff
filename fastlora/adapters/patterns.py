"""rank_pattern / alpha_pattern keys from adapter files, matched without backtracking."""

from __future__ import annotations

import re

# ---- rank_pattern / alpha_pattern keys from files, matched without backtracking ----------------
#
# A key from a file is a regex, and Python's backtracking engine can take exponential time on keys
# such as "(.*.*)*z": a hostile adapter_config.json would hang load_adapter. Keys are therefore
# parsed (Python's own regex parser, so the syntax is exactly re's) and matched as a Thompson NFA
# run as a lazily built DFA: time linear in the path for any key. Supported: literals, ".",
# classes and \d \w \s, groups, "|", greedy and lazy repeats (the same match/no-match answer),
# "^" "$" "\A" "\Z". Refused with ValueError: backreferences, lookarounds, atomic groups and
# possessive repeats, conditionals, \b \B, inline flags; keys over _MAX_KEY_CHARS characters or
# whose NFA exceeds _MAX_NFA_STATES states (e.g. "a{100000}"). "$" matches only at the end of the
# path (re's "$" also matches before a final newline, which module paths never have).

_MAX_KEY_CHARS = 1000
_MAX_NFA_STATES = 10_000
_MAX_DFA_STATES = 10_000  # cached subsets per key; past it the cache is dropped and rebuilt
_CHAR, _SPLIT, _BEGIN, _END, _ACCEPT = range(5)


class _SafePattern:
    _cache: dict[str, _SafePattern] = {}

    def __init__(self, key: str) -> None:
        from re import _constants as C
        from re import _parser

        if len(key) > _MAX_KEY_CHARS:
            raise ValueError(f"pattern key of {len(key)} characters (at most {_MAX_KEY_CHARS})")
        try:
            parsed = _parser.parse(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ValueError(f"pattern key {key!r} is not a valid regex ({e})") from e
        except RecursionError:
            raise ValueError(f"pattern key {key!r} is nested too deeply") from None
        if parsed.state.flags & ~re.UNICODE:
            raise ValueError(f"pattern key {key!r}: inline flags are not supported")
        self.C = C
        # the common key, an escaped module path (what save_adapter writes) or a plain name: a
        # literal, decided by a suffix compare
        self.literal = None
        if len(parsed) == 3 and parsed[1][0] is C.SUBPATTERN and parsed[2] == (C.AT, C.AT_END):
            lit = parsed[1][1][3]  # the items of group 2, the key itself
            if not parsed[1][1][1] and not parsed[1][1][2] and all(op is C.LITERAL for op, _ in lit):
                self.literal = "".join(chr(av) for _, av in lit)
        # states: [kind, arg, out1, out2]
        self.states: list[list] = [[_ACCEPT, None, None, None]]
        try:
            self.start = self._seq(parsed, 0, key)
        except RecursionError:
            raise ValueError(f"pattern key {key!r} is nested too deeply") from None
        self.key = key
        self._closures: dict[frozenset, tuple] = {}
        self._steps: dict[tuple, frozenset] = {}

    @classmethod
    def of(cls, key: str) -> _SafePattern:
        pat = cls._cache.get(key)
        if pat is None:
            if len(cls._cache) > 4096:
                cls._cache.clear()
            pat = cls._cache[key] = cls(key)
        return pat

    def _new(self, kind: int, arg=None, out1=None, out2=None) -> int:
        if len(self.states) >= _MAX_NFA_STATES:
            raise ValueError(f"pattern key is too large (over {_MAX_NFA_STATES} NFA states)")
        self.states.append([kind, arg, out1, out2])
        return len(self.states) - 1

    def _seq(self, items, nxt: int, key: str) -> int:
        for item in reversed(list(items)):
            nxt = self._item(item, nxt, key)
        return nxt

    def _item(self, item, nxt: int, key: str) -> int:
        C = self.C
        op, av = item
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            return self._new(_CHAR, (op, av), nxt)
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise ValueError(f"pattern key {key!r}: inline flags are not supported")
            return self._seq(sub, nxt, key)
        if op is C.BRANCH:
            alts = [self._seq(alt, nxt, key) for alt in av[1]]
            head = alts[-1]
            for a in reversed(alts[:-1]):
                head = self._new(_SPLIT, None, a, head)
            return head
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, sub = av
            if hi == C.MAXREPEAT:  # x{lo,}: lo copies, then a loop
                loop = self._new(_SPLIT, None, None, nxt)
                self.states[loop][2] = self._seq(sub, loop, key)
                head = loop
            else:  # x{lo,hi}: lo copies, then hi - lo optional ones, each skipping to nxt
                head = nxt
                for _ in range(hi - lo):
                    head = self._new(_SPLIT, None, self._seq(sub, head, key), nxt)
            for _ in range(lo):
                head = self._seq(sub, head, key)
            return head
        if op is C.AT:
            if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                return self._new(_BEGIN, None, nxt)
            if av in (C.AT_END, C.AT_END_STRING):
                return self._new(_END, None, nxt)
        raise ValueError(
            f"pattern key {key!r}: {str(op).lower()} is not supported in rank_pattern / alpha_pattern keys "
            "(no backreferences, lookarounds, atomic groups, possessive repeats or word boundaries)"
        )

    def _char_ok(self, arg, ch: str) -> bool:
        C = self.C
        op, av = arg
        if op is C.LITERAL:
            return ord(ch) == av
        if op is C.NOT_LITERAL:
            return ord(ch) != av
        if op is C.ANY:
            return ch != "\n"
        negate, hit = False, False
        for iop, iav in av:
            if iop is C.NEGATE:
                negate = True
            elif iop is C.LITERAL:
                hit = hit or ord(ch) == iav
            elif iop is C.RANGE:
                hit = hit or iav[0] <= ord(ch) <= iav[1]
            elif iop is C.CATEGORY:
                hit = hit or _category(C, iav, ch)
            else:
                raise ValueError(f"pattern key {self.key!r}: {iop} in a character class is not supported")
        return hit != negate

    def _closure(self, seeds, at_start: bool, at_end: bool) -> frozenset:
        seen, stack = set(), list(seeds)
        while stack:
            i = stack.pop()
            if i is None or i in seen:
                continue
            seen.add(i)
            kind, _, out1, out2 = self.states[i]
            if kind == _SPLIT:
                stack += (out1, out2)
            elif (kind == _BEGIN and at_start) or (kind == _END and at_end):
                stack.append(out1)
        return frozenset(seen)

    def match(self, path: str) -> bool:
        """``re.match(rf"(.*\.)?({key})$", path) is not None``, in time linear in ``path``."""
        if self.literal is not None:
            return path == self.literal or path.endswith("." + self.literal)
        n = len(path)
        cur = self._closure([self.start], True, n == 0)
        for ch in path:
            if 0 in cur:
                return True
            step = self._steps.get((cur, ch))
            if step is None:
                if len(self._steps) > _MAX_DFA_STATES:
                    self._steps.clear()
                moved = [
                    self.states[i][2]
                    for i in cur
                    if self.states[i][0] == _CHAR and self._char_ok(self.states[i][1], ch)
                ]
                step = self._steps[(cur, ch)] = self._closure(moved, False, False)
            cur = step
            if not cur:
                return False
        return 0 in self._closure(cur, n == 0, True)


def _category(C, cat, ch: str) -> bool:
    if cat in (C.CATEGORY_DIGIT, C.CATEGORY_NOT_DIGIT):
        return ch.isdecimal() == (cat is C.CATEGORY_DIGIT)
    if cat in (C.CATEGORY_WORD, C.CATEGORY_NOT_WORD):
        return (ch.isalnum() or ch == "_") == (cat is C.CATEGORY_WORD)
    if cat in (C.CATEGORY_SPACE, C.CATEGORY_NOT_SPACE):
        return ch.isspace() == (cat is C.CATEGORY_SPACE)
    raise ValueError(f"regex category {cat} is not supported in pattern keys")
