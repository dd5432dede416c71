"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, arXiv:2303.17604; ToMe: Bolya et al. 2023).

Before the self-attention (attn1) of a BasicTransformerBlock at the highest resolution, `ratio` of its
h*w tokens are merged into others by bipartite soft matching, attention runs on the N - r tokens left
(queries, keys and values), and its output is unmerged back to N tokens (a merged token's output is
copied to every token it absorbed). Cross-attention and the feed-forward see all tokens (tomesd's
defaults: merge_attn on, merge_crossattn and merge_mlp off, sx = sy = 2, max_downsample 1).

Bipartite soft matching on the block's input x (B, N, C) as the metric:
  1. partition: the tokens are cut into sy x sx cells of the (h, w) grid; one token of each cell is a
     destination (dst), all others (and the rows / columns past the last whole cell) are sources (src);
  2. cosine similarity of every src to every dst; each src's best dst and its score;
  3. the r = int(N * ratio) srcs with the highest scores (at most all srcs: ratio <= 1 - 1/(sx sy) has
     effect) are merged: each dst becomes the mean of itself and the srcs merged into it.
Which token of a cell is the dst: tomesd draws it at random for every call. Here the draw comes from a
CPU generator per patched block, seeded from `seed` (the same choice on every device), so a run
reproduces; `reset()` re-seeds (call it at the start of each run). As tomesd, an odd batch (no
[uncond; cond] pair in one call) uses the top-left token of each cell instead; `use_rand=False` always.

    with TokenMerging(model.unet, ratio=0.5):
        ...  # every UNet call merges; on exit the blocks are exactly as before

Nothing is changed in the weights: the patch is forward pre-hooks on the SpatialTransformers (to learn
the token grid) and their blocks (to compute the matching), and an instance-level `forward` on attn1;
`remove()` deletes all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from sd_cli.model.unet import BasicTransformerBlock, Downsample, SpatialTransformer, UNetModel, Upsample

Merge = Callable[[torch.Tensor], torch.Tensor]


def dst_mask(h: int, w: int, sx: int = 2, sy: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """(h*w,) bool on the CPU, True at the destination tokens (row-major over the (h, w) grid): one per
    whole sy x sx cell, the cell's token k = dy * sx + dx drawn from `generator` (None: k = 0, top-left)."""
    ch, cw = h // sy, w // sx  # whole cells
    if generator is None:
        k = torch.zeros(ch, cw, dtype=torch.int64)
    else:
        k = torch.randint(sy * sx, (ch, cw), generator=generator)
    rows = torch.arange(ch)[:, None] * sy + k // sx  # (ch, cw)
    cols = torch.arange(cw)[None, :] * sx + k % sx  # (ch, cw)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.reshape(h * w)


def bipartite_soft_matching(metric: torch.Tensor, mask: torch.Tensor, r: int) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens like `metric` (B, N, C): merge (B, N, C') -> (B, N - r, C'), unmerge
    (B, N - r, C') -> (B, N, C'). mask (N,) bool: the destinations (`dst_mask`). The merged sequence is
    [the unmerged srcs, by falling best score; the dsts, in token order]."""
    b, n, _ = metric.shape
    dst = mask.nonzero().squeeze(1).to(metric.device, non_blocking=True)  # (Nd,)
    src = (~mask).nonzero().squeeze(1).to(metric.device, non_blocking=True)  # (Ns,)
    r = max(0, min(int(r), src.numel()))
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)  # (B, N, C)
        scores = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, Ns, Nd) cosine similarities
        best, best_dst = scores.max(dim=-1)  # (B, Ns)
        order = best.sort(dim=-1, descending=True, stable=True).indices  # (B, Ns)
        merged, kept = order[:, :r], order[:, r:]  # positions in src: (B, r), (B, Ns - r)
        into = best_dst.gather(1, merged)  # (B, r) positions in dst

    def expand(index: torch.Tensor, c: int) -> torch.Tensor:
        return index[..., None].expand(-1, -1, c)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        xs, xd = x[:, src], x[:, dst]  # (B, Ns, C'), (B, Nd, C')
        unmerged = xs.gather(1, expand(kept, c))  # (B, Ns - r, C')
        xd = xd.scatter_reduce(1, expand(into, c), xs.gather(1, expand(merged, c)), reduce="mean")
        return torch.cat([unmerged, xd], dim=1)  # (B, N - r, C')

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c = y.shape[-1]
        unmerged, yd = y[:, : src.numel() - r], y[:, src.numel() - r:]  # (B, Ns - r, C'), (B, Nd, C')
        ys = y.new_empty(b, src.numel(), c)
        ys.scatter_(1, expand(kept, c), unmerged)
        ys.scatter_(1, expand(merged, c), yd.gather(1, expand(into, c)))  # a merged src: its dst's value
        out = y.new_empty(b, n, c)
        out[:, dst] = yd
        out[:, src] = ys
        return out  # (B, N, C')

    return merge, unmerge


def transformer_downsamples(unet: UNetModel) -> list[tuple[SpatialTransformer, int]]:
    """Every SpatialTransformer of the UNet with the downsampling of its level (1: the latent's size)."""
    found, ds = [], 1
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                found.append((layer, ds))
            elif isinstance(layer, Downsample):
                ds *= 2
            elif isinstance(layer, Upsample):
                ds //= 2
    return found


@dataclass
class _BlockState:
    generator: torch.Generator
    grid: tuple[int, int] | None = None  # (h, w) of the tokens, from the SpatialTransformer's input
    fns: tuple[Merge, Merge] | None = None  # this call's (merge, unmerge); None: attn1 as it is
    handles: list = field(default_factory=list)


class TokenMerging:
    """ToMe on `unet`'s self-attention at the levels downsampled at most `max_downsample` times.

    ratio: share of the tokens merged away before attn1, 0 <= ratio < 1 (0: bit-identical; past
        1 - 1/(sx sy) = 0.75 nothing more is merged). sx, sy: the cell of one destination token.
    use_rand / seed: destinations drawn per call from generators seeded seed, seed+1, ... (one per
        patched block, in model order); False: the top-left token of each cell.
    `apply()` / `remove()` patch and unpatch (or use it as a context manager); `reset()` re-seeds.
    """

    def __init__(self, unet: UNetModel, ratio: float = 0.5, *, max_downsample: int = 1, sx: int = 2,
                 sy: int = 2, use_rand: bool = True, seed: int = 0):
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"token merging ratio must be in [0, 1), got {ratio!r}")
        if min(int(sx), int(sy), int(max_downsample)) < 1:
            raise ValueError("sx, sy and max_downsample must be positive integers")
        self.unet, self.ratio, self.sx, self.sy = unet, float(ratio), int(sx), int(sy)
        self.use_rand, self.seed = bool(use_rand), int(seed)
        self.blocks: list[BasicTransformerBlock] = [
            blk for st, ds in transformer_downsamples(unet) if ds <= max_downsample for blk in st.transformer_blocks
        ]
        self._states: dict[BasicTransformerBlock, _BlockState] = {}

    @property
    def applied(self) -> bool:
        return bool(self._states)

    def apply(self) -> "TokenMerging":
        if self.applied:
            raise RuntimeError("token merging is already applied")
        if any("forward" in blk.attn1.__dict__ for blk in self.blocks):
            raise RuntimeError("the UNet's attention is already patched (another TokenMerging?)")
        owners = {blk: st for st, _ in transformer_downsamples(self.unet) for blk in st.transformer_blocks}
        for i, blk in enumerate(self.blocks):
            state = _BlockState(torch.Generator().manual_seed(self.seed + i))
            self._states[blk] = state
            state.handles.append(owners[blk].register_forward_pre_hook(self._grid_hook(state)))
            state.handles.append(blk.register_forward_pre_hook(self._matching_hook(state)))
            blk.attn1.forward = self._merged_attention(blk.attn1, state)
        return self

    def remove(self) -> None:
        """Undo `apply`: the hooks and attn1's instance `forward` are deleted, the class's is back."""
        for blk, state in self._states.items():
            for handle in state.handles:
                handle.remove()
            blk.attn1.__dict__.pop("forward", None)
        self._states = {}

    def reset(self) -> None:
        """Re-seed the destination draws (the start of a run: the same partitions as any other run)."""
        for i, blk in enumerate(self.blocks):
            if blk in self._states:
                self._states[blk].generator.manual_seed(self.seed + i)

    def __enter__(self) -> "TokenMerging":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()

    @staticmethod
    def _grid_hook(state: _BlockState):
        def hook(module: nn.Module, args: tuple) -> None:
            state.grid = tuple(args[0].shape[-2:])  # x (B, C, h, w)

        return hook

    def _matching_hook(self, state: _BlockState):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # (B, h*w, C): the block's input, the metric
            r = int(x.shape[1] * self.ratio)
            if r == 0 or state.grid is None or state.grid[0] * state.grid[1] != x.shape[1]:
                state.fns = None
                return
            rand = self.use_rand and x.shape[0] % 2 == 0
            mask = dst_mask(*state.grid, self.sx, self.sy, state.generator if rand else None)
            state.fns = bipartite_soft_matching(x, mask, r)

        return hook

    @staticmethod
    def _merged_attention(attn: nn.Module, state: _BlockState):
        original = type(attn).forward.__get__(attn)

        def forward(x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            if state.fns is None or context is not None:
                return original(x, context)
            merge, unmerge = state.fns
            state.fns = None  # one use per block call
            return unmerge(original(merge(x)))  # (B, N, C) -> (B, N - r, C) -> attention -> (B, N, C)

        return forward
