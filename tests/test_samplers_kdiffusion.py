"""The k-diffusion family, LCM and the schedulers: the registry's contract, and equality with the
reference implementations.

Parity (skipped when k-diffusion is absent): k-diffusion's own sample_* functions (its sampling.py
and external.py, loaded as files: the package's __init__ imports torchvision) run on the tiny
model of conftest.py under classifier-free guidance (scale 7.5; plus the exact Gaussian eps, see
`tiny_eps`), through k-diffusion's own
CompVisDenoiser, with this tool's sigma lists (as float32, what A1111 passes) and the same noise:
the generator's draws after the start noise for the ancestral samplers (and for churn, through a
stand-in for k-diffusion's torch.randn_like, as A1111 does), k-diffusion's BrownianTreeNoiseSampler
seeded with the image seed for the SDE samplers. Bound: max |ours - k-diffusion| <= 1e-4 on the
final latents (fp32). Install for these tests (torchsde comes with this package; torchdiffeq, which
only k-diffusion's log-likelihood uses, is stubbed when absent):

    pip install --no-deps k-diffusion==0.1.1.post1

LCM is compared with diffusers' LCMScheduler (4 steps, original 50, the same noise).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_samplers import AC, SIGMAS, GaussianEps, _noise

from sd_cli.errors import UsageError
from sd_cli.sampling import schedule
from sd_cli.sampling.lcm import lcm_timesteps
from sd_cli.sampling.noise import BrownianNoise
from sd_cli.sampling.samplers import SAMPLERS, get_sampler

# k-diffusion's own tree warns when a query falls outside torchsde's 6-decimal rounding of its ends
# (ours silences the same warning; see noise.py).
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Should have (ta|tb):UserWarning")]

KD_INSTALL = "pip install --no-deps k-diffusion==0.1.1.post1"
KSAMPLERS = [n for n, i in SAMPLERS.items() if i.schedule in schedule.SCHEDULERS]
STOCHASTIC = [n for n in KSAMPLERS if SAMPLERS[n].noise != "none"]
TOL = 1e-4


# --- loading k-diffusion's sampling.py without its package __init__ ---------------------------


def _append_dims(x, target_dims):
    """k-diffusion's utils.append_dims (the one helper sampling.py and external.py use)."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def _load_kdiffusion():
    spec = importlib.util.find_spec("k_diffusion")  # finds, does not import (its __init__ needs torchvision)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "sampling.py").is_file():
        return None
    name = "_kdiffusion_reference"
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(root)]
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = _append_dims
    sys.modules[name], sys.modules[f"{name}.utils"] = pkg, utils
    pkg.utils = utils
    stub_diffeq = importlib.util.find_spec("torchdiffeq") is None
    if stub_diffeq:  # only its ODE log-likelihood uses torchdiffeq
        sys.modules["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    try:
        mods = {}
        for sub in ("sampling", "external"):
            sub_spec = importlib.util.spec_from_file_location(f"{name}.{sub}", root / f"{sub}.py")
            mods[sub] = importlib.util.module_from_spec(sub_spec)
            sys.modules[f"{name}.{sub}"] = mods[sub]
            setattr(pkg, sub, mods[sub])
            sub_spec.loader.exec_module(mods[sub])
    except ImportError:
        return None
    finally:
        if stub_diffeq:
            del sys.modules["torchdiffeq"]
    return SimpleNamespace(**mods)


@pytest.fixture(scope="module")
def kd():
    mods = _load_kdiffusion()
    if mods is None:
        pytest.skip(f"k-diffusion is not installed ({KD_INSTALL})")
    return mods


class _TorchWithStream:
    """k-diffusion's module-level `torch`, with randn_like drawing from one generator (CPU float32),
    as A1111's TorchHijack does: the churn noise of Euler/Heun/DPM2 then follows the image's stream."""

    def __init__(self, generator):
        self.generator = generator

    def __getattr__(self, item):
        return getattr(torch, item)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x)


# --- the tiny model ------------------------------------------------------------------------------


class _CompVisStandIn:
    """What k-diffusion's CompVisDenoiser needs of a CompVis model: alphas_cumprod and apply_model."""

    def __init__(self, eps_model):
        self.alphas_cumprod = AC
        self.eps_model = eps_model

    def apply_model(self, x, t, **kwargs):
        return self.eps_model(x.to(torch.float32), t.to(torch.float32))


@pytest.fixture(scope="module")
def tiny_eps(tiny_files):
    """eps(x, t): the exact eps of the Gaussian data of test_samplers plus 0.2 x the tiny model's UNet
    under guidance 7.5 (fixed random contexts). The Gaussian part makes the samplers denoise as with
    real weights (final latents of size ~3, not the ~50 of start noise that the random UNet alone
    leaves), the UNet part makes the model nonlinear, batch-coupled and untidy like a real one."""
    from conftest import TINY_YAML, load_config_from_text

    from sd_cli.pipeline.guidance import guided_eps_model
    from sd_cli.weights.loading import load_model

    model = load_model(load_config_from_text(TINY_YAML).model, tiny_files["safetensors"], "cpu", torch.float32)
    g = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    guided = guided_eps_model(model.unet, cond, uncond, 7.5)
    exact = GaussianEps()

    def eps(x, t):
        with torch.no_grad():
            return exact(x, t) + 0.2 * guided(x, t)

    return eps


SEED = 1234
SHAPE = (1, 4, 8, 8)
STEPS = 8

# (sampler, scheduler, our kwargs, k-diffusion function, its kwargs)
PARITY = [
    ("euler", None, {}, "sample_euler", {}),
    ("euler", "karras", {"s_churn": 1.0, "s_noise": 1.003}, "sample_euler", {"s_churn": 1.0, "s_noise": 1.003}),
    ("heun", None, {}, "sample_heun", {}),
    ("heun", "exponential", {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 5.0},
     "sample_heun", {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 5.0}),
    ("dpm_2", None, {}, "sample_dpm_2", {}),
    ("dpm_2", "normal", {}, "sample_dpm_2", {}),
    ("lms", None, {}, "sample_lms", {}),
    ("lms", "karras", {}, "sample_lms", {}),
    ("euler_ancestral", None, {}, "sample_euler_ancestral", {}),
    ("euler_ancestral", "karras", {"eta": 0.7, "s_noise": 0.9}, "sample_euler_ancestral", {"eta": 0.7, "s_noise": 0.9}),
    ("euler_a", None, {}, "sample_euler_ancestral", {}),
    ("dpm_2_ancestral", None, {}, "sample_dpm_2_ancestral", {}),
    ("dpmpp_2s_ancestral", None, {}, "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", "normal", {"eta": 0.5}, "sample_dpmpp_2s_ancestral", {"eta": 0.5}),
    ("dpmpp_2m", None, {}, "sample_dpmpp_2m", {}),
    ("dpmpp_2m", "normal", {}, "sample_dpmpp_2m", {}),
    ("dpmpp_sde", None, {}, "sample_dpmpp_sde", {}),
    ("dpmpp_2m_sde", None, {}, "sample_dpmpp_2m_sde", {"solver_type": "midpoint"}),
    ("dpmpp_2m_sde", "karras", {"eta": 0.5, "s_noise": 1.1}, "sample_dpmpp_2m_sde", {"eta": 0.5, "s_noise": 1.1}),
    ("dpmpp_3m_sde", None, {}, "sample_dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", "karras", {}, "sample_dpmpp_3m_sde", {}),
]


def _reference(kd, eps, name, scheduler, fn_name, kd_kwargs):
    """k-diffusion's fn on the same start noise, sigmas and noise streams. The sigmas go in as float32
    (A1111's), except for the Brownian-tree samplers: a Brownian path is only Hoelder-1/2 continuous
    in time, so querying it at the float32 rounding of our float64 sigmas (1e-7 relative) changes
    the noise by ~1e-4 and the latents by up to 9e-4 (measured, DPM++ 3M SDE); with the float64
    sigmas the queries are the same and k-diffusion computes in float64 around our float32 model."""
    info = SAMPLERS[name]
    sigmas = schedule.scheduler_sigmas(info.resolve_scheduler(scheduler), STEPS, SIGMAS, info.discard_penultimate)
    if info.noise != "brownian":
        sigmas = sigmas.to(torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    kwargs = dict(kd_kwargs)
    if info.noise == "ancestral":
        kwargs["noise_sampler"] = lambda s, s_next: torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    elif info.noise == "brownian":
        kwargs["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(
            x_T, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEED)
    wrapped = kd.external.CompVisDenoiser(_CompVisStandIn(eps))
    saved = kd.sampling.torch
    kd.sampling.torch = _TorchWithStream(gen)
    try:
        return getattr(kd.sampling, fn_name)(wrapped, x_T * sigmas[0], sigmas, disable=True, **kwargs)
    finally:
        kd.sampling.torch = saved


def _ours(eps, name, scheduler, kwargs):
    gen = torch.Generator().manual_seed(SEED)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float32)  # the start noise comes first, as in render()
    return SAMPLERS[name].fn(eps, x_T, AC, STEPS, generator=gen, scheduler=scheduler, **kwargs)


@pytest.mark.parametrize("name, scheduler, kwargs, fn_name, kd_kwargs", PARITY,
                         ids=[f"{p[0]}-{p[1] or 'default'}{'-opts' if p[2] else ''}" for p in PARITY])
def test_equals_k_diffusion(kd, tiny_eps, name, scheduler, kwargs, fn_name, kd_kwargs):
    ref = _reference(kd, tiny_eps, name, scheduler, fn_name, kd_kwargs)
    ours = _ours(tiny_eps, name, scheduler, kwargs)
    assert ours.dtype == torch.float32 and torch.isfinite(ref).all()
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{name} [{scheduler or SAMPLERS[name].schedule}] {kwargs}: max|ours - k-diffusion| = {diff:.2e} "
          f"(max|ref| {scale:.3g}, relative {diff / max(scale, 1):.1e})")
    assert diff <= TOL


def test_our_schedulers_equal_k_diffusions(kd):
    """karras / exponential equal k-diffusion's get_sigmas_*, normal its model's get_sigmas (all float32
    there, float64 here: equal to float32 rounding)."""
    wrapped = kd.external.CompVisDenoiser(_CompVisStandIn(None))
    smin, smax = wrapped.sigmas[0].item(), wrapped.sigmas[-1].item()
    for n in (1, 2, 10, 25):
        pairs = {
            "karras": kd.sampling.get_sigmas_karras(n, smin, smax),
            "exponential": kd.sampling.get_sigmas_exponential(n, smin, smax),
            "normal": wrapped.get_sigmas(n),
        }
        for name, ref in pairs.items():
            ours = schedule.scheduler_sigmas(name, n, SIGMAS)
            np.testing.assert_allclose(ours.numpy(), ref.double().numpy(), rtol=2e-6, atol=0, err_msg=name)


def test_brownian_noise_equals_k_diffusions_tree(kd):
    x = torch.zeros(2, 4, 8, 8)
    sig = schedule.scheduler_sigmas("karras", 12, SIGMAS).tolist()
    ours = BrownianNoise.for_sigmas(x, sig, seed=99)
    ref = kd.sampling.BrownianTreeNoiseSampler(x, min(sig[:-1]), max(sig), seed=99)
    queries = list(zip(sig[:-2], sig[1:-1])) + [(sig[2], math.sqrt(sig[2] * sig[3]))]
    for a, b in queries:
        assert torch.equal(ours(a, b), ref(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))


def test_a1111_seed_list_equals_an_int_seed_for_one_image(kd):
    """A1111 passes [seed] per image (one tree per row), ComfyUI the int seed (one tree for the batch):
    for a batch of one they draw the same noise."""
    x = torch.zeros(1, 4, 8, 8)
    one = kd.sampling.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=7)
    rows = kd.sampling.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[7])
    assert torch.equal(one(torch.tensor(5.0), torch.tensor(2.0)), rows(torch.tensor(5.0), torch.tensor(2.0)))


# --- LCM against diffusers -------------------------------------------------------------------------


def _diffusers_lcm(**kw):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", original_inference_steps=50, **kw)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_lcm_timesteps_equal_diffusers():
    sched = _diffusers_lcm()
    for steps in list(range(1, 51)):
        sched.set_timesteps(steps)
        assert lcm_timesteps(steps) == sched.timesteps.tolist(), steps
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    with pytest.raises(UsageError):
        lcm_timesteps(51)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_equals_diffusers_lcm_scheduler(tiny_eps, steps):
    sched = _diffusers_lcm()
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float32) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = tiny_eps(x, torch.full((SHAPE[0],), float(t), dtype=torch.float32))
        x, denoised = sched.step(eps, t, x, generator=gen, return_dict=False)
    seen = []
    ours = _ours_lcm(tiny_eps, steps, seen)
    diff = (ours - denoised).abs().max().item()
    print(f"lcm {steps} steps: max|ours - diffusers| = {diff:.2e} (max|ref| {denoised.abs().max().item():.3g})")
    assert diff <= TOL
    assert seen == [float(t) for t in sched.timesteps]


def _ours_lcm(eps, steps, seen):
    def model(x, t):
        seen.append(t[0].item())
        return eps(x, t)

    gen = torch.Generator().manual_seed(SEED)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    return SAMPLERS["lcm"].fn(model, x_T, AC, steps, generator=gen)


# --- the registry's contract ------------------------------------------------------------------------

# name: (label, default scheduler, noise, UNet calls per step, discards the penultimate sigma, s_noise)
EXPECTED = {
    "uni_pc": ("UniPC", "sgm_uniform", "none", 1, False, False),
    "uni_pc_bh2": ("UniPC", "sgm_uniform", "none", 1, False, False),
    "ddim": ("DDIM", "uniform", "ancestral", 1, False, False),
    "plms": ("PLMS", "uniform", "none", 1, False, False),
    "dpmpp_2m": ("DPM++ 2M Karras", "karras", "none", 1, False, False),
    "euler_a": ("Euler a", "karras", "ancestral", 1, False, True),
    "euler": ("Euler", "normal", "none", 1, False, True),
    "euler_ancestral": ("Euler a", "normal", "ancestral", 1, False, True),
    "heun": ("Heun", "normal", "none", 2, False, True),
    "dpm_2": ("DPM2", "karras", "none", 2, True, True),
    "dpm_2_ancestral": ("DPM2 a", "karras", "ancestral", 2, True, True),
    "lms": ("LMS", "normal", "none", 1, False, False),
    "dpmpp_2s_ancestral": ("DPM++ 2S a", "karras", "ancestral", 2, False, True),
    "dpmpp_sde": ("DPM++ SDE", "karras", "brownian", 2, False, True),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", "exponential", "brownian", 1, False, True),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", "exponential", "brownian", 1, True, True),
    "lcm": ("LCM", "lcm", "ancestral", 1, False, False),
}


def test_registry_entries():
    assert list(SAMPLERS)[:4] == ["ddim", "plms", "dpmpp_2m", "euler_a"]  # the older four keep their place
    assert set(SAMPLERS) == set(EXPECTED)
    for name, (label, sched, noise, evals, discard, s_noise) in EXPECTED.items():
        info = get_sampler(name)
        assert (info.name, info.label, info.schedule, info.noise, info.evals, info.discard_penultimate,
                info.supports_s_noise) == (name, label, sched, noise, evals, discard, s_noise)
        assert info.fn.__name__.startswith("sample_") and info.description and "\n" not in info.description
        stochastic = noise != "none" and name not in ("ddim", "lcm")
        assert info.supports_eta == (stochastic or name == "ddim")
        assert info.default_eta == (1.0 if stochastic else 0.0)
        assert info.schedulers == (tuple(schedule.SCHEDULERS) if sched in schedule.SCHEDULERS else (sched,))
    assert get_sampler("dpmpp_2m").a1111_name == "DPM++ 2M"
    assert get_sampler("euler_a").alias_of == "euler_ancestral"


def _sigma_list(name, steps, scheduler):
    info = SAMPLERS[name]
    return schedule.scheduler_sigmas(info.resolve_scheduler(scheduler), steps, SIGMAS,
                                     info.discard_penultimate).tolist()


@pytest.mark.parametrize("name", KSAMPLERS)
@pytest.mark.parametrize("steps, scheduler", [(1, None), (3, None), (7, None), (30, None), (7, "ddim_uniform"),
                                              (10, "beta"), (4, "simple")])
def test_k_sampler_calls_and_callback(name, steps, scheduler):
    info = SAMPLERS[name]
    model = GaussianEps()
    seen = []
    out = info.fn(model, _noise((2, 4, 4, 4), seed=4, dtype=torch.float32), AC, steps, scheduler=scheduler,
                  generator=torch.Generator().manual_seed(0),
                  callback=lambda i, total, x: seen.append((i, total, x.shape)))
    assert out.shape == (2, 4, 4, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
    sig = _sigma_list(name, steps, scheduler)
    n = len(sig) - 1
    assert seen == [(i, n, (2, 4, 4, 4)) for i in range(n)]
    assert model.calls == info.calls(steps, scheduler) == info.evals * n - (info.evals - 1)
    # Every step starts with a call at its own sigma; the last call is at the last nonzero sigma.
    at_start = [schedule.sigma_to_t(s, SIGMAS).item() for s in sig[:-1]]
    starts = model.ts[:: info.evals] if info.evals == 1 else [model.ts[2 * i] for i in range(n)]
    np.testing.assert_allclose(starts, at_start, atol=2e-4)
    assert model.ts[-1] == pytest.approx(at_start[-1], abs=2e-4)
    assert all(0 <= t <= 999 for t in model.ts)


@pytest.mark.parametrize("steps", [1, 4, 8, 50])
def test_lcm_calls_and_callback(steps):
    model = GaussianEps()
    seen = []
    SAMPLERS["lcm"].fn(model, _noise((2, 4, 4, 4), seed=4, dtype=torch.float32), AC, steps,
                       generator=torch.Generator().manual_seed(0), callback=lambda i, t, x: seen.append((i, t)))
    assert model.ts == [float(t) for t in lcm_timesteps(steps)]
    assert seen == [(i, steps) for i in range(steps)] and model.calls == SAMPLERS["lcm"].calls(steps) == steps


def test_calls_counts():
    assert get_sampler("heun").calls(20) == 39
    assert get_sampler("dpm_2").calls(20) == 39  # 21 sigmas made, the penultimate dropped: 20 steps
    assert get_sampler("dpmpp_sde").calls(1) == 1
    assert get_sampler("euler").calls(30, "ddim_uniform") == 31  # CompVis' grid has 31 points
    assert get_sampler("lms").calls(1000, "beta") == 847  # beta drops repeated timesteps
    assert get_sampler("lcm").calls(4) == 4
    with pytest.raises(UsageError):
        get_sampler("lcm").calls(51)
    with pytest.raises(UsageError):
        get_sampler("euler").calls(10, "karass")
    with pytest.raises(UsageError):
        get_sampler("ddim").calls(10, "karras")


@pytest.mark.parametrize("name", KSAMPLERS)
def test_none_runs_the_default_scheduler(name):
    info = SAMPLERS[name]
    x_T = _noise((1, 4, 4, 4), seed=8, dtype=torch.float32)
    run = lambda sched: info.fn(GaussianEps(), x_T, AC, 6, scheduler=sched,  # noqa: E731
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(run(None), run(info.schedule))
    other = "simple" if info.schedule != "simple" else "karras"
    assert not torch.equal(run(None), run(other))


def test_euler_a_is_euler_ancestral_on_karras_sigmas():
    x_T = _noise((1, 4, 4, 4), seed=8, dtype=torch.float32)
    run = lambda name, **kw: SAMPLERS[name].fn(GaussianEps(), x_T, AC, 9,  # noqa: E731
                                               generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(run("euler_a"), run("euler_ancestral", scheduler="karras"))
    assert torch.equal(run("euler_a", scheduler="normal"), run("euler_ancestral"))


@pytest.mark.parametrize("name", ["ddim", "plms", "lcm"])
def test_own_grid_samplers_take_no_scheduler(name):
    grid = SAMPLERS[name].schedule
    x_T = _noise((1, 4, 4, 4), seed=8, dtype=torch.float32)
    SAMPLERS[name].fn(GaussianEps(), x_T, AC, 4, scheduler=grid)
    with pytest.raises(UsageError):
        SAMPLERS[name].fn(GaussianEps(), x_T, AC, 4, scheduler="karras")
    assert SAMPLERS[name].resolve_scheduler(None) == grid
    with pytest.raises(UsageError):
        SAMPLERS[name].resolve_scheduler("normal")


def test_unknown_scheduler_lists_the_names():
    with pytest.raises(UsageError) as err:
        SAMPLERS["euler"].fn(GaussianEps(), _noise((1, 4, 2, 2), seed=1), AC, 4, scheduler="Karras")
    for name in schedule.SCHEDULERS:
        assert name in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_s_noise_validation(name):
    info = SAMPLERS[name]
    x_T = _noise((1, 4, 2, 2), seed=1)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(UsageError):
            info.fn(GaussianEps(), x_T, AC, 3, s_noise=bad)
        with pytest.raises(UsageError):
            info.resolve_s_noise(bad)
    assert info.resolve_s_noise(None) == 1.0
    if info.supports_s_noise:
        assert info.resolve_s_noise(0.95) == 0.95
    else:
        with pytest.raises(UsageError):
            info.fn(GaussianEps(), x_T, AC, 3, s_noise=0.9)


@pytest.mark.parametrize("name", [n for n in KSAMPLERS if n not in ("dpmpp_2m", "euler_a")])
def test_eta(name):
    info = SAMPLERS[name]
    x_T = _noise((1, 4, 4, 4), seed=6, dtype=torch.float32)
    run = lambda eta: info.fn(GaussianEps(), x_T, AC, 8, eta=eta,  # noqa: E731
                              generator=torch.Generator().manual_seed(1))
    if info.noise == "none":
        with pytest.raises(UsageError):
            run(0.3)
        assert info.resolve_eta(0.0) == 0.0
    else:  # 0.0 (the shared default) is the standard 1.0, as for Euler a
        assert torch.equal(run(0.0), run(1.0)) and not torch.equal(run(0.5), run(1.0))
        assert info.resolve_eta(0.0) == 1.0 and info.resolve_eta(0.4) == 0.4
    with pytest.raises(UsageError):
        run(1.5)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeding_and_noise_source(name):
    info = SAMPLERS[name]
    x_T = _noise((2, 4, 8, 8), seed=5, dtype=torch.float32)

    def run(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        out = info.fn(GaussianEps(), x_T, AC, 10, generator=gen, **kw)
        return out, gen

    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    (a, gen_a), (b, _), (c, _) = run(7), run(7), run(8)
    assert torch.equal(torch.get_rng_state(), global_state)  # only the given generator is used
    assert torch.equal(a, b) and (a - c).abs().max().item() > 0.05
    fresh = torch.Generator().manual_seed(7)
    if info.noise == "brownian":  # the tree is seeded from the seed; the generator's stream is untouched
        assert torch.equal(gen_a.get_state(), fresh.get_state())
    else:  # one draw per step that adds noise (the last step adds none)
        assert not torch.equal(gen_a.get_state(), fresh.get_state())
    # s_noise 0: no fresh noise at all, so the seed no longer matters
    assert torch.equal(run(7, s_noise=0.0)[0], run(8, s_noise=0.0)[0])


@pytest.mark.parametrize("name", [n for n in KSAMPLERS if SAMPLERS[n].noise == "none"] + ["lcm"])
def test_float32_matches_float64(name):
    x64 = _noise((1, 4, 8, 8), seed=3)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    out64 = SAMPLERS[name].fn(GaussianEps(), x64, AC, 12, generator=gen())
    out32 = SAMPLERS[name].fn(GaussianEps(), x64.float(), AC, 12, generator=gen())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert (out32.double() - out64).abs().max().item() < 2e-5


def test_brownian_noise_is_one_path():
    """The normalized increments are those of ONE Brownian path: additive over adjacent intervals,
    independent of the order of the queries, unit variance, and the same for the same seed."""
    x = torch.zeros(4, 4, 32, 32)
    a, b, c = 10.0, 3.0, 0.5
    tree = BrownianNoise(x, 0.03, 14.6, seed=5)
    w_ab, w_bc = tree(a, b) * math.sqrt(a - b), tree(b, c) * math.sqrt(b - c)
    w_ac = tree(a, c) * math.sqrt(a - c)
    assert (w_ab + w_bc - w_ac).abs().max().item() < 1e-5
    other = BrownianNoise(x, 0.03, 14.6, seed=5)
    assert torch.equal(other(a, c), tree(a, c)) and torch.equal(other(b, c), tree(b, c))
    z = tree(a, b)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.03
    corr = (tree(a, c) * tree(a, b)).mean().item()  # [b, a] inside [c, a]: sqrt((a-b)/(a-c))
    assert corr == pytest.approx(math.sqrt((a - b) / (a - c)), abs=0.03)
    assert not torch.equal(BrownianNoise(x, 0.03, 14.6, seed=6)(a, b), z)
    assert BrownianNoise(x.double(), 0.03, 14.6, seed=5)(a, b).dtype == torch.float64
