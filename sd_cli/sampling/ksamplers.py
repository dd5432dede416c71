"""The k-diffusion family (Karras et al. 2022; Lu et al. 2022): plain functions with the registry's signature.

Every function here is

    sample_xxx(eps_model, x_T, alphas_cumprod, steps, *, eta=0.0, generator=None, callback=None,
               scheduler=None, s_noise=1.0, noise_sampler=None) -> x_0 latents (B, C, h, w)

with the arguments of `samplers.py` plus
* scheduler: a `schedule.SCHEDULERS` name for the sigma list; None = the sampler's default (its
  registry entry's `schedule`, A1111's "Automatic").
* s_noise: factor on every fresh noise draw (A1111's "sigma noise"), 1.0 = the standard amount.
* noise_sampler(sigma, sigma_next) -> standard-normal noise like x, for the stochastic samplers;
  None = the standard stream: the generator's next draw (ancestral samplers, after the start noise)
  or the Brownian tree seeded with generator.initial_seed() (SDE samplers, see `noise.py`).
Deterministic samplers take eta 0 only; for the stochastic ones eta = 0.0 (the shared default)
means their standard eta 1.0, as for Euler a.

Each sampler starts from x = x_T * sigmas[0] (VE) and walks the sigma list; D(x, sigma) is the
denoiser of `common.make_denoiser`, d = (x - D) / sigma the slope of the probability-flow ODE
dx/dsigma = d. The last step (to sigma = 0) of every sampler but LMS returns D at the last
nonzero sigma (an Euler step to 0).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from numpy.polynomial import polynomial as P

from sd_cli.sampling.common import (
    EpsModel,
    NoiseSampler,
    StepCallback,
    ancestral_step,
    check_alphas,
    check_eta,
    check_s_noise,
    generator_noise,
    k_plan,
    make_denoiser,
    noise_like,
)
from sd_cli.sampling.noise import BrownianNoise, seed_of

SQRT2_M1 = math.sqrt(2.0) - 1.0  # Karras' cap on the churn factor gamma


def _setup(alphas_cumprod, steps, scheduler, default, discard=False, start=0):
    """(sigmas as floats, discrete sigmas): checks alphas and steps; scheduler None = `default`; the
    list begins at step `start` (image to image)."""
    ac = check_alphas(alphas_cumprod)
    return k_plan(ac, steps, scheduler or default, discard, start)


# --- deterministic (churn aside): Euler, Heun, DPM2, LMS ------------------------------------


def _churn(x, sigma, n_steps, generator, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Algorithm 2 "churn": raise sigma to sigma_hat = sigma (1 + gamma) by adding
    noise of std sqrt(sigma_hat^2 - sigma^2). gamma = min(s_churn / n_steps, sqrt 2 - 1) inside
    [s_tmin, s_tmax], else 0. With s_churn > 0 a draw is taken every step (as k-diffusion)."""
    if s_churn <= 0:
        return x, sigma
    gamma = min(s_churn / n_steps, SQRT2_M1) if s_tmin <= sigma <= s_tmax else 0.0
    z = noise_like(x, generator) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + z * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def _check_churn(s_churn, s_tmin, s_tmax):
    from sd_cli.errors import UsageError

    vals = (float(s_churn), float(s_tmin), float(s_tmax))
    if not (math.isfinite(vals[0]) and vals[0] >= 0 and vals[1] >= 0 and vals[2] >= vals[1]):
        raise UsageError(f"need s_churn >= 0 and 0 <= s_tmin <= s_tmax, got {vals}")
    return vals


def _deterministic_loop(name, method, eps_model, x_T, alphas_cumprod, steps, eta, generator, callback,
                        scheduler, s_noise, churn, default, discard=False, start=0):
    """The shared loop of Euler, Heun and DPM2: churn, then `method(x, sigma_hat, sigma_next, D, d)`."""
    check_eta(eta, name, supports_eta=False)
    s_noise = check_s_noise(s_noise, name, supports=True)
    s_churn, s_tmin, s_tmax = _check_churn(*churn)
    sigmas, discrete = _setup(alphas_cumprod, steps, scheduler, default, discard, start)
    denoise = make_denoiser(eps_model, discrete)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]
    for i in range(n):
        x, s_hat = _churn(x, sigmas[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        d = (x - denoise(x, s_hat)) / s_hat
        x = method(x, s_hat, sigmas[i + 1], denoise, d)
        if callback is not None:
            callback(i, n, x)
    return x


def _euler_step(x, s, s_next, denoise, d):
    return x + d * (s_next - s)


def _heun_step(x, s, s_next, denoise, d):
    """Heun (trapezoid) on the ODE; an Euler step when s_next = 0."""
    dt = s_next - s
    if s_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = (x_2 - denoise(x_2, s_next)) / s_next
    return x + (d + d_2) / 2 * dt


def _dpm2_step(x, s, s_next, denoise, d):
    """DPM-Solver-2 flavour (k-diffusion): slope at the log-midpoint sigma_mid = sqrt(s s_next)."""
    if s_next == 0:
        return x + d * (s_next - s)
    s_mid = math.exp(math.log(s) + 0.5 * (math.log(s_next) - math.log(s)))
    x_2 = x + d * (s_mid - s)
    d_2 = (x_2 - denoise(x_2, s_mid)) / s_mid
    return x + d_2 * (s_next - s)


def sample_euler(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                 eta: float = 0.0, generator: Optional[torch.Generator] = None,
                 callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                 s_noise: float = 1.0, start: int = 0, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the Heun
    correction): x += d (sigma_next - sigma). First order; one UNet call per step. Default
    scheduler "normal". s_churn > 0 adds Karras' churn noise (drawn from `generator`)."""
    return _deterministic_loop("euler", _euler_step, eps_model, x_T, alphas_cumprod, steps, eta, generator,
                               callback, scheduler, s_noise, (s_churn, s_tmin, s_tmax), "normal", start=start)


def sample_heun(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                eta: float = 0.0, generator: Optional[torch.Generator] = None,
                callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                s_noise: float = 1.0, start: int = 0, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 2): Euler predictor, slope re-evaluated at
    sigma_next, average of the two. Second order; 2 UNet calls per step, 1 on the last.
    Default scheduler "normal"."""
    return _deterministic_loop("heun", _heun_step, eps_model, x_T, alphas_cumprod, steps, eta, generator,
                               callback, scheduler, s_noise, (s_churn, s_tmin, s_tmax), "normal", start=start)


def sample_dpm_2(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                 eta: float = 0.0, generator: Optional[torch.Generator] = None,
                 callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                 s_noise: float = 1.0, start: int = 0, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf) -> Tensor:
    """DPM2 (k-diffusion's DPM-Solver-2 flavoured midpoint method, Lu et al. 2022 / Karras et al.):
    Euler half-step to the log-midpoint, its slope for the full step. Second order; 2 UNet calls
    per step, 1 on the last. Default scheduler "karras"; the penultimate sigma is discarded
    (A1111 and ComfyUI), so `steps` steps end with sigma_{N-1} -> 0."""
    return _deterministic_loop("dpm_2", _dpm2_step, eps_model, x_T, alphas_cumprod, steps, eta, generator,
                               callback, scheduler, s_noise, (s_churn, s_tmin, s_tmax), "karras",
                               discard=True, start=start)


def _lms_coefficient(order: int, sig: list[float], i: int, j: int) -> float:
    """Integral over [sig[i], sig[i+1]] of the Lagrange basis polynomial through sig[i], ..., sig[i-order+1]
    that is 1 at sig[i-j] (exact polynomial integration; k-diffusion uses scipy quad on it)."""
    poly = np.array([1.0])
    for k in range(order):
        if k != j:
            poly = P.polymul(poly, [-sig[i - k], 1.0]) / (sig[i - j] - sig[i - k])
    antider = P.polyint(poly)
    return float(P.polyval(sig[i + 1], antider) - P.polyval(sig[i], antider))


def sample_lms(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
               eta: float = 0.0, generator: Optional[torch.Generator] = None,
               callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
               s_noise: float = 1.0, start: int = 0, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma, k-diffusion sample_lms, order 4): the slope d is
    interpolated by the polynomial through the last min(i+1, order) slopes and integrated exactly
    over [sigma_i, sigma_{i+1}]. Deterministic; one UNet call per step; the last step integrates
    to sigma = 0 (not just D). Default scheduler "normal"."""
    check_eta(eta, "lms", supports_eta=False)
    check_s_noise(s_noise, "lms", supports=False)
    sigmas, discrete = _setup(alphas_cumprod, steps, scheduler, "normal", start=start)
    denoise = make_denoiser(eps_model, discrete)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]
    ds: list[Tensor] = []
    for i in range(n):
        ds = (ds + [(x - denoise(x, sigmas[i])) / sigmas[i]])[-order:]
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(cur, sigmas, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback is not None:
            callback(i, n, x)
    return x


# --- ancestral: Euler a (samplers.py), DPM2 a, DPM++ 2S a ---------------------------------------


def _ancestral_setup(name, x_T, alphas_cumprod, steps, eta, generator, scheduler, s_noise,
                     noise_sampler, default, discard=False, start=0):
    eta = check_eta(eta, name, supports_eta=True) or 1.0
    s_noise = check_s_noise(s_noise, name, supports=True)
    sigmas, discrete = _setup(alphas_cumprod, steps, scheduler, default, discard, start)
    noise = noise_sampler or generator_noise(x_T, generator)
    return eta, s_noise, sigmas, discrete, noise


def sample_dpm_2_ancestral(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                           eta: float = 0.0, generator: Optional[torch.Generator] = None,
                           callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                           s_noise: float = 1.0, start: int = 0, noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """DPM2 ancestral: the DPM2 step down to sigma_down, then s_noise * sigma_up * z (the ancestral
    split of `common.ancestral_step`; eta 1 standard). 2 UNet calls per step, 1 on the last.
    Default scheduler "karras", penultimate sigma discarded (A1111, ComfyUI)."""
    eta, s_noise, sigmas, discrete, noise = _ancestral_setup(
        "dpm_2_ancestral", x_T, alphas_cumprod, steps, eta, generator, scheduler, s_noise,
        noise_sampler, "karras", discard=True, start=start)
    denoise = make_denoiser(eps_model, discrete)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, s)) / s
        s_down, s_up = ancestral_step(s, s_next, eta)
        x = _dpm2_step(x, s, s_down, denoise, d)
        if s_down != 0:
            x = x + noise(s, s_next) * s_noise * s_up
        if callback is not None:
            callback(i, n, x)
    return x


def sample_dpmpp_2s_ancestral(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                              eta: float = 0.0, generator: Optional[torch.Generator] = None,
                              callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                              s_noise: float = 1.0, start: int = 0,
                              noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """DPM-Solver++(2S) ancestral (Lu et al. 2022, Algorithm 1 with r = 1/2, k-diffusion variant).
    In lambda = -log(sigma), from sigma to sigma_down (h = log(sigma / sigma_down)):
        x_2 = (sigma_mid / sigma) x - expm1(-h/2) D(x, sigma),   sigma_mid = sqrt(sigma sigma_down)
        x   = (sigma_down / sigma) x - expm1(-h) D(x_2, sigma_mid),
    then s_noise * sigma_up * z; an Euler step when sigma_down = 0. 2 UNet calls per step, 1 on
    the last. Default scheduler "karras" (A1111)."""
    eta, s_noise, sigmas, discrete, noise = _ancestral_setup(
        "dpmpp_2s_ancestral", x_T, alphas_cumprod, steps, eta, generator, scheduler, s_noise,
        noise_sampler, "karras", start=start)
    denoise = make_denoiser(eps_model, discrete)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        s_down, s_up = ancestral_step(s, s_next, eta)
        if s_down == 0:
            x = x + (x - den) / s * (s_down - s)
        else:
            h = math.log(s) - math.log(s_down)
            s_mid = math.exp(-(-math.log(s) + h / 2))
            x_2 = (s_mid / s) * x - math.expm1(-h / 2) * den
            x = (s_down / s) * x - math.expm1(-h) * denoise(x_2, s_mid)
        if s_next > 0:
            x = x + noise(s, s_next) * s_noise * s_up
        if callback is not None:
            callback(i, n, x)
    return x


# --- SDE: DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE (Brownian-tree noise) ---------------------------


def _sde_setup(name, x_T, alphas_cumprod, steps, eta, generator, scheduler, s_noise, noise_sampler,
               default, discard=False, start=0):
    eta = check_eta(eta, name, supports_eta=True) or 1.0
    s_noise = check_s_noise(s_noise, name, supports=True)
    sigmas, discrete = _setup(alphas_cumprod, steps, scheduler, default, discard, start)
    if noise_sampler is None and len(sigmas) > 2:  # one step (straight to 0) draws nothing
        noise_sampler = BrownianNoise.for_sigmas(x_T, sigmas, seed_of(generator))
    return eta, s_noise, sigmas, discrete, noise_sampler


def _dpmpp_sde_step(x, den, s, s_next, eta, s_noise, noise, denoise, r=0.5):
    """One DPM-Solver++ SDE step (k-diffusion sample_dpmpp_sde): an ancestral DPM-Solver++(1) step
    to the intermediate sigma_r = s^(1-r) s_next^r with Brownian noise, D there, then the full
    ancestral step with the combination (1 - 1/(2r)) D + 1/(2r) D_r."""
    h = math.log(s) - math.log(s_next)
    s_r = math.exp(math.log(s) - h * r)
    fac = 1 / (2 * r)
    sd, su = ancestral_step(s, s_r, eta)
    x_2 = (sd / s) * x - math.expm1(math.log(sd / s)) * den
    x_2 = x_2 + noise(s, s_r) * s_noise * su
    den_2 = denoise(x_2, s_r)
    sd, su = ancestral_step(s, s_next, eta)
    den_d = (1 - fac) * den + fac * den_2
    x = (sd / s) * x - math.expm1(math.log(sd / s)) * den_d
    return x + noise(s, s_next) * s_noise * su


def sample_dpmpp_sde(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                     eta: float = 0.0, generator: Optional[torch.Generator] = None,
                     callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                     s_noise: float = 1.0, start: int = 0, noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """DPM-Solver++ SDE (k-diffusion sample_dpmpp_sde, r = 1/2): see `_dpmpp_sde_step`; an Euler
    step (x = D) on the last step. Brownian-tree noise. 2 UNet calls per step, 1 on the last.
    Default scheduler "karras"."""
    eta, s_noise, sigmas, discrete, noise = _sde_setup(
        "dpmpp_sde", x_T, alphas_cumprod, steps, eta, generator, scheduler, s_noise, noise_sampler,
        "karras", start=start)
    denoise = make_denoiser(eps_model, discrete)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        if s_next == 0:
            x = x + (x - den) / s * (s_next - s)
        else:
            x = _dpmpp_sde_step(x, den, s, s_next, eta, s_noise, noise, denoise)
        if callback is not None:
            callback(i, n, x)
    return x


def sample_dpmpp_2m_sde(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                        eta: float = 0.0, generator: Optional[torch.Generator] = None,
                        callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                        s_noise: float = 1.0, start: int = 0, noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (k-diffusion sample_dpmpp_2m_sde; Lu et al. 2022).
    With h = log(sigma / sigma_next), eta_h = eta h:
        x = (sigma_next / sigma) e^(-eta_h) x - expm1(-h - eta_h) D
            - 1/2 expm1(-h - eta_h) (D - D_prev) / r          (r = h_prev / h; not on the 1st step)
            + s_noise sigma_next sqrt(-expm1(-2 eta_h)) z       (z from the Brownian tree)
    and x = D on the last step. One UNet call per step. Default scheduler "exponential" (A1111)."""
    eta, s_noise, sigmas, discrete, noise = _sde_setup(
        "dpmpp_2m_sde", x_T, alphas_cumprod, steps, eta, generator, scheduler, s_noise, noise_sampler,
        "exponential", start=start)
    denoise = make_denoiser(eps_model, discrete)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]
    old, h_last = None, None
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        if s_next == 0:
            x = den
        else:
            h = math.log(s) - math.log(s_next)
            eta_h = eta * h
            x = (s_next / s * math.exp(-eta_h)) * x + (-math.expm1(-h - eta_h)) * den
            if old is not None:
                x = x + (0.5 * -math.expm1(-h - eta_h) * (1 / (h_last / h))) * (den - old)
            x = x + noise(s, s_next) * (s_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        old = den
        if callback is not None:
            callback(i, n, x)
    return x


def _phi2(h_eta: float) -> float:
    return math.expm1(-h_eta) / h_eta + 1


def sample_dpmpp_3m_sde(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                        eta: float = 0.0, generator: Optional[torch.Generator] = None,
                        callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                        s_noise: float = 1.0, start: int = 0, noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion sample_dpmpp_3m_sde). With h = log(sigma / sigma_next) and
    h_eta = (1 + eta) h: x = e^(-h_eta) x - expm1(-h_eta) D, plus the 2nd/3rd-order corrections
    phi_2 d1 - phi_3 d2 from the last two denoised values (their divided differences in lambda),
    plus s_noise sigma_next sqrt(-expm1(-2 eta h)) z (Brownian tree); x = D on the last step.
    One UNet call per step. Default scheduler "exponential", penultimate sigma discarded (A1111)."""
    eta, s_noise, sigmas, discrete, noise = _sde_setup(
        "dpmpp_3m_sde", x_T, alphas_cumprod, steps, eta, generator, scheduler, s_noise, noise_sampler,
        "exponential", discard=True, start=start)
    denoise = make_denoiser(eps_model, discrete)
    n = len(sigmas) - 1
    x = x_T * sigmas[0]
    den_1 = den_2 = h_1 = h_2 = None
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        if s_next == 0:
            x = den
        else:
            h = math.log(s) - math.log(s_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * den
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (den - den_1) / r0
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = _phi2(h_eta)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + _phi2(h_eta) * ((den - den_1) / (h_1 / h))
            x = x + noise(s, s_next) * (s_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
            den_1, den_2, h_1, h_2 = den, den_1, h, h_1
        if callback is not None:
            callback(i, n, x)
    return x
