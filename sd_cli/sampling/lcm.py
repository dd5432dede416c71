"""LCM: the few-step sampler of Latent Consistency Models (Luo et al. 2023, arXiv:2310.04378), as
diffusers' LCMScheduler computes it (the reference of tests/test_samplers_kdiffusion.py).

Timesteps (LCM's choice): with k = n // original_steps the distillation grid is k-1, 2k-1, ..., n-1
(19, 39, ..., 999 for the usual original_steps = 50); from its top, `steps` entries at the indices
floor(i * original_steps / steps), i = 0..steps-1 (4 steps: 999, 759, 499, 259).

Each step at timestep t (a = alphas_cumprod[t]), in the VP variable:
    x0   = (x - sqrt(1 - a) eps(x, t)) / sqrt(a)
    den  = c_out(t) x0 + c_skip(t) x,   c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2)
           (LCM's boundary condition, timestep_scaling 10, sigma_data s = 0.5)
    x    = sqrt(a') den + sqrt(1 - a') z   (a' at the next timestep; z the generator's next draw)
and the last step returns den. One UNet call per step; the noise follows the start noise in the
image's generator, drawn on the CPU in float32 (as diffusers' randn_tensor with a CPU generator).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from sd_cli.errors import UsageError
from sd_cli.sampling import schedule
from sd_cli.sampling.common import (
    EpsModel,
    StepCallback,
    check_alphas,
    check_start,
    check_eta,
    check_own_grid,
    check_s_noise,
    evaluate,
    noise_like,
)

ORIGINAL_STEPS = 50  # LCM's distillation schedule length (diffusers' original_inference_steps)
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def lcm_timesteps(steps: int, n: int = schedule.NUM_TIMESTEPS, original_steps: int = ORIGINAL_STEPS) -> list[int]:
    """LCM's inference timesteps, descending (diffusers LCMScheduler.set_timesteps, strength 1)."""
    if isinstance(original_steps, bool) or not isinstance(original_steps, int) or not 1 <= original_steps <= n:
        raise UsageError(f"LCM's original steps must be a whole number in [1, {n}], got {original_steps!r}")
    steps = schedule.check_steps(steps, n=None)
    if steps > original_steps:
        raise UsageError(f"lcm takes at most {original_steps} steps (its distillation grid), got {steps}")
    k = n // original_steps
    grid = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # 999, 979, ..., 19
    idx = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[idx]]


def _boundary(t: int) -> tuple[float, float]:
    """(c_skip, c_out) of LCM's consistency boundary condition at timestep t."""
    st = t * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2), st / math.sqrt(st**2 + SIGMA_DATA**2)


def sample_lcm(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
               eta: float = 0.0, generator: Optional[torch.Generator] = None,
               callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
               s_noise: float = 1.0, start: int = 0, original_steps: int = ORIGINAL_STEPS) -> Tensor:
    """LCM multistep sampling (module docstring). For LCM-distilled weights (an LCM-LoRA merged into
    the UNet), usually 4-8 steps at guidance 1-2; any other model gives blurry images. eta must
    be 0 (LCM always re-noises fully); scheduler None or "lcm"; s_noise 1."""
    check_eta(eta, "lcm", supports_eta=False)
    check_own_grid(scheduler, "lcm", "lcm")
    check_s_noise(s_noise, "lcm", supports=False)
    ac = check_alphas(alphas_cumprod)
    ts = lcm_timesteps(schedule.check_steps(steps, ac.numel()), ac.numel(), original_steps)
    ts = ts[check_start(start, len(ts)):]
    a = ac.double()
    x = x_T
    for i, t in enumerate(ts):
        eps = evaluate(eps_model, x, t)
        a_t = a[t].item()
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        c_skip, c_out = _boundary(t)
        den = c_out * x0 + c_skip * x
        if i + 1 < len(ts):
            a_next = a[ts[i + 1]].item()
            x = math.sqrt(a_next) * den + math.sqrt(1 - a_next) * noise_like(x, generator)
        else:
            x = den
        if callback is not None:
            callback(i, len(ts), x)
    return x
