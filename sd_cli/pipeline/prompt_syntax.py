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

import math
import re
from dataclasses import dataclass

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


def check_a1111(text: str, negative: bool = False) -> None:
    """Refuse, with the reason, what A1111 reads but this tool does not compute: `AND` (composable
    diffusion); and extra-network tags that are malformed, of another kind, or in the negative prompt (where A1111 would
    read them as words)."""
    from sd_cli.errors import UsageError

    text, tags = extra_networks(text)
    if negative and tags:
        raise UsageError(f"the negative prompt has {tags[0].text[:60]}: LoRA tags go in the prompt (or use --lora)")

    if _AND.search(text):
        raise UsageError("the prompt uses AND (A1111's composable diffusion), which sd-txt2img does not do; "
                         "write 'and', or pass --prompt-syntax plain")


# Extra networks: A1111's `<kind:arguments>` tags. They are taken out of the prompt before it is parsed
# (the text around them stays, spaces and commas included); `<lora:NAME>`, `<lora:NAME:W>`,
# `<lora:NAME:TE:UNET>` and the named forms `te=W`, `unet=W` choose a LoRA and its weights (UNET defaults
# to TE, TE to 1). `lyco` is the older LyCORIS extension's name for the same thing.
_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class NetworkTag:
    name: str
    te: float
    unet: float
    text: str  # the tag as written


def _number(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        from sd_cli.errors import UsageError

        raise UsageError(f"{tag}: {text.strip()!r} is not a LoRA weight (a number such as 0.8)")
    return value


def _lora_tag(tag: str, args: str) -> NetworkTag:
    from sd_cli.errors import UsageError

    name, *rest = args.split(":")
    positional, named = [], {}
    for part in rest:
        key, eq, value = part.partition("=")
        if eq:
            if key.strip() not in ("te", "unet"):
                raise UsageError(f"{tag}: {key.strip()}= is not a LoRA setting this tool knows (te=, unet=)")
            named[key.strip()] = _number(tag, value)
        else:
            positional.append(_number(tag, part))
    if len(positional) > 2 or not name.strip():
        raise UsageError(f"{tag}: write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return NetworkTag(name.strip(), te, unet, tag)


def extra_networks(text: str) -> tuple[str, tuple[NetworkTag, ...]]:
    """The prompt without its `<kind:...>` tags, and its LoRA tags in order. Other kinds (hypernet, ...)
    are refused with a UsageError: this tool cannot apply them, and dropping one would change the image."""
    from sd_cli.errors import UsageError

    tags = []
    for m in _NETWORK.finditer(text):
        kind = m.group(1).lower()
        if kind not in LORA_KINDS:
            raise UsageError(f"the prompt uses {m.group(0)[:60]}: '{kind}' networks are not something this tool "
                             "applies (LoRA and LyCORIS are: <lora:NAME:WEIGHT>)")
        tags.append(_lora_tag(m.group(0), m.group(2)))
    return _NETWORK.sub("", text), tuple(tags)
