"""Which LoRAs an image uses: `--lora PATH[:WEIGHT]`, the prompt's `<lora:NAME:...>` tags resolved in
the LoRA folder, their files read once, their hashes, and how they are recorded.

An image's LoRA set is the run's --lora files plus its prompt's tags, merged in a fixed order (by file
hash, then weights), so the same set gives the same bits whatever order it was written in. Metadata:
the sd_cli record lists every LoRA (name, file, sha256, weights, and where it came from); A1111's text
gets `Lora hashes: "name: hash, ..."` with A1111's hash (the first 12 hex digits of the sha256 of a
safetensors file's tensor data, after its header, or of the whole file for other formats).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sd_cli.errors import UsageError

DEFAULT_LORA_DIR = "models/Lora"  # A1111's folder; used when it exists and --lora-dir is not given
SUFFIXES = (".safetensors", ".pt", ".ckpt")
MAX_FOLDER_FILES = 100_000
MAX_KEPT = 32  # LoRA files kept read (each is memory-mapped or small)


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA asked for: by --lora (a path) or by a prompt tag (a name in the LoRA folder)."""

    path: Path
    te: float = 1.0
    unet: float = 1.0
    name: str = ""  # the name in the prompt tag, or the file's stem
    source: str = "--lora"  # --lora | prompt

    def __post_init__(self) -> None:
        for w in (self.te, self.unet):
            if not isinstance(w, (int, float)) or not math.isfinite(w):
                raise UsageError(f"--lora {self.path}: weight {w} is not a finite number")


def parse_lora_flag(text: str) -> LoraRequest:
    """`PATH[:WEIGHT]`: a trailing `:number` is the weight (default 1, may be negative); a path with other
    colons (C:\\..., a:b.safetensors) stays whole."""
    path, sep, tail = text.rpartition(":")
    weight = 1.0
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            path = text
    else:
        path = text
    if not math.isfinite(weight):
        raise UsageError(f"--lora {text}: the weight must be a finite number")
    p = Path(path).expanduser()
    return LoraRequest(p, weight, weight, p.stem, "--lora")


def lora_folder(directory: Path | None) -> dict[str, Path]:
    """{name: file} of a LoRA folder and its subfolders (a name is a file's stem; the first one found,
    in sorted order, wins)."""
    found: dict[str, Path] = {}
    if directory is None or not directory.is_dir():
        return found
    count = 0
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs.sort()
        for f in sorted(files):
            count += 1
            if count > MAX_FOLDER_FILES:
                raise UsageError(f"--lora-dir {directory}: more than {MAX_FOLDER_FILES} files; point it at the LoRA folder")
            p = Path(root) / f
            if p.suffix.lower() in SUFFIXES:
                found.setdefault(p.stem, p)
    return found


def resolve_tag(tag, folder: dict[str, Path], directory: Path | None) -> LoraRequest:
    """The request of one `<lora:NAME:...>` tag; an unknown name is an error that lists the folder."""
    path = folder.get(tag.name)
    if path is None:
        where = f"in {directory}" if directory is not None else f"(no LoRA folder: --lora-dir, or {DEFAULT_LORA_DIR})"
        names = sorted(folder)
        has = (f"it has {', '.join(names[:20])}" + (f" and {len(names) - 20} more" if len(names) > 20 else "")
               if names else "it has no .safetensors/.pt/.ckpt files")
        raise UsageError(f"{tag.text[:80]}: no LoRA named {tag.name!r} {where}; {has}")
    return LoraRequest(path, tag.te, tag.unet, tag.name, "prompt")


def a1111_hash(path: Path) -> str:
    """A1111's LoRA hash: sha256 of a safetensors file's data after its header (kohya's "addnet" hash),
    of the whole file otherwise; the first 12 hex digits."""
    from sd_cli.weights.checkpoint import file_hash

    if path.suffix.lower() != ".safetensors":
        return file_hash(path)[:12]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            f.seek(8 + struct.unpack("<Q", head)[0])
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class ResolvedLora:
    request: LoraRequest
    file: object  # sd_cli.weights.lora.LoraFile
    sha256: str
    short_hash: str  # A1111's

    def record(self) -> dict:
        from sd_cli.run.report import path_text

        r = self.request
        return {"name": r.name, "file": path_text(r.path), "sha256": self.sha256, "a1111_hash": self.short_hash,
                "te_weight": r.te, "unet_weight": r.unet, "source": r.source}


class LoraBank:
    """The LoRA folder and the LoRA files of one model, each read and checked once."""

    def __init__(self, directory: Path | None, layout):
        """`layout()`: the model's `sd_cli.weights.lora.Layout` (what a file is checked against)."""
        if directory is None and Path(DEFAULT_LORA_DIR).is_dir():
            directory = Path(DEFAULT_LORA_DIR)
        self.directory, self._layout = directory, layout
        self._folder: dict[str, Path] | None = None
        self._files: dict[tuple, ResolvedLora] = {}

    def folder(self) -> dict[str, Path]:
        if self._folder is None:
            self._folder = lora_folder(self.directory)
        return self._folder

    def requests(self, flags: tuple[LoraRequest, ...], prompt: str, syntax: str) -> list[LoraRequest]:
        """The run's --lora files, then the prompt's tags (A1111 syntax only; plain text is words)."""
        from sd_cli.pipeline.prompt_syntax import extra_networks

        tags = extra_networks(prompt)[1] if syntax == "a1111" else ()
        return [*flags, *(resolve_tag(t, self.folder(), self.directory) for t in tags)]

    def resolve(self, requests: list[LoraRequest]) -> tuple[ResolvedLora, ...]:
        """Each request's file, read and checked, in the merge order (by hash, then weights)."""
        out = [self._read(r) for r in requests]
        return tuple(sorted(out, key=lambda x: (x.sha256, x.request.te, x.request.unet, x.request.name)))

    def _read(self, request: LoraRequest) -> ResolvedLora:
        from sd_cli.weights.checkpoint import file_hash
        from sd_cli.weights.lora import read_lora

        path = request.path
        if not path.is_file():
            raise UsageError(f"--lora {path}: no such file" if request.source == "--lora" else f"LoRA {path}: gone")
        st = path.stat()
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        known = self._files.pop(key, None)
        if known is None:
            known = ResolvedLora(request, read_lora(path, self._layout()), file_hash(path), a1111_hash(path))
        self._files[key] = known  # most recently used last
        while len(self._files) > MAX_KEPT:  # a long session over many LoRAs keeps only the recent ones
            self._files.pop(next(iter(self._files)))
        return ResolvedLora(request, known.file, known.sha256, known.short_hash)

