"""AUTOMATIC1111's prompt editing: `[from:to:when]`, `[to:when]`, `[from::when]` and `[a|b]`.

A prompt with these brackets is a different text at different sampling steps. The language (A1111
`modules/prompt_parser.py`, whose grammar this parser follows; written here from that grammar and its
documented examples):

    start     := (prompt | one of "[ ] ( ) :")*          stray brackets and colons only at the top
    prompt    := (emphasis | edit | alternate | plain)*
    emphasis  := "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"   kept as written
    edit      := "[" [prompt ":"] prompt ":" [space] NUMBER [space] "]"
    alternate := "[" prompt ("|" [prompt])+ "]"
    plain     := (any character but \\ [ ] ( ) : |, or \\ and one character that is not a newline)+

NUMBER is a signed integer or decimal with an optional exponent. A text that does not fit the grammar
(a `|` outside an alternate, a lone backslash at the end) has no editing: it is the same text at every
step. Where a bracket could be an edit or a stray character at the top, it is the edit.

Steps (A1111's current rule, not its "old prompt editing timelines" option): for a pass of `steps`
schedule steps, `when` written with a "." is a fraction of them (`0.25` -> int(0.25 steps)), without one
a step number; both are capped at `steps`. In a hires pass after a first pass of `base` steps, a
fraction is counted from 1 (`1.5`: half way through the hires pass) and a step number from `base`.
`from` is used while step <= when, then `to`. `[a|b|c]` takes a at step 1, b at 2, c at 3, a at 4, ...
The schedule lists (last step, text) for every step at which some text changes, the last entry at
`steps`.

Nesting deeper than MAX_DEPTH brackets (no real prompt comes close) makes the prompt one plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_DEPTH = 64

_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")


@dataclass(frozen=True)
class Edit:
    """`[before:after:when]`; before None for `[after:when]`."""

    before: tuple | None
    after: tuple
    when: str  # the number as written (its "." decides fraction or step)


@dataclass(frozen=True)
class Alternate:
    """`[a|b|...]`: option (step - 1) mod n at each step."""

    options: tuple[tuple, ...]


class _Fail(Exception):
    """This bracket is not a construct here."""


class _NoParse(Exception):
    """The text does not fit the grammar at all (it stays one plain text)."""


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.memo: dict[int, tuple[tuple, int] | None] = {}  # construct at pos -> (nodes, end) or None

    def top(self) -> tuple:
        s, out, pos = self.s, [], 0
        while pos < len(s):
            if s[pos] in "[(":
                found = self.construct(pos, 0)
                if found is not None:
                    out.extend(found[0])
                    pos = found[1]
                    continue
            if s[pos] in "[]():":  # a stray bracket or colon is text
                out.append(s[pos])
                pos += 1
                continue
            m = _PLAIN.match(s, pos)
            if m is None:  # "|" outside an alternate, or a backslash with nothing to escape
                raise _NoParse
            out.append(m.group(0))
            pos = m.end()
        return tuple(out)

    def prompt(self, pos: int, depth: int) -> tuple[tuple, int]:
        """The nodes of a `prompt` from pos up to a character that ends it (] ) : | or the end)."""
        s, out = self.s, []
        while pos < len(s) and s[pos] not in "]):|":
            if s[pos] in "[(":
                found = self.construct(pos, depth)
                if found is None:
                    raise _Fail
                out.extend(found[0])
                pos = found[1]
                continue
            m = _PLAIN.match(s, pos)
            if m is None:
                raise _Fail
            out.append(m.group(0))
            pos = m.end()
        return tuple(out), pos

    def construct(self, pos: int, depth: int) -> tuple[tuple, int] | None:
        """The bracket at pos as emphasis, edit or alternate: (nodes, end), or None if it is none."""
        if pos not in self.memo:
            if depth >= MAX_DEPTH:
                raise _NoParse
            try:
                self.memo[pos] = self._round(pos, depth) if self.s[pos] == "(" else self._square(pos, depth)
            except _Fail:
                self.memo[pos] = None
        return self.memo[pos]

    def _at(self, pos: int) -> str:
        return self.s[pos] if pos < len(self.s) else ""

    def _round(self, pos: int, depth: int) -> tuple[tuple, int]:
        inner, q = self.prompt(pos + 1, depth + 1)
        if self._at(q) == ")":
            return ("(", *inner, ")"), q + 1
        if self._at(q) == ":":
            weight, r = self.prompt(q + 1, depth + 1)
            if self._at(r) == ")":
                return ("(", *inner, ":", *weight, ")"), r + 1
        raise _Fail

    def _square(self, pos: int, depth: int) -> tuple[tuple, int]:
        first, q = self.prompt(pos + 1, depth + 1)
        c = self._at(q)
        if c == "]":
            return ("[", *first, "]"), q + 1
        if c == "|":
            options = [first]
            while self._at(q) == "|":
                option, q = self.prompt(q + 1, depth + 1)
                options.append(option)
            if self._at(q) != "]":
                raise _Fail
            return (Alternate(tuple(options)),), q + 1
        if c == ":":
            m = _NUMBER.match(self.s, q + 1)
            if m is not None:  # [to:when]
                return (Edit(None, first, m.group(1)),), m.end()
            after, r = self.prompt(q + 1, depth + 1)
            m = _NUMBER.match(self.s, r + 1) if self._at(r) == ":" else None
            if m is not None:
                return (Edit(first, after, m.group(1)),), m.end()
        raise _Fail


def parse(text: str) -> tuple | None:
    """The prompt as nodes (str, Edit, Alternate), or None when it has no editing (or does not parse)."""
    try:
        nodes = _Parser(text).top()
    except _NoParse:
        return None
    return nodes if any(not isinstance(n, str) for n in nodes) else None


def has_editing(text: str) -> bool:
    """Whether the prompt changes during sampling (it has an edit or alternate that parses)."""
    return parse(text) is not None


def _when(written: str, steps: int, base: int | None) -> int:
    """The last step of `from` (A1111's rule; see the module docstring). Never raises: an exponent too
    large for a float counts as past the end."""
    v = float(written)
    fraction = "." in written
    if base is None:
        v = v * steps if fraction else v
    else:
        v = (v - 1.0) * steps if fraction else v - base
    if v >= steps:
        return steps
    return int(v) if v > -steps - 1 else -1


def _steps_of(nodes: tuple, steps: int, base: int | None, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, Edit):
            when = _when(node.when, steps, base)
            if when >= 1:
                found.add(when)
            _steps_of(node.before or (), steps, base, found)
            _steps_of(node.after, steps, base, found)
        elif isinstance(node, Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _steps_of(option, steps, base, found)


def _text_at(nodes: tuple, step: int, steps: int, base: int | None) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Edit):
            chosen = (node.before or ()) if step <= _when(node.when, steps, base) else node.after
            out.append(_text_at(chosen, step, steps, base))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps, base))
    return "".join(out)


def schedule(text: str, steps: int, base: int | None = None) -> tuple[tuple[int, str], ...]:
    """((last step, text), ...) of a prompt over `steps` schedule steps (`base`: the first pass's steps,
    for a hires pass); one entry (steps, text) when the prompt has no editing."""
    nodes = parse(text)
    if nodes is None:
        return ((steps, text),)
    found = {steps}
    _steps_of(nodes, steps, base, found)
    return tuple((step, _text_at(nodes, step, steps, base)) for step in sorted(found))


def entry_at(ends: tuple[int, ...], call: int) -> int:
    """Index of the entry a UNet call uses: the first whose last step is >= the call's number (counted
    from 0, as A1111's denoiser counts), or the first entry when the calls outrun the schedule."""
    for i, end in enumerate(ends):
        if call <= end:
            return i
    return 0
