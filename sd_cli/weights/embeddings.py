"""Textual-inversion embeddings: a file's stem is its trigger word; its vectors stand in for that word.

Formats (all read without running code from the file):
* A1111 `.pt`: a pickled dict whose `string_to_param` maps '*' to the (n, D) vectors (restricted unpickler);
* A1111 `.safetensors`: `emb_params` (n, D);
* diffusers `learned_embeds.safetensors` / `.bin`: {token: (D,) or (n, D)}.
The vectors must be (n, D) with D the text encoder's width, 1 <= n <= 75, finite. `EmbeddingSet` knows the
folder's names and loads a file only when its trigger word is used; `hash` is A1111's short hash (the first
12 hex digits of the file's sha256), as "TI hashes" records it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from sd_cli.errors import CheckpointError

SUFFIXES = (".pt", ".safetensors", ".bin")
MAX_VECTORS = 75


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # (n, D) float32
    hash: str  # 12 hex digits


def _vectors_of(top, path: Path) -> torch.Tensor:
    if not isinstance(top, dict):
        raise CheckpointError(f"embedding {path} holds a {type(top).__name__}, not a textual-inversion dict")
    params = dict.get(top, "string_to_param")
    if isinstance(params, dict) and params:
        return next(iter(dict.values(params)))
    if "emb_params" in top:
        return dict.get(top, "emb_params")
    if "clip_l" in top or "clip_g" in top:
        raise CheckpointError(f"embedding {path} is for SDXL (clip_l/clip_g); sd-txt2img runs SD v1.x")
    tensors = [v for v in dict.values(top) if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:
        return tensors[0]
    raise CheckpointError(f"{path} is not a textual-inversion embedding (no string_to_param, emb_params or "
                          "single token tensor)")


def load_embedding(path: Path, width: int) -> Embedding:
    """The embedding in `path`, checked against the text encoder's width."""
    from sd_cli.weights.checkpoint import read_object

    vec = _vectors_of(read_object(path), path)
    if not isinstance(vec, torch.Tensor) or not vec.is_floating_point():
        raise CheckpointError(f"embedding {path}: its vectors are not a float tensor")
    if vec.dim() == 1:
        vec = vec.unsqueeze(0)
    if vec.dim() != 2 or vec.shape[1] != width or not 1 <= vec.shape[0] <= MAX_VECTORS:
        raise CheckpointError(f"embedding {path}: vectors of shape {tuple(vec.shape)}; this model needs (n, {width}) "
                              f"with 1 <= n <= {MAX_VECTORS} (an embedding for another model, e.g. SD 2.x?)")
    vec = vec.detach().to(torch.float32)
    if not bool(torch.isfinite(vec).all()):
        raise CheckpointError(f"embedding {path}: NaN or infinite values")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Embedding(Path(path).stem, vec, digest[:12])


class EmbeddingSet:
    """The embeddings of a folder, matched in token ids, loaded on first use."""

    def __init__(self, directory: Path | None, tokenizer, width: int):
        self.width, self._loaded = width, {}
        self.paths: dict[str, Path] = {}
        if directory is not None and directory.is_dir():
            for path in sorted(directory.iterdir()):
                if path.suffix.lower() in SUFFIXES and path.is_file():
                    self.paths.setdefault(path.stem, path)
        ids = {name: tuple(tokenizer.encode(name)) for name in self.paths}
        self._by_ids = {seq: name for name, seq in sorted(ids.items(), key=lambda kv: -len(kv[1])) if seq}
        self._longest = max((len(s) for s in self._by_ids), default=0)

    def get(self, name: str) -> Embedding:
        if name not in self._loaded:
            self._loaded[name] = load_embedding(self.paths[name], self.width)
        return self._loaded[name]

    def match(self, tokens: list[int], pos: int) -> tuple[Embedding, int] | None:
        """The embedding whose trigger's ids start at tokens[pos] (the longest), and how many ids it spans."""
        for n in range(min(self._longest, len(tokens) - pos), 0, -1):
            name = self._by_ids.get(tuple(tokens[pos : pos + n]))
            if name is not None:
                return self.get(name), n
        return None
