"""CLIP byte-level BPE tokenizer, as Stable Diffusion v1 uses it (openai/clip-vit-large-patch14).

Pure Python plus the ``regex`` package; the BPE data ships with the package
(``sd_cli/data/clip_bpe_merges.txt``, made by ``scripts/make_vocab.py``), nothing is downloaded.

Ids are those of the Hugging Face ``openai/clip-vit-large-patch14`` ``vocab.json`` (49408):
0..255 the byte symbols, 256..511 the same with the end-of-word marker ``</w>``, then one id
per merge in rank order (48894 merges), ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407.

Text cleanup
------------
It follows the cleanup that OpenAI's CLIP tokenizer applies and that Stable Diffusion v1 was
trained with (CompVis' ``FrozenCLIPEmbedder`` on Hugging Face's CLIPTokenizer, whose reference
environment has ``ftfy`` because it installs OpenAI's ``clip`` package, which requires it):

    ftfy.fix_text -> html.unescape twice -> strip -> collapse whitespace -> lowercase

``ftfy`` is not a dependency of sd_cli. When it is importable it is used; otherwise a small
stand-in does the parts of ``ftfy.fix_text`` that ordinary prompts meet: HTML entities, curly
quotes to straight ones, Latin ligatures (``ﬁ``), fullwidth/halfwidth forms (``Ａ`` -> ``A``,
U+3000 -> space), removal of stray control characters, NFC normalization. It does not repair
mojibake (``cafÃ©``); ftfy would. On every other kind of text both give the same ids.

Known differences from other tokenizers of the same vocabulary (all on unusual input):
Hugging Face's fast CLIPTokenizer (the only one in transformers 5) does NFC, whitespace collapse
and lowercase only, so it keeps ``&amp;``, curly quotes, fullwidth letters, Latin ligatures and
control characters as they are, and its (Rust) lowercasing never produces the Greek final sigma
that Python's ``str.lower`` does. HF's slow tokenizer *without* ftfy in transformers 4.19.2 (the
version CompVis pinned) ran BERT's BasicTokenizer instead, which also stripped accents
(``café`` -> ``cafe``) and split punctuation (``it's`` -> ``it ' s``); later 4.x releases
changed that fallback. OpenAI's tokenizer, HF's slow one with ftfy, and this module agree.

As in OpenAI's and Hugging Face's tokenizers, the literal texts ``<|startoftext|>`` and
``<|endoftext|>`` inside a prompt become the special ids.

Long words
----------
A pre-token (a run of letters, or of punctuation) longer than ``MAX_WORD_CHARS`` (1000) characters
is split into pieces of that many characters before BPE; only the last piece ends the word (``</w>``).
No word of any language is that long, so real text gives the same ids as OpenAI's tokenizer (the tests
check words up to the cap against the textbook algorithm). Words longer than 32 byte symbols are merged
with a heap instead of the textbook rescan, which gives the same result (``_causal_ranks``) in
O(n log n); with the cap, a 1 MB line of any content tokenizes in about a second rather than hours.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import unicodedata
from dataclasses import dataclass
from importlib import resources
from os import PathLike
from typing import Callable, Iterable, Sequence

import regex
import torch

__all__ = [
    "BOS",
    "EOS",
    "CONTEXT_LENGTH",
    "VOCAB_SIZE",
    "TokenizedBatch",
    "CLIPTokenizer",
    "get_tokenizer",
    "clean_text",
]

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>, also the padding id (SD v1: padding="max_length", pad = EOS)
CONTEXT_LENGTH = 77  # BOS + 75 prompt tokens + EOS
VOCAB_SIZE = 49408
MAX_PROMPT_TOKENS = CONTEXT_LENGTH - 2

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894
DATA_FILE = "clip_bpe_merges.txt"
MAX_WORD_CHARS = 1000  # longer pre-tokens are cut into pieces of this many characters (module docstring)
_HEAP_FROM = 32  # byte symbols from which the heap merge is faster than the rescan
_NOT_LAST = "\x00"  # cache-key suffix of a piece that does not end its word (never a byte symbol)

# Pre-tokenization of CLIP: the two special tokens, English contractions, runs of letters,
# single digits, runs of anything that is neither letter, digit nor whitespace.
_PRETOKEN_RE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE_RE = regex.compile(r"\s+")


# --------------------------------------------------------------------------- text cleanup

@functools.lru_cache(maxsize=1)
def _ftfy_fix_text() -> Callable[[str], str] | None:
    try:
        import ftfy  # noqa: PLC0415  (optional, not a dependency)
    except ImportError:
        return None
    return ftfy.fix_text


def _build_fallback_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    # Curly / modifier quotes -> ASCII (U+02BC, U+2018..U+201B and U+201C..U+201F).
    table[0x02BC] = "'"
    for cp in range(0x2018, 0x201C):
        table[cp] = "'"
    for cp in range(0x201C, 0x2020):
        table[cp] = '"'
    # Latin typographic ligatures and digraph letters -> their letters.
    for cp, letters in {
        0xFB00: "ff", 0xFB01: "fi", 0xFB02: "fl", 0xFB03: "ffi", 0xFB04: "ffl",
        0xFB05: "\u017ft", 0xFB06: "st", 0x0132: "IJ", 0x0133: "ij", 0x0149: "\u02bcn",
        0x01C4: "D\u017d", 0x01C5: "D\u017e", 0x01C6: "d\u017e", 0x01C7: "LJ", 0x01C8: "Lj",
        0x01C9: "lj", 0x01CA: "NJ", 0x01CB: "Nj", 0x01CC: "nj", 0x01F1: "DZ", 0x01F2: "Dz",
        0x01F3: "dz",
    }.items():
        table[cp] = letters
    # Halfwidth and fullwidth forms -> their ordinary-width compatibility equivalents.
    table[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(cp))
        if alt != chr(cp):
            table[cp] = alt
    # Control characters nobody means to type (whitespace-like ones are kept).
    for cp in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
               0xFEFF, *range(0xFFF9, 0xFFFD)]:
        table[cp] = None
    return table


_FALLBACK_TABLE = _build_fallback_table()


def _fix_text_fallback(text: str) -> str:
    """A stand-in for the parts of ``ftfy.fix_text`` that ordinary prompts need."""
    text = html.unescape(text)
    text = text.translate(_FALLBACK_TABLE)
    return unicodedata.normalize("NFC", text)


def clean_text(text: str, fix_text: Callable[[str], str] | None = None) -> str:
    """CLIP's cleanup: fix_text, HTML-unescape twice, collapse whitespace, strip, lowercase.

    ``fix_text`` defaults to ``ftfy.fix_text`` when ftfy is importable, else to the stand-in.
    """
    if fix_text is None:
        fix_text = _ftfy_fix_text() or _fix_text_fallback
    text = fix_text(text)
    text = html.unescape(html.unescape(text))
    text = _WHITESPACE_RE.sub(" ", text).strip()
    return text.lower()


# --------------------------------------------------------------------------- vocabulary

def _byte_symbols() -> list[tuple[int, str]]:
    """(byte, symbol) for the 256 bytes, in vocabulary order.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68 bytes (space,
    controls, ...) get the code points 256, 257, ... in byte order. Vocabulary order is: the
    visible ones in byte order, then the others in byte order (i.e. by symbol code point).
    """
    visible = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    visible_set = set(visible)
    hidden = [b for b in range(256) if b not in visible_set]
    pairs = [(b, chr(b)) for b in visible]
    pairs += [(b, chr(256 + i)) for i, b in enumerate(hidden)]
    return pairs


def _read_merges(bpe_path: str | PathLike | None) -> list[tuple[str, str]]:
    if bpe_path is None:
        data = resources.files("sd_cli").joinpath("data", DATA_FILE).read_bytes()
        source = f"sd_cli/data/{DATA_FILE}"
    else:
        with open(bpe_path, "rb") as fh:
            data = fh.read()
        source = str(bpe_path)
    if data[:2] == b"\x1f\x8b":  # OpenAI's original bpe_simple_vocab_16e6.txt.gz
        data = gzip.decompress(data)
    # Line 0 is a header in every known layout (OpenAI's .gz, HF merges.txt, ours).
    lines = data.decode("utf-8").split("\n")[1 : 1 + N_MERGES]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != N_MERGES:
        raise ValueError(f"{source}: {len(lines)} BPE merges, CLIP needs {N_MERGES}")
    merges = []
    for line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}: not a BPE merge line: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


# --------------------------------------------------------------------------- tokenizer

@dataclass
class TokenizedBatch:
    ids: torch.LongTensor  # (B, 77): BOS, up to 75 tokens, EOS, then EOS padding
    n_tokens: list[int]  # tokens each prompt had (without BOS/EOS), before truncation
    n_dropped: list[int]  # tokens cut off by truncation to 75 (0 when it fit)


class CLIPTokenizer:
    """CLIP BPE tokenizer with SD v1 padding (EOS) and truncation (BOS + 75 + EOS)."""

    _CACHE_LIMIT = 100_000  # pre-tokens kept; cleared when full

    def __init__(self, bpe_path: str | PathLike | None = None):
        merges = _read_merges(bpe_path)
        byte_symbols = _byte_symbols()
        self._byte_to_symbol = [sym for _, sym in sorted(byte_symbols)]  # index = byte
        self._symbol_to_byte = {sym: b for b, sym in byte_symbols}

        symbols = [sym for _, sym in byte_symbols]
        tokens = symbols + [s + END_OF_WORD for s in symbols]
        tokens += [a + b for a, b in merges]
        tokens += [SOT_TEXT, EOT_TEXT]
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        if len(self.encoder) != VOCAB_SIZE or self.encoder[SOT_TEXT] != BOS:
            raise ValueError(f"BPE data gives a vocabulary of {len(self.encoder)}, not {VOCAB_SIZE}")
        self.decoder: list[str] = tokens
        self._ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self._heap_ok = _causal_ranks(merges, self.encoder)
        self._to_symbols = {b: sym for b, sym in byte_symbols}  # str.translate table: chr(byte) -> symbol
        self._fix_text: Callable[[str], str] = _ftfy_fix_text() or _fix_text_fallback
        self._cache: dict[str, tuple[int, ...]] = {}
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._cache.clear()
        self._cache[SOT_TEXT] = (BOS,)
        self._cache[EOT_TEXT] = (EOS,)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    # -- BPE

    def _bpe(self, word: str, last: bool = True) -> tuple[int, ...]:
        """Ids of one pre-token (or, with ``last=False``, a piece of one), already mapped to byte symbols."""
        key = word if last else word + _NOT_LAST
        ids = self._cache.get(key)
        if ids is not None:
            return ids
        parts = list(word)
        if last:
            parts[-1] += END_OF_WORD
        if len(parts) >= _HEAP_FROM and self._heap_ok:
            parts = _merge_heap(parts, self._ranks)
        else:
            parts = _merge_rescan(parts, self._ranks)
        ids = tuple(self.encoder[p] for p in parts)
        if len(self._cache) >= self._CACHE_LIMIT:
            self._reset_cache()
        self._cache[key] = ids
        return ids

    # -- public

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of one prompt: no BOS/EOS, no truncation. With `limit`, the work stops once more than
        `limit` ids exist (the result then has more than `limit`, not all of them)."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be str, not {type(text).__name__}")
        text = clean_text(text, self._fix_text)
        table = self._to_symbols
        ids: list[int] = []
        for word in _PRETOKEN_RE.findall(text):
            for start in range(0, len(word), MAX_WORD_CHARS):
                piece = word[start : start + MAX_WORD_CHARS]
                symbols = piece.encode("utf-8").decode("latin-1").translate(table)
                ids.extend(self._bpe(symbols, last=start + MAX_WORD_CHARS >= len(word)))
                if limit is not None and len(ids) > limit:
                    return ids
        return ids

    def __call__(self, texts: Sequence[str] | str) -> TokenizedBatch:
        """(B, 77) ids for SD v1: BOS, first 75 tokens, EOS, EOS padding."""
        if isinstance(texts, str):
            texts = [texts]
        rows: list[list[int]] = []
        n_tokens: list[int] = []
        n_dropped: list[int] = []
        for text in texts:
            ids = self.encode(text)
            kept = ids[:MAX_PROMPT_TOKENS]
            row = [BOS, *kept, EOS]
            row += [EOS] * (CONTEXT_LENGTH - len(row))
            rows.append(row)
            n_tokens.append(len(ids))
            n_dropped.append(len(ids) - len(kept))
        tensor = torch.tensor(rows, dtype=torch.long).reshape(len(rows), CONTEXT_LENGTH)
        return TokenizedBatch(ids=tensor, n_tokens=n_tokens, n_dropped=n_dropped)

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of token ids (lowercased, cleaned, as the model saw it); ``</w>`` -> space."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} out of range 0..{VOCAB_SIZE - 1}")
            if i >= BOS:
                if not skip_special_tokens:
                    out += self.decoder[i].encode("utf-8")
                continue
            tok = self.decoder[i]
            end = tok.endswith(END_OF_WORD)
            if end:
                tok = tok[: -len(END_OF_WORD)]
            out += bytes(self._symbol_to_byte[c] for c in tok)
            if end:
                out += b" "
        return out.decode("utf-8", errors="replace").strip()


def _merge_rescan(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """The textbook BPE loop: merge every occurrence of the lowest-ranked adjacent pair, rescan, repeat."""
    while len(parts) > 1:
        best_rank = None
        best = None
        prev = parts[0]
        for cur in parts[1:]:
            r = ranks.get((prev, cur))
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best = r, (prev, cur)
            prev = cur
        if best is None:
            break
        first, second = best
        merged = first + second
        out = []
        i, n = 0, len(parts)
        while i < n:
            if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                out.append(merged)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def _merge_heap(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Same result as `_merge_rescan` for causal ranks, in O(n log n): pairs in a heap by (rank, position).

    Symbols form a linked list; a popped pair is merged unless it went stale (a neighbour merged first),
    and the two new neighbour pairs are pushed. Equal ranks pop left to right, as the rescan merges them,
    and a merge only creates pairs of higher rank (causal table), so the order of merges is the same.
    """
    n = len(parts)
    syms: list[str | None] = list(parts)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    get = ranks.get
    heap = [(r, i) for i, r in enumerate(map(get, zip(parts, parts[1:]))) if r is not None]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        left = syms[i]
        j = nxt[i]
        if left is None or j >= n or get((left, syms[j])) != r:  # type: ignore[arg-type]
            continue  # stale: this pair no longer exists at i
        merged = left + syms[j]  # type: ignore[operator]
        syms[i], syms[j] = merged, None
        k = nxt[i] = nxt[j]
        if k < n:
            prv[k] = i
            r2 = get((merged, syms[k]))  # type: ignore[arg-type]
            if r2 is not None:
                heapq.heappush(heap, (r2, i))
        p = prv[i]
        if p >= 0:
            r2 = get((syms[p], merged))  # type: ignore[arg-type]
            if r2 is not None:
                heapq.heappush(heap, (r2, p))
    return [s for s in syms if s is not None]


def _causal_ranks(merges: list[tuple[str, str]], encoder: dict[str, int]) -> bool:
    """True when each merge only joins tokens that exist before it (bytes, or merges of lower rank).

    Then merging never creates a pair ranked below the one just merged, which `_merge_heap` relies on.
    CLIP's table is causal (BPE training adds a merge only after its parts); another file that is not
    gets the textbook loop for every word.
    """
    base = 2 * 256  # ids of the byte symbols, with and without </w>; merge r makes id base + r
    return all(encoder[a] < base + r and encoder[b] < base + r for r, (a, b) in enumerate(merges))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> CLIPTokenizer:
    """The process-wide tokenizer, built from the shipped BPE data on first use."""
    return CLIPTokenizer()
