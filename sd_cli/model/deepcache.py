"""DeepCache (Ma, Fang & Wang, CVPR 2024, arXiv:2312.00858): reuse the UNet's deep features across steps.

Adjacent denoising steps change the deep (low-resolution) features of the UNet very little. So every
`interval`-th call runs the whole UNet and keeps the feature that enters output block L-1-B (L =
len(output_blocks) = len(input_blocks)); the calls in between are shallow: input_blocks[0..B], then that
cached feature concatenated with the fresh shallow skip into output_blocks[L-1-B..], then `out`.

Branch B (0 = the shallowest skip) on the LDM layout, as the paper's LDM code maps it: input block B is
paired with output block L-1-B, the two ends of one skip connection. B = 0 is conv_in and the last output
block; B = L-1 keeps all of both paths and caches only the middle block's output. For SD v1 (L = 12),
input blocks are: 0 conv_in, 1-2 ResBlock+attention at 64x64 (for 512 px), 3 downsample, 4-5 at 32x32,
6 downsample, 7-8 at 16x16, 9 downsample, 10-11 at 8x8.

    unet = DeepCacheUNet(model.unet, interval=3, branch=0, total_calls=info.calls(steps))
    eps = unet(x, t, context)  # the UNet's signature; wrap the raw UNet (under an inpainting concat)

Call k of a slot (0-based) is full when k % interval == 0 or k == total_calls - 1 (the last one), else
shallow. A slot is one stream of calls told apart by the shapes of (x, context): classifier-free guidance
makes one [uncond; cond] call per evaluation (one slot), or, when the prompt and the negative prompt have
different lengths, two calls of different context shapes (two slots, each counted and cached on its own,
so the cond call never reuses the uncond features). Build one wrapper per sampling run (or `reset`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd_cli.model.unet import UNetModel


@dataclass
class _Slot:
    calls: int = 0  # calls made so far in this slot
    feature: torch.Tensor | None = None  # (N, C_j, h_j, w_j): what entered output block L-1-B at the last full call


class DeepCacheUNet:
    """`unet(x, t, context)` with DeepCache; see the module docstring.

    unet: the raw UNetModel (for an inpainting model: the 9-channel one, the concat stays outside).
    interval: a full evaluation every `interval` calls of a slot (1: always full, the plain UNet).
    branch: B, the skip branch the shallow path keeps, 0 <= B < len(unet.input_blocks).
    total_calls: the calls each slot will get in the run (`SamplerInfo.calls(steps)`); the last one is
        made full. None: no forced last full call.
    """

    def __init__(self, unet: UNetModel, interval: int, branch: int = 0, total_calls: int | None = None):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"DeepCache interval must be an integer >= 1, got {interval!r}")
        depth = len(unet.input_blocks)
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < depth:
            raise ValueError(f"DeepCache branch must be an integer in 0..{depth - 1}, got {branch!r}")
        self.unet = unet
        self.interval = interval
        self.branch = branch
        self.reset(total_calls)

    def reset(self, total_calls: int | None = None) -> None:
        """Forget every cache and count (a new run of `total_calls` calls per slot)."""
        if total_calls is not None and (isinstance(total_calls, bool) or not isinstance(total_calls, int)
                                        or total_calls < 1):
            raise ValueError(f"total_calls must be an integer >= 1 or None, got {total_calls!r}")
        self.total_calls = total_calls
        self._slots: dict[tuple, _Slot] = {}
        self.full_calls = 0
        self.shallow_calls = 0

    @property
    def resume_block(self) -> int:
        """j = L-1-B: the first output block a shallow call runs."""
        return len(self.unet.output_blocks) - 1 - self.branch

    def is_full(self, k: int) -> bool:
        """Whether call k (0-based) of a slot runs the whole UNet."""
        last = self.total_calls is not None and k == self.total_calls - 1
        return k % self.interval == 0 or last

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (N, C, h, w), t (N,), context (N, L, D) -> eps (N, out_channels, h, w), as UNetModel."""
        slot = self._slots.setdefault((tuple(x.shape), tuple(context.shape)), _Slot())
        k, slot.calls = slot.calls, slot.calls + 1
        if self.is_full(k) or slot.feature is None:
            self.full_calls += 1
            return self.full(x, t, context, slot)
        self.shallow_calls += 1
        return self.shallow(x, t, context, slot.feature)

    def full(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, slot: _Slot | None = None) -> torch.Tensor:
        """The whole UNet (the same operations as `UNetModel.forward`); keeps the feature entering output
        block L-1-B in `slot`."""
        unet, j = self.unet, self.resume_block
        h, emb, context = unet.prepare(x, t, context)  # (N, C, h, w), (N, 4 mc), (N, L, D)
        skips = unet.run_input_blocks(h, emb, context)  # L features, the last (N, C_deep, h/8, w/8)
        h = unet.middle_block(skips[-1], emb, context)
        h = unet.run_output_blocks(h, skips, emb, context, 0, j)  # (N, C_j, h_j, w_j)
        if slot is not None:
            slot.feature = h
        h = unet.run_output_blocks(h, skips, emb, context, j)  # (N, mc, h, w)
        return unet.out(h).to(x.dtype)

    def shallow(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """input_blocks[0..B], then output_blocks[L-1-B..] from the cached `feature` (N, C_j, h_j, w_j)."""
        unet = self.unet
        h, emb, context = unet.prepare(x, t, context)
        skips = unet.run_input_blocks(h, emb, context, self.branch + 1)  # the B+1 shallowest skips
        h = unet.run_output_blocks(feature, skips, emb, context, self.resume_block)  # (N, mc, h, w)
        return unet.out(h).to(x.dtype)

    def block_calls(self) -> tuple[int, int]:
        """(blocks a full call runs, blocks a shallow call runs), counting input, middle and output blocks:
        (2L + 1, 2(B + 1))."""
        depth = len(self.unet.input_blocks)
        return 2 * depth + 1, 2 * (self.branch + 1)
