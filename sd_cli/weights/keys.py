"""How a set of tensor keys differs from the one a model expects, as the words of an error message."""

from __future__ import annotations

from typing import Callable, Iterable


def listing(keys: list[str], limit: int = 5, name: Callable[[str], str] = str) -> str:
    """'a, b, c (+2 more)'."""
    shown = ", ".join(name(k) for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def key_differences(expected: Iterable[str], found: Iterable[str], ignored: frozenset = frozenset(),
                    name: Callable[[str], str] = str, limit: int = 5) -> str | None:
    """'N missing (...); M unexpected (...)' for the keys `found` lacks or has beyond `expected` (keys in
    `ignored` may be missing); None when they agree."""
    expected, found = set(expected), set(found)
    missing = sorted(k for k in expected - found if k not in ignored)
    unexpected = sorted(found - expected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({listing(missing, limit, name)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({listing(unexpected, limit, name)})")
    return "; ".join(parts) or None
