"""Prompt -> text-encoder context, as AUTOMATIC1111 computes it ("Original" emphasis), or plain.

a1111 (the default for new images):
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
from sd_cli.pipeline.prompt_syntax import BREAK, parse_attention

CHUNK = 75
COMMA_BACKTRACK = 20
SYNTAXES = ("a1111", "plain")


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Chunked:
    """A prompt as chunks of 77 ids (BOS + 75 + EOS) and their weights; `token_count` as A1111 counts."""

    ids: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    token_count: int


def _close(chunk: Chunk, chunks: list[Chunk]) -> None:
    pad = CHUNK - len(chunk.tokens)
    chunk.tokens = [BOS, *chunk.tokens, *[EOS] * pad, EOS]
    chunk.weights = [1.0, *chunk.weights, *[1.0] * pad, 1.0]
    chunks.append(chunk)


def chunk_prompt(text: str, tokenizer) -> Chunked:
    """A1111's chunking of one prompt (see the module docstring)."""
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    chunk, count, last_comma = Chunk(), 0, -1
    for piece, weight in parse_attention(text):
        if (piece, weight) == BREAK:
            _close(chunk, chunks)
            chunk, count, last_comma = Chunk(), count + CHUNK, -1
            continue
        for token in tokenizer.encode(piece):
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                _close(chunk, chunks)
                chunk, count, last_comma = moved, count + CHUNK, -1
            if len(chunk.tokens) == CHUNK:
                _close(chunk, chunks)
                chunk, count, last_comma = Chunk(), count + CHUNK, -1
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        count += len(chunk.tokens)
        _close(chunk, chunks)
    return Chunked(tuple(tuple(c.tokens) for c in chunks), tuple(tuple(c.weights) for c in chunks), count)


def token_count(prompt: str, syntax: str) -> int:
    """Tokens of `prompt` as A1111 counts them (75 for every full chunk), or CLIP's count for plain text."""
    from sd_cli.model.tokenizer import get_tokenizer

    if syntax == "a1111":
        return chunk_prompt(prompt, get_tokenizer()).token_count
    return len(get_tokenizer().encode(prompt))


EMPTY = (BOS, *[EOS] * (CHUNK + 1))


def encode_chunked(encode, prompts: list[Chunked], device) -> torch.Tensor:
    """Context (B, 77 k, D) for B chunked prompts: each chunk encoded alone, weighted, concatenated.

    `encode(ids (B, 77)) -> (B, 77, D)` is the text encoder (CLIP skip already applied)."""
    k = max(len(p.ids) for p in prompts)
    parts = []
    for i in range(k):  # chunk i of every prompt in one encoder call; missing chunks are empty ones
        ids = torch.tensor([p.ids[i] if i < len(p.ids) else EMPTY for p in prompts], dtype=torch.long)
        weights = [p.weights[i] if i < len(p.ids) else (1.0,) * len(EMPTY) for p in prompts]
        z = encode(ids.to(device))  # (B, 77, D)
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
