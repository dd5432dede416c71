"""Seconds to tokenize 1 MB lines with sd_cli's CLIP tokenizer (issue 13, item 8).

The same four lines as tests/test_hardening_loading.py::test_one_megabyte_line_is_fast: one word of
random letters, one word of prompt text without spaces, 1000 unbroken words of 999 random letters, and
ordinary words (3000 random ones, 2-12 letters). Each from a fresh cache, best of --repeat runs.
Usage: OMP_NUM_THREADS=1 python bench/tokenize_long_lines.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import string
import time

from sd_cli.model.tokenizer import CLIPTokenizer

SIZE = 1_000_000


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def lines() -> dict[str, str]:
    rng = random.Random(8)
    vocab = [_word(rng, rng.randint(2, 12)) for _ in range(3000)]
    return {
        "one random word": _word(rng, SIZE),
        "one natural word": ("masterpiecebestqualityahighlydetailedoilpaintingofalighthouseonacliffatsunset" * 13_000)[:SIZE],
        "many long words": " ".join(_word(rng, 999) for _ in range(1000))[:SIZE],
        "many words": " ".join(rng.choice(vocab) for _ in range(150_000))[:SIZE],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tok = CLIPTokenizer()
    for kind, line in lines().items():
        best = float("inf")
        for _ in range(args.repeat):
            tok._reset_cache()
            t0 = time.perf_counter()
            ids = tok.encode(line)
            best = min(best, time.perf_counter() - t0)
        print(f"{kind:18s} {best:6.2f} s  {len(ids)} tokens")


if __name__ == "__main__":
    main()
