"""Prompt -> text-encoder context, as AUTOMATIC1111 computes it ("Original" emphasis), or plain.

a1111 (the default for new images):
0. `<lora:...>` tags are taken out of the text (`prompt_syntax.extra_networks`).
1. `prompt_syntax.parse_attention` splits the prompt into (text, weight) pieces; each is tokenized alone.
2. Tokens go into chunks of 75. When a chunk fills up and its last comma is at most 20 tokens from its
   end, the tokens after that comma move to the next chunk. BREAK ends a chunk early. Each chunk is
   wrapped as start + 75 + end and padded with the end token: 77 ids, weight 1 at start, end and padding.
3. Each chunk is encoded on its own (with CLIP skip N: the output of layer -N through the final layer
   norm) and the chunks are concatenated: (77 k, D).
4. Weights apply after the encoder: every token's vector times its weight, then the chunk is rescaled so
   its mean equals the unweighted mean. With every weight 1 nothing is multiplied: plain text gives the
   same numbers as before.
In a batch, shorter prompts are padded with empty chunks to the longest one (as A1111); the negative
prompt keeps its own length (the guided UNet calls then run separately).

One difference from A1111: the mean in step 4 is taken per prompt, where A1111 takes it over the whole
batch; they agree whenever the batch holds one prompt (A1111's case), and ours keeps every image of a
--from-file batch reproducible on its own.

plain (images made before the prompt language, and `--prompt-syntax plain`): the text as it is, one
chunk, tokens past 75 dropped with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd_cli.model.tokenizer import BOS, EOS
from sd_cli.pipeline.prompt_syntax import BREAK, extra_networks, parse_attention

CHUNK = 75
COMMA_BACKTRACK = 20
SYNTAXES = ("a1111", "plain")


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, object]] = field(default_factory=list)  # (position in the 77, Embedding)


@dataclass(frozen=True)
class Chunked:
    """A prompt as chunks of 77 ids (BOS + 75 + EOS) and their weights; `token_count` as A1111 counts."""

    ids: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    token_count: int
    fixes: tuple[tuple[tuple[int, object], ...], ...] = ()  # per chunk: (position, Embedding) to put in

    @property
    def embeddings(self) -> dict[str, str]:
        """{name: hash} of the embeddings this prompt uses."""
        return {emb.name: emb.hash for fixes in self.fixes for _, emb in fixes}


def _close(chunk: Chunk, chunks: list[Chunk]) -> None:
    pad = CHUNK - len(chunk.tokens)
    chunk.fixes = [(offset + 1, emb) for offset, emb in chunk.fixes]  # (after BOS)
    chunk.tokens = [BOS, *chunk.tokens, *[EOS] * pad, EOS]
    chunk.weights = [1.0, *chunk.weights, *[1.0] * pad, 1.0]
    chunks.append(chunk)


def chunk_prompt(text: str, tokenizer, embeddings=None) -> Chunked:
    """A1111's chunking of one prompt (see the module docstring). `embeddings` (an EmbeddingSet): a trigger
    word's ids become its n vectors' places, in one chunk (a chunk without room for them is closed first)."""
    text = extra_networks(text)[0]  # <lora:...> tags are not words (A1111 takes them out first)
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    state = {"chunk": Chunk(), "count": 0, "last_comma": -1}

    def close() -> None:
        _close(state["chunk"], chunks)
        state.update(chunk=Chunk(), count=state["count"] + CHUNK, last_comma=-1)

    for piece, weight in parse_attention(text):
        if (piece, weight) == BREAK:
            close()
            continue
        tokens, pos = tokenizer.encode(piece), 0
        while pos < len(tokens):
            _place(tokens, pos, comma, state, close)
            found = embeddings.match(tokens, pos) if embeddings is not None else None
            chunk = state["chunk"]
            if found is None:
                chunk.tokens.append(tokens[pos])
                chunk.weights.append(weight)
                pos += 1
                continue
            emb, span = found
            n = emb.vectors.shape[0]
            if len(chunk.tokens) + n > CHUNK:  # an embedding is never split across chunks
                close()
                chunk = state["chunk"]
            chunk.fixes.append((len(chunk.tokens), emb))
            chunk.tokens += [0] * n
            chunk.weights += [weight] * n
            pos += span
    chunk = state["chunk"]
    count = state["count"]
    if chunk.tokens or not chunks:
        count += len(chunk.tokens)
        _close(chunk, chunks)
    return Chunked(tuple(tuple(c.tokens) for c in chunks), tuple(tuple(c.weights) for c in chunks), count,
                   tuple(tuple(c.fixes) for c in chunks))


def _place(tokens: list[int], pos: int, comma: int, state: dict, close) -> None:
    """Before token `pos` goes in: note a comma, move the words after the last comma of a full chunk to the
    next one (within COMMA_BACKTRACK tokens), and close a full chunk."""
    chunk = state["chunk"]
    if tokens[pos] == comma:
        state["last_comma"] = len(chunk.tokens)
    elif len(chunk.tokens) == CHUNK and state["last_comma"] != -1 and CHUNK - state["last_comma"] <= COMMA_BACKTRACK:
        cut = state["last_comma"] + 1
        moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:], [(o - cut, e) for o, e in chunk.fixes if o >= cut])
        chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
        chunk.fixes = [(o, e) for o, e in chunk.fixes if o < cut]
        close()
        state["chunk"] = moved
    if len(state["chunk"].tokens) == CHUNK:
        close()


def token_count(prompt: str, syntax: str) -> int:
    """Tokens of `prompt` as A1111 counts them (75 for every full chunk), or CLIP's count for plain text."""
    from sd_cli.model.tokenizer import get_tokenizer

    if syntax == "a1111":
        return chunk_prompt(prompt, get_tokenizer()).token_count
    return len(get_tokenizer().encode(prompt))


EMPTY = (BOS, *[EOS] * (CHUNK + 1))


def encode_chunked(encode, prompts: list[Chunked], device) -> torch.Tensor:
    """Context (B, 77 k, D) for B chunked prompts: each chunk encoded alone, weighted, concatenated.

    `encode(ids (B, 77), overrides) -> (B, 77, D)` is the text encoder (CLIP skip already applied);
    overrides [(row, position, vectors (n, D))] replace token embeddings (textual inversion)."""
    k = max(len(p.ids) for p in prompts)
    parts = []
    for i in range(k):  # chunk i of every prompt in one encoder call; missing chunks are empty ones
        ids = torch.tensor([p.ids[i] if i < len(p.ids) else EMPTY for p in prompts], dtype=torch.long)
        weights = [p.weights[i] if i < len(p.ids) else (1.0,) * len(EMPTY) for p in prompts]
        overrides = [(row, pos, emb.vectors) for row, p in enumerate(prompts) if i < len(p.fixes)
                     for pos, emb in p.fixes[i]]
        z = encode(ids.to(device), overrides)  # (B, 77, D)
        parts.append(_emphasis(z, weights))
    return torch.cat(parts, dim=1)


def _emphasis(z: torch.Tensor, weights: list[tuple[float, ...]]) -> torch.Tensor:
    """Each token's vector times its weight, then each prompt's chunk rescaled to its unweighted mean."""
    if all(w == 1.0 for row in weights for w in row):
        return z  # bit for bit the unweighted encoding
    w = torch.tensor(weights, dtype=z.dtype, device=z.device).unsqueeze(-1)  # (B, 77, 1)
    before = z.float().mean(dim=(1, 2), keepdim=True)
    weighted = z * w
    after = weighted.float().mean(dim=(1, 2), keepdim=True)
    return (weighted * (before / after).to(z.dtype)).to(z.dtype)


# Prompt editing (sd_cli.pipeline.prompt_schedule): a prompt that changes during sampling is encoded as
# its distinct texts, and each UNet call takes the rows of its step. At most MAX_EDIT_CHUNKS chunks of 77
# are encoded for one batch (E texts x k chunks): beyond that the contexts alone would take gigabytes.
MAX_EDIT_CHUNKS = 1024


@dataclass(frozen=True)
class Scheduled:
    """A context that changes with the UNet call: `contexts` (E, 77 k, D) the distinct texts encoded;
    `plan[row]` = ((last step, index into contexts), ...) for each of the B images."""

    contexts: torch.Tensor
    plan: tuple[tuple[tuple[int, int], ...], ...]

    def at(self, call: int) -> torch.Tensor:
        """The context (B, 77 k, D) of UNet call `call` (0-based, as A1111's denoiser counts)."""
        from sd_cli.pipeline.prompt_schedule import entry_at

        rows = [entries[entry_at(tuple(end for end, _ in entries), call)][1] for entries in self.plan]
        return self.contexts[rows]

    def all_finite(self) -> bool:
        return bool(torch.isfinite(self.contexts).all())
