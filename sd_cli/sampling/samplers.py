"""Samplers: plain functions with one signature, plus the registry the CLI builds --sampler from.

Every sampler is

    sample_xxx(eps_model, x_T, alphas_cumprod, steps, *, eta=0.0, generator=None, callback=None)
        -> x_0 latents (B, C, h, w)

* eps_model(x (B,C,h,w), t (B,) float32 timesteps in [0, 999]) -> predicted noise (B,C,h,w):
  the UNet (with classifier-free guidance folded in, see `guidance.guided_eps_model`) in the
  discrete VP parameterization x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.
* x_T: standard-normal noise (B,C,h,w). DDIM/PLMS use it as x at their first timestep;
  the k-diffusion style samplers scale it by sigma_max themselves.
* alphas_cumprod: the model's (1000,) float32 buffer.
* eta: amount of fresh noise per step (see each sampler; 0.0 always means "the sampler's
  standard behaviour"). Must lie in [0, 1].
* generator: CPU torch.Generator. Fresh noise is drawn on the CPU as float32 and then moved
  to x's device and dtype, so a seed gives the same image on CPU and CUDA.
* callback(i, total, x): after each step; i = 0-based index of the step just finished,
  total = number of steps the sampler runs (DDIM/PLMS may run more than asked, see
  `schedule.ddim_timesteps`).

The k-diffusion style samplers (Karras et al. 2022, arXiv:2206.00364) work on the VE variable
x_ve = x_vp / sqrt(a) with noise level sigma. They call the eps-model as k-diffusion's
CompVisDenoiser does: eps = eps_model(x_ve * c_in, t(sigma)), c_in = 1/sqrt(sigma^2 + 1)
(= sqrt(a), which turns x_ve back into the VP input), t(sigma) the fractional timestep from
log-sigma interpolation, and denoised = x_ve - sigma * eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from sd_cli.sampling import schedule
from sd_cli.errors import UsageError

EpsModel = Callable[[Tensor, Tensor], Tensor]  # (x (B,C,h,w), t (B,) f32) -> eps (B,C,h,w)
StepCallback = Callable[[int, int, Tensor], None]  # (step index, total steps, x)


# --- shared helpers -------------------------------------------------------------------------


def _check_eta(eta: Optional[float], sampler: str, supports_eta: bool) -> float:
    """eta as a float in [0, 1]; None counts as 0.0. Samplers without eta accept only 0."""
    eta = 0.0 if eta is None else float(eta)
    if not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise UsageError(f"eta must be between 0 and 1, got {eta}")
    if eta != 0.0 and not supports_eta:
        raise UsageError(f"sampler {sampler!r} is deterministic and takes no eta (got {eta})")
    return eta


def _check_alphas(alphas_cumprod: Tensor) -> Tensor:
    """The schedule as a CPU float32 (n,) tensor; it must decrease strictly inside (0, 1)."""
    ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32)
    if ac.ndim != 1 or ac.numel() < 2:
        raise ValueError(f"alphas_cumprod must be 1-D (timesteps,), got shape {tuple(ac.shape)}")
    if not (bool((ac > 0).all()) and bool((ac < 1).all()) and bool((ac[1:] < ac[:-1]).all())):
        raise ValueError("alphas_cumprod must decrease strictly and lie inside (0, 1)")
    return ac


def _noise_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard-normal noise shaped like x: drawn on CPU in float32, then moved to x."""
    z = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return z.to(x.device, x.dtype)


def _eval(eps_model: EpsModel, x: Tensor, t: float) -> Tensor:
    """Call the model with t broadcast to a float32 (B,) tensor on x's device."""
    t_vec = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)  # (B,)
    return eps_model(x, t_vec)


# --- DDIM and PLMS (CompVis discrete timesteps) ----------------------------------------------


@dataclass(frozen=True)
class _DiscreteStep:
    """Scalars of one DDIM/PLMS step from timestep t down to the previous grid point.

    All are float32 values computed in the same precision CompVis uses (DDIMSampler.make_schedule
    plus the torch.full float32 tensors of p_sample_ddim), so results agree to fp32 rounding.
    The square roots here are correctly rounded (numpy) and so the same on every device;
    CompVis takes them with torch on the device, which on some CPU builds is 1 ulp off.
    """

    t: int  # timestep fed to the model
    sqrt_one_minus_a: float  # sqrt(1 - a_t)
    sqrt_a: float  # sqrt(a_t)
    sqrt_a_prev: float  # sqrt(a_prev)
    dir_coef: float  # sqrt(1 - a_prev - sigma_t^2): weight of eps in the "direction to x_t"
    sigma: float  # eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev)), DDIM eq. 16


def _discrete_steps(ac: Tensor, steps: int, eta: float) -> list[_DiscreteStep]:
    """Per-step scalars in sampling order (highest timestep first)."""
    ts = schedule.ddim_timesteps(steps, ac.numel())  # ascending, e.g. [1, 21, ..., 981]
    ac32 = ac.numpy()  # (n,) f32
    a = ac32[ts]  # (S,) f32  a_t at each grid point
    a_prev = np.concatenate([ac32[:1], a[:-1]])  # (S,) f32  next lower grid point, ac[0] at the end
    one = np.float32(1.0)
    # CompVis: float64 except (1 - alphas), which is done on the float32 tensor.
    sig = eta * np.sqrt(
        (1.0 - a_prev.astype(np.float64))
        / (one - a).astype(np.float64)
        * (1.0 - a.astype(np.float64) / a_prev.astype(np.float64))
    )
    sig32 = sig.astype(np.float32)
    out = []
    for i in range(len(ts)):
        out.append(
            _DiscreteStep(
                t=int(ts[i]),
                sqrt_one_minus_a=float(np.sqrt(one - a[i])),
                sqrt_a=float(np.sqrt(a[i])),
                sqrt_a_prev=float(np.sqrt(a_prev[i])),
                dir_coef=float(np.sqrt(one - a_prev[i] - sig32[i] * sig32[i])),
                sigma=float(sig32[i]),
            )
        )
    return out[::-1]


def _ddim_update(x: Tensor, eps: Tensor, st: _DiscreteStep, noise: Optional[Tensor]) -> Tensor:
    """One DDIM step (Song et al. 2020, eq. 12), same operation order as CompVis p_sample_ddim."""
    pred_x0 = (x - st.sqrt_one_minus_a * eps) / st.sqrt_a  # predicted x_0 (B,C,h,w)
    dir_xt = st.dir_coef * eps  # direction pointing to x_t
    x_prev = st.sqrt_a_prev * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + st.sigma * noise
    return x_prev


def sample_ddim(
    eps_model: EpsModel,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """DDIM, Song, Meng & Ermon 2020 (arXiv:2010.02502), as CompVis DDIMSampler ("uniform").

    Grid: `schedule.ddim_timesteps(steps)`; walks it from the top. Each step with a = a_t and
    a_prev = a at the next lower grid point (a_0 = alphas_cumprod[0] after the last):
        pred_x0 = (x - sqrt(1 - a) eps) / sqrt(a)
        x_prev  = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    eta = 0: deterministic (probability-flow ODE, first order); eta = 1: DDPM-like ancestral.
    UNet calls: one per step.
    """
    eta = _check_eta(eta, "ddim", supports_eta=True)
    ac = _check_alphas(alphas_cumprod)
    plan = _discrete_steps(ac, schedule.check_steps(steps, ac.numel()), eta)
    x = x_T
    for i, st in enumerate(plan):
        eps = _eval(eps_model, x, st.t)
        noise = _noise_like(x, generator) if eta > 0 else None
        x = _ddim_update(x, eps, st, noise)
        if callback is not None:
            callback(i, len(plan), x)
    return x


def sample_plms(
    eps_model: EpsModel,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """PLMS / PNDM, Liu et al. 2022 (arXiv:2202.09778), as CompVis PLMSSampler.

    Same grid and DDIM transfer step as `sample_ddim` (eta must be 0), but the eps fed to the
    transfer is a linear multistep combination of the model's eps at the current and earlier
    grid points:
        1st step: pseudo improved Euler - DDIM step with e_t, one more model call at the next
                  lower grid point (the current one on the last step), then the average;
        2nd: (3 e_t - e_1) / 2;  3rd: (23 e_t - 16 e_1 + 5 e_2) / 12;
        then (55 e_t - 59 e_1 + 37 e_2 - 9 e_3) / 24   (Adams-Bashforth 2/3/4, e_k = k steps ago).
    UNet calls: steps + 1 (the grid length + 1).

    Accuracy (tests/test_samplers.py): about 6x closer to the exact ODE endpoint than DDIM at
    50 steps, but only ~2nd order asymptotically (the multistep weights average eps uniformly
    in t while the transfer integrates it over sigma), and the last step, t=1 -> a_0, is one
    timestep long instead of 1000//steps, which leaves an O(1/steps) term beyond ~100 steps.
    """
    _check_eta(eta, "plms", supports_eta=False)
    del generator  # deterministic: never draws noise
    ac = _check_alphas(alphas_cumprod)
    plan = _discrete_steps(ac, schedule.check_steps(steps, ac.numel()), 0.0)
    x = x_T
    history: list[Tensor] = []  # eps of earlier steps, oldest first, at most 3
    for i, st in enumerate(plan):
        e_t = _eval(eps_model, x, st.t)
        if not history:
            t_next = plan[min(i + 1, len(plan) - 1)].t
            x_trial = _ddim_update(x, e_t, st, None)
            e_mix = (e_t + _eval(eps_model, x_trial, t_next)) / 2
        elif len(history) == 1:
            e_mix = (3 * e_t - history[-1]) / 2
        elif len(history) == 2:
            e_mix = (23 * e_t - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            e_mix = (55 * e_t - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        x = _ddim_update(x, e_mix, st, None)
        history = (history + [e_t])[-3:]
        if callback is not None:
            callback(i, len(plan), x)
    return x


# --- k-diffusion style samplers (Karras sigmas) ---------------------------------------------


def _karras_plan(ac: Tensor, steps: int) -> tuple[list[float], Tensor]:
    """(Karras sigmas as floats, descending to 0, (steps+1,)) and the discrete sigmas (n,) f32.

    sigma_min / sigma_max are the smallest / largest discrete sigmas, as in AUTOMATIC1111.
    """
    discrete = schedule.sigmas_from_alphas_cumprod(ac)  # (n,) f32, ascending
    grid = schedule.karras_sigmas(steps, discrete[0].item(), discrete[-1].item())
    return grid.tolist(), discrete


def _make_denoiser(eps_model: EpsModel, discrete: Tensor) -> Callable[[Tensor, float], Tensor]:
    """D(x_ve, sigma) -> denoised x_0 estimate, via the eps-model (k-diffusion CompVisDenoiser)."""

    def denoise(x: Tensor, sigma: float) -> Tensor:
        t = schedule.sigma_to_t(sigma, discrete).item()  # fractional timestep
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)  # = sqrt(a): VE -> VP input scaling
        eps = _eval(eps_model, x * c_in, t)
        return x - sigma * eps

    return denoise


def sample_dpmpp_2m(
    eps_model: EpsModel,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095, Algorithm 2), k-diffusion variant.

    In lambda = -log(sigma) with step h_i = lambda_{i+1} - lambda_i, each step is the exact
    solution of the data-prediction ODE with the denoised estimate held linear in lambda:
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - sigma_{i+1}/sigma_i) D_i'
    where D_i' = D_i on the first step and the last (sigma = 0, so x = D_i), and otherwise
        D_i' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},   r = h_{i-1} / h_i.
    Deterministic second order; eta must be 0. UNet calls: one per step.
    """
    _check_eta(eta, "dpmpp_2m", supports_eta=False)
    del generator
    ac = _check_alphas(alphas_cumprod)
    sigmas, discrete = _karras_plan(ac, schedule.check_steps(steps, ac.numel()))
    denoise = _make_denoiser(eps_model, discrete)
    x = x_T * sigmas[0]  # (B,C,h,w) VE start
    d_prev: Optional[Tensor] = None
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        if s_next == 0.0:
            x = d
        else:
            h = math.log(s / s_next)
            d_used = d
            if d_prev is not None:
                r = math.log(sigmas[i - 1] / s) / h
                d_used = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
            x = (s_next / s) * x - math.expm1(-h) * d_used
        d_prev = d
        if callback is not None:
            callback(i, steps, x)
    return x


def sample_euler_ancestral(
    eps_model: EpsModel,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """Euler ancestral (k-diffusion sample_euler_ancestral; Karras et al. 2022 with the DDPM
    ancestral noise split of Ho et al. 2020).

    Each step from sigma to sigma_next splits sigma_next^2 = sigma_down^2 + sigma_up^2 with
        sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    takes an Euler step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma down
    to sigma_down, then adds sigma_up * z (no noise on the final step to sigma = 0).

    eta: 0.0 (the shared default) means the standard ancestral amount, 1.0, because "Euler a"
    is ancestral by definition (for eta = 0 use a deterministic sampler); any eta in (0, 1] is
    used as given. UNet calls: one per step.
    """
    eta = _check_eta(eta, "euler_a", supports_eta=True) or 1.0
    ac = _check_alphas(alphas_cumprod)
    sigmas, discrete = _karras_plan(ac, schedule.check_steps(steps, ac.numel()))
    denoise = _make_denoiser(eps_model, discrete)
    x = x_T * sigmas[0]  # (B,C,h,w) VE start
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        s_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        s_down = math.sqrt(s_next**2 - s_up**2)
        x = x + (x - d) / s * (s_down - s)  # Euler step, slope (x - D)/sigma
        if s_next > 0:
            x = x + _noise_like(x, generator) * s_up
        if callback is not None:
            callback(i, steps, x)
    return x


# --- registry ------------------------------------------------------------------------------


def _discrete_calls(extra: int) -> Callable[[int], int]:
    return lambda steps: len(schedule.ddim_timesteps(steps)) + extra


@dataclass(frozen=True)
class SamplerInfo:
    """One --sampler choice."""

    name: str  # registry key, e.g. "dpmpp_2m"
    fn: Callable[..., Tensor]  # the sample_xxx function
    label: str  # AUTOMATIC1111-style name for metadata, e.g. "DPM++ 2M Karras", "Euler a"
    schedule: str  # "uniform" (CompVis discrete timesteps) or "karras"
    supports_eta: bool
    description: str  # one line for --help
    default_eta: float = 0.0  # the eta the sampler uses when given eta=0.0 / None
    _calls: Callable[[int], int] = field(default=lambda steps: steps, repr=False, compare=False)

    def calls(self, steps: int) -> int:
        """UNet evaluations (each one batched call under guidance) for `steps` (1000-step model)."""
        return self._calls(schedule.check_steps(steps))

    def resolve_eta(self, eta: Optional[float] = None) -> float:
        """The eta the sampler will actually use for a user value (validates like the sampler)."""
        return _check_eta(eta, self.name, self.supports_eta) or self.default_eta


SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo(
            name="ddim",
            fn=sample_ddim,
            label="DDIM",
            schedule="uniform",
            supports_eta=True,
            description="DDIM (CompVis); deterministic at eta 0, adds noise for eta > 0",
            _calls=_discrete_calls(0),
        ),
        SamplerInfo(
            name="plms",
            fn=sample_plms,
            label="PLMS",
            schedule="uniform",
            supports_eta=False,
            description="PLMS (CompVis) 4th-order linear multistep; deterministic",
            _calls=_discrete_calls(1),
        ),
        SamplerInfo(
            name="dpmpp_2m",
            fn=sample_dpmpp_2m,
            label="DPM++ 2M Karras",
            schedule="karras",
            supports_eta=False,
            description="DPM-Solver++(2M), Karras sigmas; deterministic, good at 20-30 steps",
        ),
        SamplerInfo(
            name="euler_a",
            fn=sample_euler_ancestral,
            label="Euler a",
            schedule="karras",
            supports_eta=True,
            description="Euler ancestral, Karras sigmas; adds fresh noise every step (eta 1)",
            default_eta=1.0,
        ),
    )
}


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry for `name`; UsageError listing the valid names otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        valid = ", ".join(SAMPLERS)
        raise UsageError(f"unknown sampler {name!r}; choose one of: {valid}") from None
