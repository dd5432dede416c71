"""What every sampler shares: argument checks, the model call, the k-diffusion denoiser, the sigma plan.

The k-diffusion style samplers (Karras et al. 2022, arXiv:2206.00364) work on the VE variable
x_ve = x_vp / sqrt(a) with noise level sigma. They call the eps-model as k-diffusion's
CompVisDenoiser does: eps = eps_model(x_ve * c_in, t(sigma)), c_in = 1/sqrt(sigma^2 + 1)
(= sqrt(a), which turns x_ve back into the VP input), t(sigma) the fractional timestep from
log-sigma interpolation, and denoised = x_ve - sigma * eps.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from sd_cli.errors import UsageError
from sd_cli.sampling import schedule

EpsModel = Callable[[Tensor, Tensor], Tensor]  # (x (B,C,h,w), t (B,) f32) -> eps (B,C,h,w)
StepCallback = Callable[[int, int, Tensor], None]  # (step index, total steps, x)
# noise_sampler(sigma, sigma_next) -> standard-normal noise shaped like x for the step sigma -> sigma_next
NoiseSampler = Callable[[float, float], Tensor]
Denoiser = Callable[[Tensor, float], Tensor]  # D(x_ve, sigma) -> x_0 estimate


def check_eta(eta: Optional[float], sampler: str, supports_eta: bool) -> float:
    """eta as a float in [0, 1]; None counts as 0.0. Samplers without eta accept only 0."""
    eta = 0.0 if eta is None else float(eta)
    if not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise UsageError(f"eta must be between 0 and 1, got {eta}")
    if eta != 0.0 and not supports_eta:
        raise UsageError(f"sampler {sampler!r} is deterministic and takes no eta (got {eta})")
    return eta


def check_s_noise(s_noise: Optional[float], sampler: str, supports: bool) -> float:
    """s_noise (the factor on every fresh noise draw) as a finite float >= 0; None counts as 1.0.
    Samplers that never draw noise accept only 1.0."""
    s_noise = 1.0 if s_noise is None else float(s_noise)
    if not math.isfinite(s_noise) or s_noise < 0.0:
        raise UsageError(f"s_noise must be a finite number >= 0, got {s_noise}")
    if s_noise != 1.0 and not supports:
        raise UsageError(f"sampler {sampler!r} adds no noise, so it takes no s_noise (got {s_noise})")
    return s_noise


def check_own_grid(scheduler: Optional[str], sampler: str, grid: str) -> None:
    """DDIM, PLMS and LCM run on their own timestep grid: scheduler must be None or that grid's name."""
    if scheduler is not None and scheduler != grid:
        raise UsageError(f"sampler {sampler!r} runs on its own {grid!r} timesteps; it takes no scheduler "
                         f"(got {scheduler!r})")


def check_alphas(alphas_cumprod: Tensor) -> Tensor:
    """The schedule as a CPU float32 (n,) tensor; it must decrease strictly inside (0, 1)."""
    ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32)
    if ac.ndim != 1 or ac.numel() < 2:
        raise ValueError(f"alphas_cumprod must be 1-D (timesteps,), got shape {tuple(ac.shape)}")
    if not (bool((ac > 0).all()) and bool((ac < 1).all()) and bool((ac[1:] < ac[:-1]).all())):
        raise ValueError("alphas_cumprod must decrease strictly and lie inside (0, 1)")
    return ac


def noise_like(x: Tensor, generator) -> Tensor:
    """Standard-normal noise shaped like x: drawn on CPU in float32, then moved to x. `generator` is one
    torch.Generator for the batch, or a list of one per image (row i from generator i, as A1111 draws)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    else:
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return z.to(x.device, x.dtype)


def generator_noise(x: Tensor, generator: Optional[torch.Generator]) -> NoiseSampler:
    """The ancestral samplers' noise: each call the next draw of `generator` (see `noise_like`)."""
    return lambda sigma, sigma_next: noise_like(x, generator)


def evaluate(eps_model: EpsModel, x: Tensor, t: float) -> Tensor:
    """Call the model with t broadcast to a float32 (B,) tensor on x's device."""
    t_vec = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)  # (B,)
    return eps_model(x, t_vec)


def make_denoiser(eps_model: EpsModel, discrete: Tensor) -> Denoiser:
    """D(x_ve, sigma) -> denoised x_0 estimate, via the eps-model (k-diffusion CompVisDenoiser)."""

    def denoise(x: Tensor, sigma: float) -> Tensor:
        t = schedule.sigma_to_t(sigma, discrete).item()  # fractional timestep
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)  # = sqrt(a): VE -> VP input scaling
        eps = evaluate(eps_model, x * c_in, t)
        return x - sigma * eps

    return denoise


def k_plan(
    ac: Tensor, steps: object, scheduler: str, discard_penultimate: bool = False, start: int = 0
) -> tuple[list[float], Tensor]:
    """(sigmas as floats, descending to 0, and the model's discrete sigmas (n,) f32) for a k-sampler.

    steps is checked against the model's n timesteps; scheduler is a `schedule.SCHEDULERS` name.
    For "karras" the list is exactly `schedule.karras_sigmas(steps, sigma_min, sigma_max)`, the
    smallest / largest discrete sigma as in AUTOMATIC1111. `start` > 0 drops the list's first
    `start` steps (image to image: the sampler begins at that noise level).
    """
    steps = schedule.check_steps(steps, ac.numel())
    discrete = schedule.sigmas_from_alphas_cumprod(ac)  # (n,) f32, ascending
    sigmas = schedule.scheduler_sigmas(scheduler, steps, discrete, discard_penultimate).tolist()
    return sigmas[check_start(start, len(sigmas) - 1):], discrete


def check_start(start: object, n_steps: int) -> int:
    """A first step index in [0, n_steps - 1] (at least one step is left to run)."""
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < n_steps:
        raise ValueError(f"start {start!r}: must be a whole number in [0, {n_steps - 1}]")
    return start


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (DDPM's split, k-diffusion get_ancestral_step):
    sigma_next^2 = sigma_down^2 + sigma_up^2 with
    sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up
