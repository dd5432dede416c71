"""LoRA adapters merged into a loaded model's weights, and taken out again, exactly.

A layer with adapters holds W = cast(W_file + sum_i w_i dW_i), computed in float32 from the checkpoint's
own tensor (read again from the memory-mapped file, never from the rounded copy in the model), with the
adapters in the order given. A layer whose adapters go away gets cast(W_file) back: bit for bit what
loading gave it. So any LoRA set, reached in any sequence of changes, gives the weights a fresh load with
that set would give, and sampling costs nothing extra. Memory: one layer in float32 at a time (a plain
LoRA is added into it with one addmm, no dW of the layer's size), plus the file's pages of that layer
(released again, as loading does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sd_cli.errors import CheckpointError
from sd_cli.weights.lora import Adapter, LoraFile
from sd_cli.weights.lora_keys import TEXT


@dataclass(frozen=True)
class LoraUse:
    """One LoRA as applied: the file, and its weights for the text encoder and the UNet."""

    lora: LoraFile
    te: float = 1.0
    unet: float = 1.0

    def weight(self, adapter: Adapter) -> float:
        return self.te if adapter.target.startswith(TEXT) else self.unet


def _contributions(uses) -> dict[str, list[tuple[Adapter, float]]]:
    """{weight key: [(adapter, weight)]} in the order of `uses`; weight-0 parts are left out."""
    out: dict[str, list[tuple[Adapter, float]]] = {}
    for use in uses:
        for adapter in use.lora.adapters:
            w = use.weight(adapter)
            if w != 0.0:
                out.setdefault(adapter.target, []).append((adapter, float(w)))
    return out


def merged_weight(base: torch.Tensor, parts: list[tuple[Adapter, float]], device) -> torch.Tensor:
    """W_file + sum w dW in float32 on `device` (base is the file's tensor, any float dtype)."""
    acc = base.to(device=device, dtype=torch.float32, copy=True).contiguous()
    for adapter, w in parts:
        adapter.add_to(acc, w)
    return acc


def file_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): a file that changes on disk gets another stamp."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class Patcher:
    """Keeps a model's weights equal to checkpoint + the current LoRA set (`apply`)."""

    def __init__(self, model: torch.nn.Module, ckpt: Path, stamp: tuple[int, int] | None = None, read=None):
        """`stamp`: the checkpoint's `file_stamp` from before it was loaded (default: now)."""
        from sd_cli.weights.checkpoint import read_state_dict

        self.model, self.ckpt = model, Path(ckpt)
        self._read = read or read_state_dict
        self._source: dict[str, torch.Tensor] | None = None
        self._stamp = stamp if stamp is not None else file_stamp(self.ckpt)
        # weight key -> its merged [(adapter, weight)]; holding the adapters keeps their ids unique
        self.applied: dict[str, list[tuple[Adapter, float]]] = {}

    def _file(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors (memory-mapped; opened on the first change, kept while the model lives)."""
        if self._source is None:
            if file_stamp(self.ckpt) != self._stamp:
                raise CheckpointError(f"checkpoint {self.ckpt} changed on disk since it was loaded; load it again "
                                      "before changing LoRAs")
            self._source = self._read(self.ckpt)
        return self._source

    def apply(self, uses) -> int:
        """Make the weights checkpoint + `uses` (a sequence of LoraUse, merged in that order). Returns how
        many weight tensors changed."""
        from sd_cli.weights.loading import all_finite, release_pages

        wanted = _contributions(uses)

        def ident(parts) -> list:
            return [(id(a), w) for a, w in parts]

        changed = sorted(k for k in set(wanted) | set(self.applied)
                         if ident(wanted.get(k, [])) != ident(self.applied.get(k, [])))
        if not changed:
            return 0
        source = self._file()
        for key in changed:
            param = self.model.get_parameter(key)
            base = source[key]
            parts = wanted.get(key, [])
            new = merged_weight(base, parts, param.device) if parts else base  # float32: one layer extra
            if parts and not all_finite(new, param.dtype):  # (fp16 overflows at 65504)
                names = ", ".join(sorted({str(a.key) for a, _ in parts}))
                raise CheckpointError(f"LoRA merge: {key} ({names}) is not finite in {param.dtype} after merging; "
                                      "is a weight too large, or try --precision full")
            with torch.no_grad():
                param.copy_(new)  # cast in the copy (as loading's .to(dtype) rounds)
            if base.is_contiguous():
                release_pages(base)
            if parts:
                self.applied[key] = parts
            else:
                self.applied.pop(key, None)
        return len(changed)
