"""Inpainting with an ordinary SD checkpoint, as A1111's img2img inpaint ("original" and "latent noise"
fills, whole picture):

1. The mask (white: repaint) is blurred (Gaussian, `mask_blur` px) and resized to the latents; rounded,
   it says per latent cell what is repainted (`latent_mask`, (1, 1, h, w), 1 = repaint).
2. While sampling, every denoised estimate x0 keeps the init latents where the mask keeps
   (`masked_eps_model`): x0 <- init * keep + x0 * repaint, turned back into the eps the sampler asked
   for. For the k-samplers this is A1111's blend of `denoised`; DDIM/PLMS/LCM see the same x0.
3. After sampling the latents are blended once more the same way, and after decoding the kept pixels of
   the init image are pasted back through the blurred mask (A1111's overlay), so the kept region is the
   original picture exactly, away from the blurred edge.
"""

from __future__ import annotations

import numpy as np
import torch

from sd_cli.sampling import schedule

FILLS = ("original", "latent noise", "latent nothing")


def blurred(mask: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) uint8 mask blurred with a Gaussian of `radius` px (0: as it is)."""
    if radius <= 0:
        return mask
    from PIL import Image, ImageFilter

    return np.asarray(Image.fromarray(mask, "L").filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)


def latent_mask(mask: np.ndarray, factor: int) -> torch.Tensor:
    """(1, 1, H/f, W/f) float32, 1 where the latent cell is repainted (the blurred mask resized, rounded)."""
    from PIL import Image

    h, w = mask.shape
    small = Image.fromarray(mask, "L").resize((w // factor, h // factor), Image.BICUBIC)
    return torch.from_numpy(np.around(np.asarray(small, dtype=np.float32) / 255.0))[None, None]


def filled(init: torch.Tensor, repaint: torch.Tensor, fill: str, noise: torch.Tensor) -> torch.Tensor:
    """The init latents with the repainted cells as the fill says: kept (original), the start noise
    (latent noise) or zeros (latent nothing)."""
    if fill == "original":
        return init
    other = noise if fill == "latent noise" else torch.zeros_like(init)
    return init * (1 - repaint) + other.to(init) * repaint


def masked_eps_model(eps_model, init: torch.Tensor, repaint: torch.Tensor, alphas_cumprod: torch.Tensor):
    """The eps-model whose x0 estimate is the init latents (B, 4, h, w) wherever `repaint` (1, 1, h, w)
    is 0: x0 = (x - sqrt(1-a) eps) / sqrt(a), blended, and eps = (x - sqrt(a) x0') / sqrt(1-a), with a
    at the (possibly fractional) timestep t."""
    discrete = schedule.sigmas_from_alphas_cumprod(alphas_cumprod)
    keep = 1 - repaint

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = eps_model(x, t)
        sigma = schedule.t_to_sigma(t.detach().cpu(), discrete)  # (B,) float64
        a = (1.0 / (1.0 + sigma**2)).to(x.device, torch.float32).view(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        x0 = init * keep + x0 * repaint
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


def paste_back(images: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Generated (B, H, W, 3) uint8 with the original (H, W, 3) pasted over it where the blurred mask
    (H, W) keeps: out = gen * m + orig * (1 - m), m = mask / 255, rounded."""
    m = (mask.astype(np.float32) / 255.0)[None, :, :, None]
    out = images.astype(np.float32) * m + original[None].astype(np.float32) * (1 - m)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def concat_conditioning(pipe, image: np.ndarray | None, mask: np.ndarray | None, batch: int,
                        latent_size: tuple[int, int]) -> torch.Tensor:
    """An inpainting UNet's extra input (B, 5, h, w), RunwayML's order: [mask (1 = repaint), latents of
    the image with the repainted part set to 0 in [-1, 1] (grey)]. No image: all repainted, a grey
    image (what txt2img with such a model uses, as A1111 and diffusers do). `mask`: (H, W) uint8, the
    blurred mask, rounded at 128 as A1111 does."""
    import torch.nn.functional as F

    h, w = latent_size
    f = pipe.model.cfg.downscale  # pixels per latent cell
    if image is None:
        masked = torch.zeros(1, 3, h * f, w * f)
        keep = torch.zeros(1, 1, h * f, w * f)
    else:
        keep = torch.from_numpy((mask < 128).astype(np.float32))[None, None]  # (1, 1, H, W)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1
        masked = x * keep
    latents = pipe.encode_pixels(masked)  # (1, 4, h, w)
    small = F.interpolate(1 - keep, size=(h, w))  # (1, 1, h, w), nearest
    return torch.cat([small.to(latents), latents], dim=1).expand(batch, -1, -1, -1)
