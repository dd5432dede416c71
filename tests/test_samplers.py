"""Samplers against exact answers, CompVis step-by-step equivalence, guidance, registry.

The analytic case: data x0 ~ N(mu_c, s_c^2) independently per element, with per-channel
(mu, s). For the VP model at alpha_bar a, x_t ~ N(sqrt(a) mu, a s^2 + 1 - a) and the exact
posterior mean is  E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) * (x_t - sqrt(a) mu),
so the exact noise predictor is eps = (x_t - sqrt(a) E[x0|x_t]) / sqrt(1 - a).

Along the probability-flow ODE the standardized value z = (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a)
is invariant (a 1-D monotone transport of Gaussians maps quantiles to quantiles), which gives
the exact endpoint of every deterministic sampler from its own start point.
"""

import math

import numpy as np
import pytest
import torch

from sd_cli.sampling import schedule
from sd_cli.errors import UsageError
from sd_cli.pipeline.guidance import guided_eps_model
from sd_cli.sampling.samplers import SAMPLERS, SamplerInfo, get_sampler

AC = schedule.make_alphas_cumprod()  # (1000,) f32, the model buffer
AC64 = AC.double()  # the same numbers in float64
SIGMAS = schedule.sigmas_from_alphas_cumprod(AC)  # (1000,) f32, as the k-samplers build them
SIGMA_MIN, SIGMA_MAX = SIGMAS[0].item(), SIGMAS[-1].item()

MU = [0.5, -1.0, 0.0, 2.0]  # per-channel data mean
STD = [0.3, 1.0, 0.1, 0.7]  # per-channel data std (0.1: sharp, the hardest near t = 0)


class GaussianEps:
    """Exact eps-model for x0 ~ N(mu, s^2) per channel; counts and checks its calls.

    Timesteps: an integer t uses alphas_cumprod[t] exactly (DDIM/PLMS feed integers); a
    fractional t (k-samplers) uses a = 1 / (1 + sigma(t)^2) with sigma(t) the same log-linear
    interpolation the samplers invert (schedule.t_to_sigma), so the model agrees with the
    sigma the sampler meant, up to the float32 rounding of t (~1e-7 relative in sigma).
    """

    def __init__(self, mu=MU, std=STD):
        self.mu = torch.tensor(mu, dtype=torch.float64).view(1, -1, 1, 1)  # (1,C,1,1)
        self.s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.calls = 0
        self.ts = []

    def alpha(self, t):  # t (B,) -> a (B,1,1,1) float64
        t = t.detach().double().cpu()
        a = torch.empty_like(t)
        whole = t == t.round()
        a[whole] = AC64[t[whole].long()]
        a[~whole] = 1.0 / (1.0 + schedule.t_to_sigma(t[~whole], SIGMAS) ** 2)
        return a.view(-1, 1, 1, 1)

    def __call__(self, x, t):
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],) and t.device == x.device
        assert 0.0 <= t.min().item() and t.max().item() <= 999.0
        self.calls += 1
        self.ts.append(t[0].item())
        a = self.alpha(t)
        xd = x.double()
        x0 = self.mu + a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a) * (xd - a.sqrt() * self.mu)
        return ((xd - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)

    def _z(self, x, a):  # standardized value of x under N(sqrt(a) mu, a s^2 + 1 - a)
        return (x.double() - math.sqrt(a) * self.mu) / (a * self.s**2 + 1 - a).sqrt()

    def discrete_endpoint(self, x_T, steps):
        """Exact ODE map from a at the top grid point to a_0 = alphas_cumprod[0] (DDIM, PLMS)."""
        a_T = AC64[schedule.ddim_timesteps(steps)[-1]].item()
        a_0 = AC64[0].item()
        return math.sqrt(a_0) * self.mu + (a_0 * self.s**2 + 1 - a_0).sqrt() * self._z(x_T, a_T)

    def karras_endpoint(self, x_T):
        """Exact ODE map from sigma_max x_T down to sigma_min, then the exact denoiser: the final
        Karras step (to sigma = 0) of DPM++ 2M returns D(x, sigma_min), not the ODE at 0."""
        z = (SIGMA_MAX * x_T.double() - self.mu) / (self.s**2 + SIGMA_MAX**2).sqrt()
        return self.mu + self.s**2 / (self.s**2 + SIGMA_MIN**2).sqrt() * z


def _noise(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _err(name, steps, x_T):
    model = GaussianEps()
    out = SAMPLERS[name].fn(model, x_T, AC, steps)
    ref = model.karras_endpoint(x_T) if name == "dpmpp_2m" else model.discrete_endpoint(x_T, steps)
    return (out.double() - ref).abs().max().item()


# --- deterministic samplers: exact endpoint and convergence --------------------------------

X_T = _noise((2, 4, 8, 8), seed=0)  # 128 values per channel, float64 so rounding stays ~1e-15


# Max-abs error (over 512 values) measured with this X_T: ddim 0.0746, plms 0.0113,
# dpmpp_2m 0.0211 (25 steps). These are deterministic float64 computations, so the bounds
# are the measured numbers with a 1.5x margin for platform differences in libm/BLAS; the
# convergence test below (scale-free ratios) is what pins down each method's behaviour.
@pytest.mark.parametrize(
    "name, steps, bound", [("ddim", 50, 0.11), ("plms", 50, 0.017), ("dpmpp_2m", 25, 0.032)]
)
def test_deterministic_endpoint(name, steps, bound):
    assert _err(name, steps, X_T) < bound


def test_convergence_orders():
    e = {n: {k: _err(n, k, X_T) for k in (25, 50, 100)} for n in ("ddim", "plms", "dpmpp_2m")}
    # DDIM = Euler on the ODE in (sigma, x/sqrt(a)): first order, halving per doubling
    # (measured ratios 1.92 and 1.87).
    for k in (25, 50):
        assert 1.6 < e["ddim"][k] / e["ddim"][2 * k] < 2.4
    # DPM-Solver++(2M): second order (measured 4.37, 4.18).
    for k in (25, 50):
        assert e["dpmpp_2m"][k] / e["dpmpp_2m"][2 * k] > 3.5
    # PLMS: much better than DDIM at equal steps (6.6x at 50) and fast-converging here
    # (measured 2.8x then 19x). Its asymptotic order is only ~2, and from ~100 steps on a
    # final-step term dominates: the last step t=1 -> a_0 is one timestep long while the
    # Adams-Bashforth weights assume a step of 1000//steps (see the report).
    assert e["plms"][50] < e["ddim"][50] / 5
    assert e["plms"][25] / e["plms"][50] > 2.5
    assert e["plms"][50] / e["plms"][100] > 4


@pytest.mark.parametrize("name, steps", [("ddim", 20), ("plms", 20), ("dpmpp_2m", 20)])
def test_float32_matches_float64(name, steps):
    x64 = _noise((1, 4, 8, 8), seed=3)
    out64 = SAMPLERS[name].fn(GaussianEps(), x64, AC, steps)
    out32 = SAMPLERS[name].fn(GaussianEps(), x64.float(), AC, steps)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert (out32.double() - out64).abs().max().item() < 2e-5


# --- stochastic samplers: moments of the exact discretized chain --------------------------


def _chain_moments(name, steps, eta):
    """Per-channel mean and std of the sampler's output, propagated exactly in float64.

    With the exact (affine) denoiser every step is x' = A x + b + c z, so for x_T ~ N(0, 1)
    the output is Gaussian with moments from m' = A m + b, v' = A^2 v + c^2. The step maps
    are re-derived here in closed form, not taken from the sampler.
    """
    mu, s2 = np.array(MU), np.array(STD) ** 2
    m, v = np.zeros(4), np.ones(4)
    if name == "ddim":
        ts = schedule.ddim_timesteps(steps)
        alphas = [AC64[t].item() for t in ts[::-1]] + [AC64[0].item()]
        for a, ap in zip(alphas[:-1], alphas[1:]):
            c2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
            k = math.sqrt(a) * s2 / (a * s2 + 1 - a)  # E[x0|x] = k x + (1 - k sqrt(a)) mu
            # x' = sqrt(ap) E[x0|x] + sqrt(1 - ap - c2) (x - sqrt(a) E[x0|x]) / sqrt(1 - a)
            w = math.sqrt(1 - ap - c2) / math.sqrt(1 - a)
            slope_x0 = math.sqrt(ap) - w * math.sqrt(a)
            A = slope_x0 * k + w
            b = slope_x0 * (1 - k * math.sqrt(a)) * mu
            m, v = A * m + b, A * A * v + c2
    else:  # euler_a in the VE variable, starting at sigma_max * x_T
        sig = schedule.karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX).tolist()
        v = v * sig[0] ** 2
        for s_hi, s_lo in zip(sig[:-1], sig[1:]):
            up = min(s_lo, eta * math.sqrt(s_lo**2 * (s_hi**2 - s_lo**2) / s_hi**2))
            down = math.sqrt(s_lo**2 - up**2)
            q = s2 / (s2 + s_hi**2)  # D(x) = mu + q (x - mu); slope (x - D)/sigma
            A = 1 + (1 - q) * (down - s_hi) / s_hi
            b = -(1 - q) * mu * (down - s_hi) / s_hi
            m, v = A * m + b, A * A * v + up**2
    return m, np.sqrt(v)


STOCH_SHAPE = (5, 4, 64, 64)  # 20480 independent values per channel


@pytest.fixture
def one_thread():
    """Run single-threaded: on ~80k-element tensors torch's intra-op threading costs far more
    than the arithmetic (measured 70x slower per op with 2 threads on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "name, steps, eta",
    [("ddim", 50, 1.0), ("ddim", 25, 0.5), ("euler_a", 30, 0.0), ("euler_a", 30, 0.5)],
)
def test_stochastic_moments(name, steps, eta, one_thread):
    x_T = _noise(STOCH_SHAPE, seed=1, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    out = SAMPLERS[name].fn(GaussianEps(), x_T, AC, steps, eta=eta, generator=gen).double()
    used_eta = SAMPLERS[name].resolve_eta(eta)  # euler_a: 0.0 means 1.0
    m_ref, sd_ref = _chain_moments(name, steps, used_eta)
    n = out.numel() // 4
    m = out.mean(dim=(0, 2, 3)).numpy()
    sd = out.std(dim=(0, 2, 3)).numpy()
    # Standard errors of a Gaussian sample: sd/sqrt(n) for the mean, sd/sqrt(2n) for the std.
    # 5 SE over 8 statistics: a false failure has probability ~5e-6 (and the seeds are fixed).
    np.testing.assert_array_less(np.abs(m - m_ref), 5 * sd_ref / math.sqrt(n))
    np.testing.assert_array_less(np.abs(sd - sd_ref), 5 * sd_ref / math.sqrt(2 * n))


def test_stochastic_chain_approaches_data_distribution():
    """The ancestral chains are biased at practical step counts (the output std is too small:
    each step re-noises around a point estimate of x0) and the bias shrinks with steps."""
    s = np.array(STD)
    a0 = AC64[0].item()
    ddim_target = np.sqrt(a0 * s**2 + 1 - a0)  # x at a_0
    ea_target = s**2 / np.sqrt(s**2 + SIGMA_MIN**2)  # D(x) at sigma_min
    bias = {}
    for steps in (50, 500):
        bias["ddim", steps] = np.abs(_chain_moments("ddim", steps, 1.0)[1] / ddim_target - 1).max()
        bias["ea", steps] = np.abs(_chain_moments("euler_a", steps, 1.0)[1] / ea_target - 1).max()
    # Relative std deficit, max over channels. Measured: euler_a 0.077 -> 0.0080 (first
    # order, halving per doubling); ddim 0.30 -> 0.076, slower because the sharp s = 0.1
    # channel converges only like ~steps^-0.6 (the other channels: 0.071 -> 0.0099).
    assert bias["ea", 500] < bias["ea", 50] / 8 and bias["ea", 500] < 0.01
    assert bias["ddim", 500] < bias["ddim", 50] / 3 and bias["ddim", 500] < 0.08


@pytest.mark.parametrize("name, eta", [("ddim", 1.0), ("euler_a", 0.0)])
def test_seeding(name, eta):
    x_T = _noise((2, 4, 8, 8), seed=5, dtype=torch.float32)
    fn = SAMPLERS[name].fn

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return fn(GaussianEps(), x_T, AC, 10, eta=eta, generator=gen)

    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(torch.get_rng_state(), global_state)  # only the given generator is used
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 0.05
    assert torch.equal(x_T, _noise((2, 4, 8, 8), seed=5, dtype=torch.float32))  # input untouched


def test_noise_is_cpu_float32_draws_in_step_order():
    """DDIM eta>0 with a zero model: x_prev = sqrt(a_prev/a) x + sigma z, z the k-th draw of
    torch.randn(shape, generator, dtype=float32) - the contract that makes CPU and CUDA agree."""
    steps, eta = 4, 0.7
    x_T = _noise((1, 2, 3, 3), seed=9)  # float64: the draws are made in float32 then cast
    out = SAMPLERS["ddim"].fn(
        lambda x, t: torch.zeros_like(x), x_T, AC, steps, eta=eta,
        generator=torch.Generator().manual_seed(11),
    )
    gen = torch.Generator().manual_seed(11)
    ts = schedule.ddim_timesteps(steps)[::-1].tolist()
    x = x_T.clone()
    for t, t_prev in zip(ts, ts[1:] + [0]):
        a, ap = AC64[t].item(), AC64[t_prev].item()
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        z = torch.randn(x.shape, generator=gen, dtype=torch.float32).double()
        x = math.sqrt(ap / a) * x + sigma * z
    assert (out - x).abs().max().item() < 1e-6


# --- CompVis equivalence, re-derived by hand in float64 -----------------------------------


def _toy_eps(x, t):
    """A tiny smooth stand-in for the UNet: eps = 0.1 x + 0.01 t / 1000."""
    return 0.1 * x + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype) / 1000


def _toy_eps_np(x, t):
    return 0.1 * x + 0.01 * t / 1000


def _np_ddim_step(x, e, a, ap):
    """DDIM eq. 12 (eta = 0) rearranged: x' = sqrt(ap/a) x + (sqrt(1-ap) - sqrt(ap (1-a) / a)) e."""
    return math.sqrt(ap / a) * x + (math.sqrt(1 - ap) - math.sqrt(ap * (1 - a) / a)) * e


def test_ddim_matches_hand_derivation():
    x_T = _noise((2, 4, 3, 3), seed=21, dtype=torch.float32)
    ts = [751, 501, 251, 1]  # ddim_timesteps(4), walked down
    x = x_T.double().numpy()
    for t, t_prev in zip(ts, ts[1:] + [0]):
        x = _np_ddim_step(x, _toy_eps_np(x, t), AC64[t].item(), AC64[t_prev].item())
    out = SAMPLERS["ddim"].fn(_toy_eps, x_T, AC, 4)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), x, rtol=0, atol=2e-6)


def test_plms_matches_hand_derivation():
    x_T = _noise((2, 4, 3, 3), seed=22, dtype=torch.float32)
    ts = [801, 601, 401, 201, 1]  # ddim_timesteps(5), walked down: covers all four formulas
    a = lambda t: AC64[t].item()  # noqa: E731
    x = x_T.double().numpy()
    history = []
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [0])):
        e = _toy_eps_np(x, t)
        if i == 0:  # pseudo improved Euler: trial DDIM step, eps at the next grid point, average
            x_trial = _np_ddim_step(x, e, a(t), a(t_prev))
            e_used = 0.5 * (e + _toy_eps_np(x_trial, t_prev))
        else:  # Adams-Bashforth of order min(i + 1, 4) on the eps history (newest first)
            coefs = {1: [3, -1], 2: [23, -16, 5], 3: [55, -59, 37, -9]}[min(i, 3)]
            denom = {1: 2, 2: 12, 3: 24}[min(i, 3)]
            past = [e] + history[::-1]
            e_used = sum(c * p for c, p in zip(coefs, past)) / denom
        x = _np_ddim_step(x, e_used, a(t), a(t_prev))
        history.append(e)
    model_calls = []

    def model(x, t):
        model_calls.append(t[0].item())
        return _toy_eps(x, t)

    out = SAMPLERS["plms"].fn(model, x_T, AC, 5)
    assert model_calls == [801.0, 601.0, 601.0, 401.0, 201.0, 1.0]  # N + 1 calls
    np.testing.assert_allclose(out.double().numpy(), x, rtol=0, atol=2e-6)


def test_plms_single_step_reuses_its_own_timestep():
    model = GaussianEps()
    SAMPLERS["plms"].fn(model, X_T, AC, 1)
    assert model.ts == [1.0, 1.0]


# --- the model-call contract ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "plms", "dpmpp_2m", "euler_a"])  # the others: test_samplers_kdiffusion.py
@pytest.mark.parametrize("steps", [1, 3, 7, 30])
def test_calls_and_callback(name, steps):
    info = SAMPLERS[name]
    model = GaussianEps()
    seen = []
    out = info.fn(
        model, _noise((2, 4, 4, 4), seed=4, dtype=torch.float32), AC, steps,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, total, x: seen.append((i, total, x.shape)),
    )
    assert out.shape == (2, 4, 4, 4) and out.dtype == torch.float32
    assert model.calls == info.calls(steps)
    total = seen[0][1]
    assert seen == [(i, total, (2, 4, 4, 4)) for i in range(total)]
    if info.schedule == "uniform":
        assert total == len(schedule.ddim_timesteps(steps))
        grid = [float(t) for t in schedule.ddim_timesteps(steps)[::-1]]
        # PLMS makes its extra call at the next lower grid point (its own, if there is none).
        if name == "ddim":
            expected = grid
        else:
            expected = [grid[0], grid[min(1, len(grid) - 1)]] + grid[1:]
        assert model.ts == expected
    else:
        assert total == steps
        assert model.ts[0] == 999.0  # sigma_max is the top discrete sigma
        if steps > 1:
            assert model.ts[-1] == pytest.approx(0.0, abs=1e-4)  # sigma_min
            assert all(a > b for a, b in zip(model.ts, model.ts[1:]))


def test_calls_counts():
    assert get_sampler("ddim").calls(50) == 50
    assert get_sampler("ddim").calls(30) == 31  # CompVis grid: 1000 // 30 = 33 -> 31 points
    assert get_sampler("ddim").calls(3) == 3
    assert get_sampler("plms").calls(50) == 51
    assert get_sampler("plms").calls(1) == 2
    assert get_sampler("dpmpp_2m").calls(20) == 20
    assert get_sampler("euler_a").calls(20) == 20


# --- registry and argument errors -------------------------------------------------------------


def test_registry_contents():
    assert list(SAMPLERS)[:4] == ["ddim", "plms", "dpmpp_2m", "euler_a"]  # issue 16 added more after them
    expect = {
        "ddim": ("DDIM", "uniform", True, 0.0),
        "plms": ("PLMS", "uniform", False, 0.0),
        "dpmpp_2m": ("DPM++ 2M Karras", "karras", False, 0.0),
        "euler_a": ("Euler a", "karras", True, 1.0),
    }
    for name, (label, sched, eta_ok, eta_default) in expect.items():
        info = get_sampler(name)
        assert isinstance(info, SamplerInfo) and info.name == name
        assert (info.label, info.schedule, info.supports_eta, info.default_eta) == (
            label, sched, eta_ok, eta_default,
        )
        assert info.fn.__name__.startswith("sample_")
        assert info.description and "\n" not in info.description


def test_unknown_sampler():
    with pytest.raises(UsageError) as err:
        get_sampler("k_lms")
    for name in SAMPLERS:
        assert name in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_steps(name, steps):
    with pytest.raises(UsageError):
        SAMPLERS[name].fn(GaussianEps(), X_T, AC, steps)
    with pytest.raises(UsageError):
        SAMPLERS[name].calls(steps)


@pytest.mark.parametrize(
    "name, eta",
    [("plms", 0.5), ("dpmpp_2m", 0.1), ("ddim", -0.1), ("ddim", 1.5), ("euler_a", float("nan"))],
)
def test_bad_eta(name, eta):
    with pytest.raises(UsageError):
        SAMPLERS[name].fn(GaussianEps(), X_T, AC, 5, eta=eta)
    with pytest.raises(UsageError):
        SAMPLERS[name].resolve_eta(eta)


def test_resolve_eta():
    assert get_sampler("ddim").resolve_eta(0.0) == 0.0
    assert get_sampler("ddim").resolve_eta(None) == 0.0
    assert get_sampler("ddim").resolve_eta(0.3) == 0.3
    assert get_sampler("euler_a").resolve_eta(0.0) == 1.0
    assert get_sampler("euler_a").resolve_eta(0.4) == 0.4
    assert get_sampler("plms").resolve_eta(None) == 0.0


def test_euler_a_eta_zero_means_one():
    x_T = _noise((1, 4, 4, 4), seed=6, dtype=torch.float32)
    run = lambda eta: SAMPLERS["euler_a"].fn(  # noqa: E731
        GaussianEps(), x_T, AC, 8, eta=eta, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(run(0.0), run(1.0))
    assert not torch.equal(run(0.5), run(1.0))


# --- classifier-free guidance ---------------------------------------------------------------


class CountingUNet:
    """eps = x * 0 + (mean of the context row), so the output names which context it saw."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context):
        assert x.shape[0] == t.shape[0] == context.shape[0]
        self.batches.append((x.shape[0], t.clone(), context[:, 0, 0].clone()))
        return x * 0 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def _contexts(b, value):
    return torch.full((b, 77, 8), float(value))


def test_guidance_one_batched_call_uncond_first():
    unet = CountingUNet()
    b, scale = 3, 7.5
    model = guided_eps_model(unet, cond=_contexts(b, 2.0), uncond=_contexts(b, -1.0), scale=scale)
    x = torch.randn(b, 4, 5, 5)
    t = torch.tensor([10.0, 20.0, 30.0])
    eps = model(x, t)
    assert len(unet.batches) == 1
    n, t_in, ctx_first = unet.batches[0]
    assert n == 2 * b
    assert t_in.tolist() == [10.0, 20.0, 30.0, 10.0, 20.0, 30.0]
    assert ctx_first.tolist() == [-1.0] * b + [2.0] * b  # CompVis order: uncond, then cond
    # e_u + s (e_c - e_u) = -1 + 7.5 * 3 = 21.5; swapped halves would give 2 - 7.5*3 = -20.5
    assert eps.shape == x.shape and torch.allclose(eps, torch.full_like(x, 21.5))
    model(x, t)
    assert len(unet.batches) == 2  # one call per evaluation


@pytest.mark.parametrize("scale, uncond", [(1.0, True), (7.5, False)])
def test_guidance_single_branch(scale, uncond):
    unet = CountingUNet()
    b = 2
    model = guided_eps_model(unet, _contexts(b, 2.0), _contexts(b, -1.0) if uncond else None, scale)
    eps = model(torch.randn(b, 4, 5, 5), torch.tensor([5.0, 5.0]))
    assert [n for n, _, _ in unet.batches] == [b]
    assert torch.allclose(eps, torch.full_like(eps, 2.0))


def test_guidance_broadcasts_single_context_and_drives_a_sampler():
    unet = CountingUNet()
    model = guided_eps_model(unet, _contexts(1, 0.5), _contexts(1, 0.0), scale=2.0)
    out = SAMPLERS["plms"].fn(model, torch.zeros(2, 4, 3, 3), AC, 10)
    assert len(unet.batches) == SAMPLERS["plms"].calls(10)
    assert all(n == 4 for n, _, _ in unet.batches)
    assert torch.isfinite(out).all()


def test_guidance_rejects_bad_input():
    with pytest.raises(UsageError):
        guided_eps_model(CountingUNet(), _contexts(1, 0.0), None, float("inf"))
    model = guided_eps_model(CountingUNet(), _contexts(2, 0.0), _contexts(2, 1.0), 5.0)
    with pytest.raises(ValueError):
        model(torch.zeros(3, 4, 2, 2), torch.zeros(3))
