"""The whole latent diffusion model as one module tree whose state-dict keys equal an SD v1.x file's.

    model.diffusion_model.*      UNet          (B, 4, h, w) x t x (B, 77, 768) -> eps (B, 4, h, w)
    first_stage_model.*          AutoencoderKL (B, 4, h, w) -> (B, 3, 8h, 8w)
    cond_stage_model.transformer.text_model.*   CLIP text tower (B, 77) -> (B, 77, 768)
    betas, alphas_cumprod, ...   the noise schedule, derived from the config (files carry copies)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sd_cli.model.layers import norm_groups
from sd_cli.sampling.schedule import LDM_BUFFER_NAMES, LINEAR_END, LINEAR_START, NUM_TIMESTEPS, ldm_buffers
from sd_cli.model.text_encoder import FrozenCLIPEmbedder, TextEncoderConfig
from sd_cli.model.unet import UNetConfig, UNetModel
from sd_cli.model.vae import AutoencoderKL, VAEConfig

SD_SCALE_FACTOR = 0.18215  # SD v1's latent scale (VAE latents times this have about unit variance)


@dataclass(frozen=True)
class ScheduleConfig:
    linear_start: float = LINEAR_START
    linear_end: float = LINEAR_END
    timesteps: int = NUM_TIMESTEPS


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scale_factor: float = SD_SCALE_FACTOR
    norm_groups: int = 32  # GroupNorm groups in UNet and VAE (SD v1: 32; not stored in checkpoints)

    @property
    def latent_channels(self) -> int:
        return self.unet.out_channels  # (an inpainting UNet takes 9 = 4 latent + 1 mask + 4 masked image)

    @property
    def inpainting(self) -> bool:
        """RunwayML's inpainting UNet: [latents, mask, masked-image latents] in (4 + 1 + 4 channels)."""
        return self.unet.in_channels == 2 * self.unet.out_channels + 1

    @property
    def downscale(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE downsamples), 8 for SD v1."""
        return 2 ** (len(self.vae.ch_mult) - 1)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the checkpoint's `model.diffusion_model.` level)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


# Buffers whose values are a pure function of the schedule config; a file's copies are not needed.
SCHEDULE_KEYS = LDM_BUFFER_NAMES


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        with norm_groups(cfg.norm_groups):
            self.model = DiffusionWrapper(UNetModel(cfg.unet))
            self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = FrozenCLIPEmbedder(cfg.text)
        self.reset_schedule()

    def reset_schedule(self) -> None:
        """(Re)compute the schedule buffers from the config, on the CPU in float32 (fp32 always)."""
        s = self.cfg.schedule
        with torch.device("cpu"):  # real values even while the rest of the tree is built on "meta"
            buffers = ldm_buffers(s.linear_start, s.linear_end, s.timesteps)
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32), persistent=True)

    # The three stages, each one call. Shapes for SD v1 at 512x512 and batch B.
    def encode_text(self, ids: torch.Tensor, clip_skip: int = 1, overrides=None) -> torch.Tensor:
        """Token ids (B, 77) -> context (B, 77, 768); clip_skip > 1 stops that many layers early;
        overrides [(row, position, vectors (n, 768))] replace token embeddings (textual inversion)."""
        if clip_skip == 1 and not overrides:
            return self.cond_stage_model(ids)
        return self.cond_stage_model(ids, clip_skip, overrides)

    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, 64, 64), timesteps (B,), context (B, 77, 768) -> eps (B, 4, 64, 64)."""
        return self.model.diffusion_model(x, t, context)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents (B, 4, 64, 64) -> images (B, 3, 512, 512) in about [-1, 1]."""
        vae = self.first_stage_model
        z = latents.to(vae.post_quant_conv.weight.dtype) / self.cfg.scale_factor
        return vae.decode(z)
