"""The SD v1.x KL autoencoder (LDM `AutoencoderKL`): encoder, decoder and the 1x1 quant convs.

Attribute names mirror the checkpoint under `first_stage_model.`: `encoder.down.0.block.0.norm1`,
`decoder.up.3.upsample.conv`, `decoder.mid.attn_1.q`, `quant_conv`, `post_quant_conv`, ...
The decoder turns latents (B, 4, h, w) into images (B, 3, 8h, 8w) in [-1, 1]; the encoder exists
(and loads) for img2img.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd_cli.model.layers import add_fresh, group_norm, memory_format_of, sdpa, silu_fresh


@dataclass(frozen=True)
class VAEConfig:
    embed_dim: int = 4
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    double_z: bool = True


def _norm(channels: int) -> nn.GroupNorm:
    return group_norm(channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu_fresh(self.norm1(x)))
        h = self.conv2(silu_fresh(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return add_fresh(h, x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs q, k, v, proj_out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        # Tokens must be contiguous along C: with a strided last dimension torch's CPU SDPA falls back
        # to the math kernel, which materialises the (h*w)^2 score matrix (2.3 GB at 1024x1024 px).
        def tokens(conv: nn.Conv2d) -> torch.Tensor:
            return conv(hn).permute(0, 2, 3, 1).reshape(b, 1, h * w, c).contiguous()  # (B, 1, h*w, C); free in NHWC

        out = sdpa(tokens(self.q), tokens(self.k), tokens(self.v))  # (B, 1, h*w, C)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(x))
        return add_fresh(self.proj_out(out), x)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 conv (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks, empty in SD v1), optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * in_mult[level], cfg.ch * mult
            blocks = [ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            lvl = _Level(blocks, attns)
            if level != len(cfg.ch_mult) - 1:
                lvl.downsample = Downsample(c_out)
                res //= 2
            self.down.append(lvl)
        ch = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(ch)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for lvl in self.down:
            h = lvl.run(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid(h)
        return self.conv_out(silu_fresh(self.norm_out(h)))  # (B, 2*z, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch)
        levels: list[_Level] = []
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        for level in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[level]
            blocks = [ResnetBlock(ch if i == 0 else c_out, c_out) for i in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            lvl = _Level(blocks, attns)
            ch = c_out
            if level != 0:
                lvl.upsample = Upsample(ch)
                res *= 2
            levels.insert(0, lvl)  # checkpoint indexes `up` from the highest resolution (up.0) to the lowest
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample_to_pixels(self.mid(self.conv_in(z)))  # mid: (B, 512, h, w)

    def upsample_to_pixels(self, h: torch.Tensor) -> torch.Tensor:
        """The part after the mid block: (B, 512, h, w) -> (B, 3, 8h, 8w). Only 3x3 convs, nearest
        upsampling and GroupNorms: local except for the norms' statistics (see vae_tiling.py)."""
        for lvl in reversed(self.up):
            h = lvl.run(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(silu_fresh(self.norm_out(h)))  # (B, 3, 8h, 8w)


class AutoencoderKL(nn.Module):
    # Layout of the activations: torch.channels_last after `layers.use_channels_last(vae)`.
    memory_format: torch.memory_format = torch.contiguous_format

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> posterior mean and log-variance, each (B, 4, H/8, W/8)."""
        x = x.contiguous(memory_format=self.memory_format)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) (already divided by the scale factor) -> image (B, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(z.contiguous(memory_format=self.memory_format)))
