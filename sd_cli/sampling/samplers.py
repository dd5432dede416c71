"""Samplers: plain functions with one signature, plus the registry the CLI builds --sampler from.

Every sampler is

    sample_xxx(eps_model, x_T, alphas_cumprod, steps, *, eta=0.0, generator=None, callback=None,
               scheduler=None, s_noise=1.0) -> x_0 latents (B, C, h, w)

* eps_model(x (B,C,h,w), t (B,) float32 timesteps in [0, 999]) -> predicted noise (B,C,h,w):
  the UNet (with classifier-free guidance folded in, see `guidance.guided_eps_model`) in the
  discrete VP parameterization x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.
* x_T: standard-normal noise (B,C,h,w). DDIM/PLMS/LCM use it as x at their first timestep;
  the k-diffusion style samplers scale it by their first sigma themselves.
* alphas_cumprod: the model's (1000,) float32 buffer.
* eta: amount of fresh noise per step (see each sampler; 0.0 always means "the sampler's
  standard behaviour"). Must lie in [0, 1].
* generator: CPU torch.Generator. Fresh noise is drawn on the CPU as float32 and then moved
  to x's device and dtype, so a seed gives the same image on CPU and CUDA. The SDE samplers
  draw from a Brownian tree seeded with generator.initial_seed() instead (`noise.py`).
* callback(i, total, x): after each step; i = 0-based index of the step just finished,
  total = number of steps the sampler runs (DDIM/PLMS and the ddim_uniform scheduler may run
  more than asked, see `schedule.ddim_timesteps`).
* scheduler: the sigma list of a k-diffusion style sampler, a `schedule.SCHEDULERS` name; None =
  the sampler's default (`SamplerInfo.schedule`, A1111's "Automatic"). DDIM, PLMS and LCM run on
  their own grid and accept only None (or that grid's name, "uniform" / "lcm").
* s_noise: factor on every fresh noise draw (A1111's "sigma noise"); 1.0 is the standard amount and
  the only value samplers that draw no noise accept.
* start: image to image. The sampler builds its grid for `steps` as always, skips its first `start`
  steps and runs the rest; x_T is then the latent already noised to the level of grid point `start`,
  in the sampler's own convention (`start_level`): x / sigma for the k-samplers (which multiply by
  their first sigma), x itself for DDIM, PLMS and LCM.
The stochastic k-samplers also take noise_sampler(sigma, sigma_next) -> noise (None = the standard
stream above), Euler/Heun/DPM2 Karras' churn (s_churn, s_tmin, s_tmax), LMS its order and LCM its
original_steps; the CLI needs none of these.

The k-diffusion family lives in `ksamplers.py` (Euler a and DPM++ 2M, the first two, here); see
`common.py` for how they call the eps-model.
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
from sd_cli.sampling.common import (  # noqa: F401  (EpsModel, StepCallback: re-exported)
    EpsModel,
    NoiseSampler,
    StepCallback,
    ancestral_step,
    check_alphas as _check_alphas,
    check_start,
    check_eta as _check_eta,
    check_own_grid,
    check_s_noise,
    evaluate as _eval,
    generator_noise,
    k_plan,
    make_denoiser as _make_denoiser,
    noise_like as _noise_like,
)
from sd_cli.sampling import ksamplers
from sd_cli.sampling import unipc
from sd_cli.sampling.lcm import lcm_timesteps, sample_lcm


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
    scheduler: Optional[str] = None,
    s_noise: float = 1.0,
    start: int = 0,
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
    check_own_grid(scheduler, "ddim", "uniform")
    check_s_noise(s_noise, "ddim", supports=False)
    ac = _check_alphas(alphas_cumprod)
    plan = _discrete_steps(ac, schedule.check_steps(steps, ac.numel()), eta)
    plan = plan[check_start(start, len(plan)):]
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
    scheduler: Optional[str] = None,
    s_noise: float = 1.0,
    start: int = 0,
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
    check_own_grid(scheduler, "plms", "uniform")
    check_s_noise(s_noise, "plms", supports=False)
    del generator  # deterministic: never draws noise
    ac = _check_alphas(alphas_cumprod)
    plan = _discrete_steps(ac, schedule.check_steps(steps, ac.numel()), 0.0)
    plan = plan[check_start(start, len(plan)):]
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


# --- k-diffusion style samplers: the first two (the rest in ksamplers.py) -----------------------


def sample_dpmpp_2m(
    eps_model: EpsModel,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
    scheduler: Optional[str] = None,
    s_noise: float = 1.0,
    start: int = 0,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095, Algorithm 2), k-diffusion variant.

    In lambda = -log(sigma) with step h_i = lambda_{i+1} - lambda_i, each step is the exact
    solution of the data-prediction ODE with the denoised estimate held linear in lambda:
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - sigma_{i+1}/sigma_i) D_i'
    where D_i' = D_i on the first step and the last (sigma = 0, so x = D_i), and otherwise
        D_i' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},   r = h_{i-1} / h_i.
    Deterministic second order; eta must be 0. UNet calls: one per step. Default scheduler karras.
    """
    _check_eta(eta, "dpmpp_2m", supports_eta=False)
    check_s_noise(s_noise, "dpmpp_2m", supports=False)
    del generator
    ac = _check_alphas(alphas_cumprod)
    sigmas, discrete = k_plan(ac, steps, scheduler or "karras", start=start)
    denoise = _make_denoiser(eps_model, discrete)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]  # (B,C,h,w) VE start
    d_prev: Optional[Tensor] = None
    for i in range(n):
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
            callback(i, n, x)
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
    scheduler: Optional[str] = None,
    s_noise: float = 1.0,
    start: int = 0,
    noise_sampler: Optional[NoiseSampler] = None,
) -> Tensor:
    """Euler ancestral (k-diffusion sample_euler_ancestral; Karras et al. 2022 with the DDPM
    ancestral noise split of Ho et al. 2020).

    Each step from sigma to sigma_next splits sigma_next^2 = sigma_down^2 + sigma_up^2 with
        sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    takes an Euler step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma down
    to sigma_down, then adds s_noise * sigma_up * z (no noise on the final step to sigma = 0).

    eta: 0.0 (the shared default) means the standard ancestral amount, 1.0, because "Euler a"
    is ancestral by definition (for eta = 0 use a deterministic sampler); any eta in (0, 1] is
    used as given. UNet calls: one per step. Default scheduler "normal" (A1111's Automatic);
    the registry's legacy name "euler_a" runs it with "karras" (`sample_euler_a`).
    """
    return _euler_ancestral(eps_model, x_T, alphas_cumprod, steps, eta, generator, callback,
                            scheduler or "normal", s_noise, noise_sampler, start)


def sample_euler_a(
    eps_model: EpsModel,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
    scheduler: Optional[str] = None,
    s_noise: float = 1.0,
    start: int = 0,
    noise_sampler: Optional[NoiseSampler] = None,
) -> Tensor:
    """The registry's "euler_a" (images made before the scheduler choice record it): Euler ancestral
    with the Karras sigmas as default, bit for bit what "euler_a" always computed."""
    return _euler_ancestral(eps_model, x_T, alphas_cumprod, steps, eta, generator, callback,
                            scheduler or "karras", s_noise, noise_sampler, start)


def _euler_ancestral(eps_model, x_T, alphas_cumprod, steps, eta, generator, callback, scheduler,
                     s_noise, noise_sampler, start=0) -> Tensor:
    eta = _check_eta(eta, "euler_a", supports_eta=True) or 1.0
    s_noise = check_s_noise(s_noise, "euler_ancestral", supports=True)
    ac = _check_alphas(alphas_cumprod)
    sigmas, discrete = k_plan(ac, steps, scheduler, start=start)
    denoise = _make_denoiser(eps_model, discrete)
    noise = noise_sampler or generator_noise(x_T, generator)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]  # (B,C,h,w) VE start
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        s_down, s_up = ancestral_step(s, s_next, eta)
        x = x + (x - d) / s * (s_down - s)  # Euler step, slope (x - D)/sigma
        if s_next > 0:
            x = x + noise(s, s_next) * s_noise * s_up
        if callback is not None:
            callback(i, n, x)
    return x


# --- registry ------------------------------------------------------------------------------


def _discrete_calls(extra: int) -> Callable[[int], int]:
    return lambda steps: len(schedule.ddim_timesteps(steps)) + extra


NOISE_KINDS = ("none", "ancestral", "brownian")


@dataclass(frozen=True)
class SamplerInfo:
    """One --sampler choice."""

    name: str  # registry key (ComfyUI's KSampler name), e.g. "dpmpp_2m"
    fn: Callable[..., Tensor]  # the sample_xxx function
    label: str  # A1111 display name for metadata, e.g. "Euler a"; the first four keep their old labels
    schedule: str  # default scheduler: a schedule.SCHEDULERS name, or the own grid "uniform" / "lcm"
    supports_eta: bool
    description: str  # one line for --help
    default_eta: float = 0.0  # the eta the sampler uses when given eta=0.0 / None
    a1111_name: str = ""  # A1111's sampler name when label differs ("DPM++ 2M" for "DPM++ 2M Karras")
    noise: str = "none"  # fresh noise: none, ancestral (generator draws each step), brownian (tree)
    supports_s_noise: bool = False  # takes s_noise (A1111's "sigma noise"; Euler/Heun/DPM2 via churn)
    evals: int = 1  # UNet calls per step; the last step (to sigma 0) always takes one
    discard_penultimate: bool = False  # A1111: schedule made for steps + 1, next-to-last sigma dropped
    alias_of: Optional[str] = None  # a legacy name: the same method as that entry, other defaults
    _calls: Optional[Callable[[int], int]] = field(default=None, repr=False, compare=False)

    @property
    def schedulers(self) -> tuple[str, ...]:
        """The scheduler names this sampler accepts (an own-grid sampler: only its grid)."""
        return tuple(schedule.SCHEDULERS) if self.schedule in schedule.SCHEDULERS else (self.schedule,)

    def resolve_scheduler(self, scheduler: Optional[str] = None) -> str:
        """The scheduler the sampler will use for a user value (None = its default); UsageError if
        the sampler does not take it."""
        if scheduler is None:
            return self.schedule
        if self.schedule not in schedule.SCHEDULERS:
            check_own_grid(scheduler, self.name, self.schedule)
            return self.schedule
        return schedule.check_scheduler(scheduler)

    def calls(self, steps: int, scheduler: Optional[str] = None) -> int:
        """UNet evaluations (each one batched call under guidance) for `steps` (1000-step model)."""
        steps = schedule.check_steps(steps)
        sched = self.resolve_scheduler(scheduler)
        if self._calls is not None:
            return self._calls(steps)
        n = schedule.scheduler_length(sched, steps, discard_penultimate=self.discard_penultimate)
        return self.evals * n - (self.evals - 1)

    def resolve_eta(self, eta: Optional[float] = None) -> float:
        """The eta the sampler will actually use for a user value (validates like the sampler)."""
        return _check_eta(eta, self.name, self.supports_eta) or self.default_eta

    def resolve_s_noise(self, s_noise: Optional[float] = None) -> float:
        """The s_noise the sampler will use (None = 1.0); UsageError where the sampler has none."""
        return check_s_noise(s_noise, self.name, self.supports_s_noise)


def _k(name, fn, label, sched, description, *, noise="none", evals=1, discard=False, **kw):
    """A k-diffusion family entry: stochastic ones take eta (standard 1.0) and s_noise."""
    stochastic = noise != "none"
    return SamplerInfo(name=name, fn=fn, label=label, schedule=sched, supports_eta=stochastic,
                       description=description, default_eta=1.0 if stochastic else 0.0, noise=noise,
                       supports_s_noise=stochastic or name in ("euler", "heun", "dpm_2"), evals=evals,
                       discard_penultimate=discard, **kw)


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
            noise="ancestral",
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
        _k("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M Karras", "karras",
           "DPM-Solver++(2M); deterministic, good at 20-30 steps (default scheduler karras)",
           a1111_name="DPM++ 2M"),
        _k("euler_a", sample_euler_a, "Euler a", "karras",
           "euler_ancestral with karras as default scheduler (the older name, which older images record)",
           noise="ancestral", alias_of="euler_ancestral"),
        _k("euler", ksamplers.sample_euler, "Euler", "normal",
           "Euler, first order; deterministic (default scheduler normal)"),
        _k("euler_ancestral", sample_euler_ancestral, "Euler a", "normal",
           "Euler ancestral: fresh noise every step, eta 1 (default scheduler normal)", noise="ancestral"),
        _k("heun", ksamplers.sample_heun, "Heun", "normal",
           "Heun, second order, 2 UNet calls a step; deterministic (default scheduler normal)", evals=2),
        _k("dpm_2", ksamplers.sample_dpm_2, "DPM2", "karras",
           "DPM2 midpoint, second order, 2 UNet calls a step; deterministic (default karras)",
           evals=2, discard=True),
        _k("dpm_2_ancestral", ksamplers.sample_dpm_2_ancestral, "DPM2 a", "karras",
           "DPM2 ancestral, 2 UNet calls a step, fresh noise every step (default karras)",
           noise="ancestral", evals=2, discard=True),
        _k("lms", ksamplers.sample_lms, "LMS", "normal",
           "linear multistep, order 4; deterministic (default scheduler normal)"),
        _k("dpmpp_2s_ancestral", ksamplers.sample_dpmpp_2s_ancestral, "DPM++ 2S a", "karras",
           "DPM-Solver++(2S) ancestral, 2 UNet calls a step (default scheduler karras)",
           noise="ancestral", evals=2),
        _k("dpmpp_sde", ksamplers.sample_dpmpp_sde, "DPM++ SDE", "karras",
           "DPM-Solver++ SDE, 2 UNet calls a step, Brownian-tree noise (default karras)",
           noise="brownian", evals=2),
        _k("dpmpp_2m_sde", ksamplers.sample_dpmpp_2m_sde, "DPM++ 2M SDE", "exponential",
           "DPM-Solver++(2M) SDE, midpoint; Brownian-tree noise (default scheduler exponential)",
           noise="brownian"),
        _k("dpmpp_3m_sde", ksamplers.sample_dpmpp_3m_sde, "DPM++ 3M SDE", "exponential",
           "DPM-Solver++(3M) SDE; Brownian-tree noise (default scheduler exponential)",
           noise="brownian", discard=True),
        SamplerInfo(
            name="lcm",
            fn=sample_lcm,
            label="LCM",
            schedule="lcm",
            supports_eta=False,
            description="LCM for LCM-distilled weights (LCM-LoRA), 4-8 steps, at most 50; re-noises every step",
            noise="ancestral",
            _calls=lambda steps: len(lcm_timesteps(steps)),
        ),
        # UniPC: A1111 runs it on its own time-uniform grid (linspace(999, 0, steps + 1) in t, ending at
        # t = 0); sgm_uniform has the same first `steps` points and ends in 0 (which UniPC moves to 0.001).
        _k("uni_pc", unipc.sample_uni_pc, "UniPC", unipc.DEFAULT_SCHEDULER,
           "UniPC bh1, order 3 predictor-corrector (ComfyUI uni_pc, A1111 UniPC); deterministic "
           "(default sgm_uniform, the nearest to A1111's time-uniform grid)"),
        _k("uni_pc_bh2", unipc.sample_uni_pc_bh2, "UniPC", unipc.DEFAULT_SCHEDULER,
           "UniPC bh2, B(h) = expm1(h) (ComfyUI uni_pc_bh2); deterministic (default sgm_uniform)"),
    )
}


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry for `name`; UsageError listing the valid names otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        valid = ", ".join(SAMPLERS)
        raise UsageError(f"unknown sampler {name!r}; choose one of: {valid}") from None


# --- image to image: where a sampler starts for a given strength ---------------------------------


def denoising_steps(strength: float, steps: int) -> int:
    """CompVis' t_enc = int(strength x steps): how many of the grid's steps image to image runs."""
    return int(strength * steps)


def img2img_start(info: SamplerInfo, x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, steps: int,
                  scheduler: Optional[str], t_enc: int) -> tuple[Tensor, int]:
    """(x_T, start) for `info.fn(..., start=start)` so that it denoises the init latents x0 (B,4,h,w)
    from the noise level matching t_enc, with `noise` (B,4,h,w) as the added noise (0 < t_enc < grid).

    * ddim, plms (CompVis scripts/img2img.py: stochastic_encode to DDIM grid point t_enc, then decode
      over the t_enc grid points below it): x_T = sqrt(a) x0 + sqrt(1 - a) noise at grid point t_enc
      (counted from the bottom), then the last t_enc steps.
    * lcm: the same noising at its timestep t_enc from the bottom, then the last t_enc steps.
    * k-samplers (A1111's img2img): the sigma list for `steps`, from index n - t_enc - 1 (n = its steps):
      x = x0 + sigma noise there, then the remaining t_enc + 1 steps; x_T = x / sigma, since a
      k-sampler multiplies x_T by its first sigma.
    """
    ac = _check_alphas(alphas_cumprod)
    steps = schedule.check_steps(steps, ac.numel())
    if info.schedule == "uniform":
        plan = _discrete_steps(ac, steps, 0.0)  # descending; plan[k] is grid point n - 1 - k
        start = len(plan) - t_enc
        level = plan[check_start(start - 1, len(plan))]
        return level.sqrt_a * x0 + level.sqrt_one_minus_a * noise, start
    if info.schedule == "lcm":
        ts = lcm_timesteps(steps, ac.numel())
        start = check_start(len(ts) - t_enc, len(ts))
        a = float(ac.double()[ts[start]])
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise, start
    sigmas, _ = k_plan(ac, steps, info.resolve_scheduler(scheduler), info.discard_penultimate)
    start = check_start(max(len(sigmas) - 1 - t_enc - 1, 0), len(sigmas) - 1)
    return x0 / sigmas[start] + noise, start
