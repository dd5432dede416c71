"""AUTOMATIC1111's prompt language, the attention part: `(word)`, `[word]`, `(word:1.3)`, escapes, BREAK.

The rules (A1111 `modules/prompt_parser.py`, `parse_prompt_attention`, written here from its documented
behaviour):

* `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies it by 1.3;
  nested brackets multiply.
* A bracket left open closes at the end of the prompt; a closing bracket with no opening one is text.
* `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters.
* `BREAK` (upper case, a word of its own) ends the current 75-token chunk.
* Neighbouring pieces of equal weight are merged.

`parse_attention` returns [(text, weight)], with ("BREAK", -1.0) marking a break, as A1111 does.
"""

from __future__ import annotations

import re

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = ("BREAK", -1.0)

_TOKENS = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes (a lone backslash is dropped)
\(|\[|                        # openers
:\s*([+-]?[.\d]+)\s*\)|       # ":1.3)" closes a round bracket with an explicit factor
\)|]|                         # closers
[^\\()\[\]:]+|                # plain text
:                             # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "1.2.3", ".": not a number, the bracket closes as plain ")" would
        return None


def parse_attention(text: str) -> list[tuple[str, float]]:
    """[(piece, weight)] of a prompt; ("BREAK", -1.0) where BREAK stands. Never raises on any text."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in res[start:]:
            piece[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, factor = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif factor is not None and round_open and _weight(factor) is not None:
            multiply(round_open.pop(), _weight(factor))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    return _merged(res)


def _merged(res: list[list]) -> list[tuple[str, float]]:
    if not res:
        return [("", 1.0)]
    out = [res[0]]
    for piece in res[1:]:
        if piece[1] == out[-1][1] and tuple(piece) != BREAK and tuple(out[-1]) != BREAK:
            out[-1] = [out[-1][0] + piece[0], piece[1]]
        else:
            out.append(piece)
    return [(t, float(w)) for t, w in out]


_AND = re.compile(r"\bAND\b")
_SCHEDULE = re.compile(r"\[[^\[\]]*?(?::\s*[+-]?[\d.]+\s*\]|\|[^\[\]]*\])")


def check_a1111(text: str) -> None:
    """Refuse, with the reason, what A1111 reads but this tool does not compute (yet): `AND`
    (composable diffusion) and the scheduling brackets `[from:to:when]`, `[to:when]`, `[a|b]`."""
    from sd_cli.errors import UsageError

    if _AND.search(text):
        raise UsageError("the prompt uses AND (A1111's composable diffusion), which sd-txt2img does not do; "
                         "write 'and', or pass --prompt-syntax plain")
    m = _SCHEDULE.search(text)
    if m:
        raise UsageError(f"the prompt uses A1111's prompt scheduling ({m.group(0)[:40]}), which sd-txt2img does "
                         "not do yet; remove it, or pass --prompt-syntax plain to keep the text as it is")
