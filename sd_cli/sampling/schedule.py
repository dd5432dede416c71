"""Noise schedule of Stable Diffusion v1.x and the two discretizations the samplers use.

The model is a discrete variance-preserving (VP) diffusion with 1000 training timesteps:

    x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps,   a_t = alphas_cumprod[t],  t = 0..999

Equivalently, in the variance-exploding (VE) view of Karras et al. 2022 (arXiv:2206.00364),
x_t / sqrt(a_t) = x_0 + sigma_t * eps with sigma_t = sqrt((1 - a_t) / a_t).

Two step grids live here:

* `ddim_timesteps`: the CompVis "uniform" integer grid used by DDIM and PLMS.
* `karras_sigmas`: the rho-spaced sigma grid of Karras et al. 2022, eq. 5, used by the
  k-diffusion style samplers, together with the sigma <-> t mapping that lets them call a
  UNet trained on integer timesteps (the same mapping k-diffusion's CompVisDenoiser uses:
  piecewise-linear interpolation of log(sigma) over the 1000 discrete sigmas).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sd_cli.errors import UsageError

# SD v1.x `model.params` (v1-inference.yaml): linear_start, linear_end, timesteps.
LINEAR_START = 0.00085
LINEAR_END = 0.012
NUM_TIMESTEPS = 1000

# Names, in the order CompVis `DDPM.register_schedule` registers them, of the persistent
# schedule buffers a LatentDiffusion checkpoint carries (v_posterior = 0, eps parameterization).
# (`lvlb_weights` is registered with persistent=False, so checkpoints do not hold it.)
LDM_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _linear_betas(linear_start: float, linear_end: float, n: int) -> np.ndarray:
    """CompVis "linear" beta schedule (really quadratic in t): (1000,) float64.

    Built with torch.linspace in float64 as CompVis `make_beta_schedule` does, so the values
    agree to the last bit with the buffers stored in the released checkpoints.
    """
    if n < 2:
        raise UsageError(f"a noise schedule needs at least 2 timesteps, got {n}")
    if not (0.0 < linear_start < linear_end < 1.0):
        raise UsageError(
            f"need 0 < linear_start < linear_end < 1, got {linear_start} and {linear_end}"
        )
    root = torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64)
    return (root**2).numpy()


def ldm_buffers(
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
    n: int = NUM_TIMESTEPS,
) -> dict[str, torch.Tensor]:
    """Every schedule buffer of a CompVis LatentDiffusion model, as float32 tensors of shape (n,).

    All arithmetic is float64 (numpy), each result is rounded to float32 once at the end:
    the order CompVis `DDPM.register_schedule` uses, so the numbers match a checkpoint's.
    Keys: see `LDM_BUFFER_NAMES`.
    """
    betas = _linear_betas(linear_start, linear_end, n)  # (n,) f64
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)  # a_t = prod_{s<=t} (1 - beta_s)
    ac_prev = np.concatenate(([1.0], ac[:-1]))  # a_{t-1}, with a_{-1} = 1

    # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)   (DDPM eq. 6-7)
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)  # v_posterior = 0
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
        "posterior_variance": post_var,
        # post_var[0] is exactly 0; CompVis clips before the log.
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(values[k], dtype=torch.float32) for k in LDM_BUFFER_NAMES}


def make_alphas_cumprod(
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
    n: int = NUM_TIMESTEPS,
) -> torch.Tensor:
    """alphas_cumprod (n,) float32: cumprod(1 - betas) in float64, rounded once to float32.

    For SD v1.x: a_0 = 0.99915, a_999 ~= 0.0047.
    """
    return ldm_buffers(linear_start, linear_end, n)["alphas_cumprod"]


def check_steps(steps: object, n: int | None = NUM_TIMESTEPS) -> int:
    """Validate a user step count: an int in [1, n] (n=None: no upper bound). Else UsageError."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise UsageError(f"steps must be a whole number, got {steps!r}")
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    if n is not None and steps > n:
        raise UsageError(f"steps must be at most {n} (the model's training timesteps), got {steps}")
    return int(steps)


def ddim_timesteps(steps: int, n: int = NUM_TIMESTEPS) -> np.ndarray:
    """CompVis "uniform" DDIM grid (Song et al. 2020, arXiv:2010.02502, sec. 4.2): int64 array.

    With c = n // steps the grid is 1, 1 + c, 1 + 2c, ... (range(0, n, c) + 1), ascending;
    samplers walk it from the end. Two CompVis properties to know:

    * When c does not divide n evenly the grid has MORE than `steps` entries
      (steps=30 -> c=33 -> 31 timesteps). This is kept so images match CompVis/A1111.
    * CompVis crashes (index 1000 out of range) when the grid reaches n, which happens for
      steps = 3, 9, 27, 36, 37, 101-111, 251-333 and 501-1000. Here any entry >= n is
      dropped instead, e.g. steps=3 -> [1, 334, 667]; steps>500 -> all of 1..999.
    """
    steps = check_steps(steps, n)
    c = n // steps
    ts = np.arange(0, n, c, dtype=np.int64) + 1
    return ts[ts < n]


# --- sigma (VE) view and the Karras grid --------------------------------------------------


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t), same dtype/shape as the input ((1000,) float32 for SD).

    Computed in the input's dtype as k-diffusion's CompVisDenoiser does; for SD v1.x this gives
    sigma_min = sigmas[0] ~= 0.0292 and sigma_max = sigmas[-1] ~= 14.6146.
    """
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(
    steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> torch.Tensor:
    """Karras et al. 2022 (arXiv:2206.00364) eq. 5 noise levels, descending, with a final 0.

    sigma_i = (sigma_max^(1/rho) + i/(steps-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i = 0..steps-1, then sigma_steps = 0. Returns float64 (steps + 1,). For steps == 1
    the grid is [sigma_max, 0] (as k-diffusion's get_sigmas_karras).
    """
    steps = check_steps(steps, n=None)
    if not (0.0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise UsageError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if not rho > 0:
        raise UsageError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)  # (steps,)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho  # (steps,)
    return torch.cat([sig, sig.new_zeros(1)])  # (steps + 1,)


def sigma_to_t(sigma, sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of a noise level: inverse of `t_to_sigma`. Returns float64.

    `sigmas` are the discrete sigmas (n,), ascending (from `sigmas_from_alphas_cumprod`);
    `sigma` a float or tensor of any shape. log(sigma) is located between two neighbouring
    log(sigmas[i]), log(sigmas[i+1]) and t = i + w by linear interpolation; levels outside
    [sigmas[0], sigmas[-1]] clamp to t = 0 or n - 1 (as k-diffusion's DiscreteSchedule).
    """
    log_sigmas = sigmas.detach().to("cpu", torch.float64).log()  # (n,)
    ls = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().log()
    hi = torch.searchsorted(log_sigmas, ls).clamp(1, log_sigmas.numel() - 1)
    lo = hi - 1
    w = ((ls - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0.0, 1.0)
    return lo.to(torch.float64) + w


def t_to_sigma(t, sigmas: torch.Tensor) -> torch.Tensor:
    """Noise level at a fractional timestep t in [0, n-1]: log-linear interpolation, float64."""
    log_sigmas = sigmas.detach().to("cpu", torch.float64).log()  # (n,)
    t = torch.as_tensor(t, dtype=torch.float64).detach().cpu().clamp(0, log_sigmas.numel() - 1)
    lo = t.floor().long()
    hi = t.ceil().long()
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


# --- schedulers: the sigma list of a k-diffusion style sampler --------------------------------
#
# Each scheduler maps (steps, the model's discrete sigmas (n,) ascending) to the noise levels a
# k-diffusion style sampler walks, descending and ending in 0: float64 (len,) where len is
# steps + 1 for all but `ddim_uniform` (CompVis' grid, which can be longer) and `beta` (which can
# be shorter: repeated timesteps are dropped). The names and formulas are ComfyUI's KSampler
# schedulers; A1111 has the same ones under the labels of SCHEDULER_LABELS.


def _descending_with_zero(values) -> torch.Tensor:
    sig = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    return torch.cat([sig, sig.new_zeros(1)])


def _karras(steps: int, discrete: torch.Tensor) -> torch.Tensor:
    """Karras et al. 2022 eq. 5 (rho 7) between the smallest and largest discrete sigma."""
    return karras_sigmas(steps, discrete[0].item(), discrete[-1].item())


def _exponential(steps: int, discrete: torch.Tensor) -> torch.Tensor:
    """Evenly spaced in log(sigma) from sigma_max to sigma_min (k-diffusion get_sigmas_exponential)."""
    lo, hi = math.log(discrete[0].item()), math.log(discrete[-1].item())
    return _descending_with_zero(torch.linspace(hi, lo, steps, dtype=torch.float64).exp())


def _normal(steps: int, discrete: torch.Tensor) -> torch.Tensor:
    """The model's own discretization: timesteps evenly spaced from n-1 down to 0, t -> sigma by
    log-linear interpolation (k-diffusion DiscreteSchedule.get_sigmas, A1111 "Automatic" for
    Euler/LMS/Heun, ComfyUI "normal")."""
    t = torch.linspace(discrete.numel() - 1, 0, steps, dtype=torch.float64)
    return _descending_with_zero(t_to_sigma(t, discrete))


def _sgm_uniform(steps: int, discrete: torch.Tensor) -> torch.Tensor:
    """As `normal` with steps + 1 evenly spaced timesteps, the last (t = 0) left out."""
    t = torch.linspace(discrete.numel() - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return _descending_with_zero(t_to_sigma(t, discrete))


def _simple(steps: int, discrete: torch.Tensor) -> torch.Tensor:
    """Every (n / steps)-th discrete sigma from the top: sigmas[-(1 + floor(i n / steps))]."""
    n = discrete.numel()
    stride = n / steps
    return _descending_with_zero([discrete[-(1 + int(i * stride))].item() for i in range(steps)])


def _ddim_uniform(steps: int, discrete: torch.Tensor) -> torch.Tensor:
    """The discrete sigmas at CompVis' DDIM grid 1, 1 + c, 1 + 2c, ... (c = max(n // steps, 1)),
    from the top; as `ddim_timesteps`, the list has more than steps entries when c * steps < n - 1."""
    n = discrete.numel()
    idx = list(range(1, n, max(n // steps, 1)))[::-1]
    return _descending_with_zero(discrete[idx].to(torch.float64))


def _beta(steps: int, discrete: torch.Tensor, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI's beta scheduler (Lee et al. 2024, arXiv:2407.12173): timesteps at the Beta(0.6, 0.6)
    quantiles 1, 1 - 1/steps, ..., 1/steps of n - 1, rounded, repeats dropped, as discrete sigmas."""
    try:
        from scipy import stats
    except ImportError:  # scipy comes with torchsde, a dependency
        raise UsageError("the beta scheduler needs scipy (pip install scipy)") from None
    n = discrete.numel()
    q = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    ts = np.rint(stats.beta.ppf(q, alpha, beta) * (n - 1)).astype(np.int64)
    kept = [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return _descending_with_zero(discrete[kept].to(torch.float64))


SCHEDULERS = {
    "karras": _karras,
    "exponential": _exponential,
    "normal": _normal,
    "simple": _simple,
    "sgm_uniform": _sgm_uniform,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
}

# A1111's "Schedule type" label of each. A1111's "Uniform" (and "Automatic" for Euler, LMS, Heun,
# Euler a) is the model's get_sigmas, which gives the same numbers as "normal". A1111's "Beta"
# is NOT ComfyUI's beta (it maps the quantiles linearly into [sigma_min, sigma_max]).
SCHEDULER_LABELS = {
    "karras": "Karras",
    "exponential": "Exponential",
    "normal": "Normal",
    "simple": "Simple",
    "sgm_uniform": "SGM Uniform",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
}


def check_scheduler(name: object) -> str:
    """`name` if it is a known scheduler, else UsageError listing them."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return name


def scheduler_sigmas(
    name: str, steps: int, discrete: torch.Tensor, discard_penultimate: bool = False
) -> torch.Tensor:
    """The sigmas (float64, descending, last 0) of scheduler `name` for `steps` steps.

    discrete: the model's sigmas (n,) ascending (`sigmas_from_alphas_cumprod`). With
    discard_penultimate (A1111/ComfyUI for DPM2, DPM2 a and, in A1111, DPM++ 3M SDE) the list is
    made for steps + 1 and its next-to-last entry (the smallest nonzero sigma) dropped, so the
    sampler still takes `steps` steps but its last one goes to 0 from one level higher.
    """
    fn = SCHEDULERS[check_scheduler(name)]
    steps = check_steps(steps, n=None)
    sig = fn(steps + 1 if discard_penultimate else steps, discrete)
    if discard_penultimate:
        sig = torch.cat([sig[:-2], sig[-1:]])
    return sig


def scheduler_length(name: str, steps: int, n: int = NUM_TIMESTEPS, discard_penultimate: bool = False) -> int:
    """How many steps (len(sigmas) - 1) scheduler `name` gives a model of n timesteps."""
    discrete = sigmas_from_alphas_cumprod(make_alphas_cumprod(n=n))
    return scheduler_sigmas(name, steps, discrete, discard_penultimate).numel() - 1
