"""UniPC (Zhao et al. 2023, arXiv:2302.04867): the unified predictor-corrector, multistep, data-prediction form.

Same signature as the k-samplers of `ksamplers.py` (plus `variant` and `order`); it walks a k-diffusion
sigma list and calls the model through `common.make_denoiser`, D(x, sigma) -> x_0 estimate.

Notation (VE): lambda = -log(sigma); a step goes from sigma_i to sigma_{i+1}, h = lambda_{i+1} - lambda_i > 0.
With the data predictions m_j = D(x_j, sigma_j) at the last p points, r_k = (lambda_{i-k} - lambda_i) / h
(k = 1..p-1, negative) and D1_k = (m_{i-k} - m_i) / r_k:

    base    = (sigma_{i+1} / sigma_i) x_i - expm1(-h) m_i              (DPM-Solver++(1) / DDIM)
    UniP-p:   x_{i+1}  = base - B(h) sum_k rho^p_k D1_k               (the predictor, order p)
    UniC-p:   x^c_{i+1} = base - B(h) (sum_k rho^c_k D1_k + rho^c_p (m_{i+1} - m_i)),
              m_{i+1} = D(x_{i+1}, sigma_{i+1}) at the PREDICTED x (it is the history kept for later steps).

The corrector raises the order to p + 1 at no extra model call: m_{i+1} is needed by the next step anyway.
The weights solve R rho = g / B(h) (the paper's order conditions, Theorem 3.1): R[j, k] = r_k^j (j = 0..p-1)
over the columns r_1, ..., r_{p-1}, 1 for the corrector, the leading (p-1) x (p-1) block for the
predictor; g_j = j! (-h) phi_{j+1}(-h) with phi_1(z) = (e^z - 1)/z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z.
Data prediction integrates in -h (the paper's "hh = -h"), so B(h) = -h for "bh1" and expm1(-h) for
"bh2" (both negative; |B| ~ h for small h). Order-2 predictor and order-1 corrector use the paper's
simplified rho = 1/2 (as the reference code, ComfyUI and diffusers do).

VP and VE give the same iterates: in VP (x_vp = alpha x, sigma_vp = alpha sigma, lambda = log(alpha /
sigma_vp) = -log sigma) the update reads x_vp' = (sigma_vp' / sigma_vp) x_vp - alpha' [expm1(-h) m_i
+ B(h) (...)]. Dividing by alpha' and using sigma_vp' alpha / (sigma_vp alpha') = sigma' / sigma gives the
VE update above term by term; h, r_k, rho and the m_j (the model sees x_ve * c_in = x_vp) are the same.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from sd_cli.errors import UsageError
from sd_cli.sampling.common import (
    EpsModel,
    StepCallback,
    check_alphas,
    check_eta,
    check_s_noise,
    k_plan,
    make_denoiser,
)

VARIANTS = ("bh1", "bh2")
MAX_ORDER = 6  # the Vandermonde systems get ill-conditioned beyond this; A1111 asks for "< steps"
COMFY_FINAL_SIGMA = 0.001  # ComfyUI sample_unipc: a final sigma of 0 becomes 0.001
DEFAULT_SCHEDULER = "sgm_uniform"  # nearest to A1111's own time-uniform UniPC grid (see samplers.py)


def final_sigma_rule(sigmas: list[float]) -> list[float]:
    """The sigma list UniPC walks: ComfyUI's rule, a final 0 replaced by 0.001 (the run ends there and
    returns x at sigma 0.001; there is no denoise to 0)."""
    return sigmas[:-1] + [COMFY_FINAL_SIGMA] if sigmas[-1] == 0 else list(sigmas)


def step_order(i: int, n: int, order: int) -> int:
    """p of step i of n: warm-up 1, 2, ... (only that many points exist), lower_order_final (the last
    steps drop so that the last one is first order), `order` in between."""
    return min(order, i + 1, n - i)


def _g_over_b(hh: float, b_h: float, p: int) -> np.ndarray:
    """(p,) g_j / B(h) for j = 1..p, g_j = j! hh phi_{j+1}(hh), by the recursion on phi_k."""
    out = np.empty(p)
    g, fact = math.expm1(hh) / hh - 1.0, 1.0  # g_1 = hh phi_2(hh)
    for j in range(p):
        out[j] = g * fact / b_h
        fact *= j + 2
        g = g / hh - 1.0 / fact  # hh phi_{j+3}(hh) = hh phi_{j+2}(hh) / hh - 1/(j+2)!
    return out


def step_coefficients(lam: list[float], i: int, p: int, variant: str):
    """For the step lam[i] -> lam[i+1] of order p: (h, B(h), r_k (p-1,), rho_p (p-1,), rho_c (p,))."""
    h = lam[i + 1] - lam[i]
    hh = -h  # data prediction
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = np.array([(lam[i - k] - lam[i]) / h for k in range(1, p)])  # (p-1,)
    rhs = _g_over_b(hh, b_h, p)  # (p,)
    vander = np.vander(np.append(rks, 1.0), p, increasing=True).T  # (p, p): [j, k] = r_k^j
    if p == 1:
        rho_p, rho_c = np.empty(0), np.array([0.5])
    else:
        rho_p = np.array([0.5]) if p == 2 else np.linalg.solve(vander[:-1, :-1], rhs[:-1])
        rho_c = np.linalg.solve(vander, rhs)
    return h, b_h, rks, rho_p, rho_c


def _check(eta, s_noise, variant, order, name):
    check_eta(eta, name, supports_eta=False)
    check_s_noise(s_noise, name, supports=False)
    if variant not in VARIANTS:
        raise UsageError(f"UniPC variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise UsageError(f"UniPC order must be a whole number from 1 to {MAX_ORDER}, got {order!r}")


def _weighted(weights, tensors: list[Tensor], like: Tensor) -> Tensor:
    """sum_k w_k t_k (B,C,h,w); zeros like `like` for no terms."""
    out = torch.zeros_like(like)
    for w, t in zip(weights, tensors):
        out = out + float(w) * t
    return out


def run_uni_pc(denoise, x: Tensor, sig: list[float], variant: str, order: int,
               callback: Optional[StepCallback] = None) -> Tensor:
    """The UniPC loop over the sigma list `sig` (descending, all > 0) from x (B,C,h,w) at sig[0]:
    one call of `denoise` per step (the last step runs the predictor only)."""
    lam = [-math.log(s) for s in sig]
    n = len(sig) - 1
    hist = [denoise(x, sig[0])]  # (B,C,h,w) each: m_j at the last `order` points, oldest first
    for i in range(n):
        p = step_order(i, n, order)
        h, b_h, rks, rho_p, rho_c = step_coefficients(lam, i, p, variant)
        m0 = hist[-1]
        d1s = [(hist[-1 - k] - m0) / float(rks[k - 1]) for k in range(1, p)]  # (B,C,h,w) each
        base = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * m0
        x_pred = base - b_h * _weighted(rho_p, d1s, x)
        if i == n - 1:  # last step: no corrector, no model call
            x = x_pred
        else:
            m_t = denoise(x_pred, sig[i + 1])
            x = base - b_h * (_weighted(rho_c[:-1], d1s, x) + float(rho_c[-1]) * (m_t - m0))
            hist = (hist + [m_t])[-order:]
        if callback is not None:
            callback(i, n, x)
    return x


def sample_uni_pc(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                  eta: float = 0.0, generator: Optional[torch.Generator] = None,
                  callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                  s_noise: float = 1.0, start: int = 0, variant: str = "bh1", order: int = 3) -> Tensor:
    """UniPC, multistep UniP-p + UniC-p in data prediction (see the module docstring), as ComfyUI's
    uni_pc / uni_pc_bh2 and A1111's "UniPC" (defaults bh1, order 3, lower_order_final) compute it.

    Orders per step: min(order, i + 1, n - i) (warm-up, lower_order_final); the corrector runs on every
    step but the last. Final sigma: ComfyUI's rule (its comfy/extra_samplers/uni_pc.py sample_unipc): a
    final 0 is replaced by 0.001, the last (first-order) step goes to sigma = 0.001 and x there is the
    result. With 1 step that one first-order step is taken (ComfyUI's order min(3, steps - 1) = 0 would
    return without a step). Deterministic: eta must be 0, generator is unused. One UNet call per step.
    Default scheduler "sgm_uniform" (see the registry entry). start: image to image, as the k-samplers.
    """
    _check(eta, s_noise, variant, order, "uni_pc" if variant == "bh1" else f"uni_pc_{variant}")
    del generator
    ac = check_alphas(alphas_cumprod)
    sigmas, discrete = k_plan(ac, steps, scheduler or DEFAULT_SCHEDULER, start=start)
    sig = final_sigma_rule(sigmas)
    x = x_T * sig[0]  # (B,C,h,w) VE start
    return run_uni_pc(make_denoiser(eps_model, discrete), x, sig, variant, order, callback)


def sample_uni_pc_bh2(eps_model: EpsModel, x_T: Tensor, alphas_cumprod: Tensor, steps: int, *,
                      eta: float = 0.0, generator: Optional[torch.Generator] = None,
                      callback: Optional[StepCallback] = None, scheduler: Optional[str] = None,
                      s_noise: float = 1.0, start: int = 0, order: int = 3) -> Tensor:
    """UniPC with B(h) = expm1(-h) (ComfyUI's uni_pc_bh2); otherwise `sample_uni_pc`."""
    return sample_uni_pc(eps_model, x_T, alphas_cumprod, steps, eta=eta, generator=generator,
                         callback=callback, scheduler=scheduler, s_noise=s_noise, start=start,
                         variant="bh2", order=order)
