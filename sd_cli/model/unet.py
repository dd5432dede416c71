"""The SD v1.x denoising UNet (LDM `openaimodel.UNetModel` with spatial transformers).

Attribute names mirror the checkpoint under `model.diffusion_model.`: `time_embed`, `input_blocks`,
`middle_block`, `output_blocks`, `out`; inside them `in_layers`, `emb_layers`, `out_layers`,
`skip_connection`, `transformer_blocks.0.attn1.to_q`, ... so a real file loads with no renaming.

Shapes for SD v1 at 512x512: latents (B, 4, 64, 64), context (B, 77, 768), widths 320/640/1280/1280.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd_cli.model.layers import FreshSiLU, add_fresh, attention, group_norm, mul_fresh


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8  # heads per attention layer (LDM legacy=False: head width = channels // heads)
    num_head_channels: int = -1  # if > 0: fixed head width instead of a fixed head count
    transformer_depth: int = 1
    context_dim: int = 768

    def heads_for(self, channels: int) -> int:
        if self.num_head_channels > 0:
            return channels // self.num_head_channels
        return self.num_heads


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), [cos | sin] as LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-conv, residual."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), FreshSiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels), FreshSiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, out, h, w)
        h = add_fresh(h, self.emb_layers(emb).to(h.dtype)[:, :, None, None])
        h = self.out_layers(h)
        return add_fresh(h, self.skip_connection(x))


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when context is None (names: to_q, to_k, to_v, to_out.0)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)  # (B, N, inner)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear to 2*inner, then value * gelu(gate) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return mul_fresh(F.gelu(gate), value)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = add_fresh(self.attn1(self.norm1(x)), x)
        x = add_fresh(self.attn2(self.norm2(x), context), x)
        return add_fresh(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the h*w tokens, 1x1 conv out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))  # (B, inner, h, w)
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, inner)  # (B, h*w, inner)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = x.reshape(b, h, w, inner).permute(0, 3, 1, 2)  # (B, inner, h, w)
        return add_fresh(self.proj_out(x), x_in)


class Downsample(nn.Module):
    """Strided 3x3 conv (the checkpoint names it `op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to the skip's size, for latents not divisible by 8), then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose layers get what they need: ResBlocks the embedding, transformers the context."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, up_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    # Layout of the activations: torch.channels_last after `layers.use_channels_last(unet)`.
    memory_format: torch.memory_format = torch.contiguous_format

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch: int) -> SpatialTransformer:
            heads = cfg.heads_for(ch)
            return SpatialTransformer(ch, heads, ch // heads, cfg.transformer_depth, cfg.context_dim)

        # 1. Encoder half: conv_in, then per level num_res_blocks x (ResBlock [+ attention]), then a downsample.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        # 2. Bottleneck.
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch), transformer(ch), ResBlock(ch, emb_dim, ch))

        # 3. Decoder half: per level num_res_blocks+1 x (ResBlock on [h, skip] [+ attention]), then an upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), FreshSiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, 4, h, w) noisy latents, t (B,) timesteps (float allowed), context (B, 77, 768) -> eps (B, 4, h, w)."""
        h, emb, context = self.prepare(x, t, context)
        skips = self.run_input_blocks(h, emb, context)
        h = self.middle_block(skips[-1], emb, context)
        h = self.run_output_blocks(h, skips, emb, context)
        return self.out(h).to(x.dtype)

    # The parts of `forward`, for callers that run only some blocks (model/deepcache.py). `forward` is
    # exactly prepare -> run_input_blocks -> middle_block -> run_output_blocks -> out.

    def prepare(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        """(h, emb, context) as the blocks take them: h (B, C, h, w) = x in the model's dtype and memory
        format, emb (B, 4*mc) the timestep embedding, context (B, L, D) in the model's dtype."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))  # (B, 4*mc)
        h = x.to(dtype).contiguous(memory_format=self.memory_format)
        return h, emb, context.to(dtype)

    def run_input_blocks(
        self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, count: int | None = None
    ) -> list[torch.Tensor]:
        """The outputs of input_blocks[:count] (all when None) from h (B, C, h, w): the skips, in order;
        the last one is what the next block takes."""
        skips = []
        for block in list(self.input_blocks)[:count]:
            h = block(h, emb, context)
            skips.append(h)
        return skips

    def run_output_blocks(
        self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor,
        start: int = 0, stop: int | None = None,
    ) -> torch.Tensor:
        """output_blocks[start:stop] from h, the feature entering output block `start` (for start 0: the
        middle block's output); each block takes [h, skips.pop()] (`skips` is consumed: it must hold the
        outputs of input_blocks[:len(output_blocks) - start]). Returns the feature leaving the last one."""
        for block in list(self.output_blocks)[start:stop]:
            h = torch.cat([h, skips.pop()], dim=1)
            # An odd-sized level (e.g. 520 px -> 65 -> 33) upsamples to the next skip's size, not blindly x2.
            up_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, up_size)
        return h
