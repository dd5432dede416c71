"""Noise schedule buffers, the DDIM grid, Karras sigmas and the sigma <-> t mapping."""

import math

import numpy as np
import pytest
import torch

from sd_cli.sampling import schedule
from sd_cli.errors import UsageError


@pytest.fixture(scope="module")
def buffers():
    return schedule.ldm_buffers()


@pytest.fixture(scope="module")
def sigmas(buffers):
    return schedule.sigmas_from_alphas_cumprod(buffers["alphas_cumprod"])


def _numpy_reference(start=0.00085, end=0.012, n=1000):
    """The register_schedule formulas, re-derived with numpy only (np.linspace, float64)."""
    beta = np.linspace(math.sqrt(start), math.sqrt(end), n) ** 2
    a = np.cumprod(1.0 - beta)
    a_prev = np.r_[1.0, a[:-1]]
    var = beta * (1 - a_prev) / (1 - a)
    return {
        "betas": beta,
        "alphas_cumprod": a,
        "alphas_cumprod_prev": a_prev,
        "sqrt_alphas_cumprod": a**0.5,
        "sqrt_one_minus_alphas_cumprod": (1 - a) ** 0.5,
        "log_one_minus_alphas_cumprod": np.log1p(-a),
        "sqrt_recip_alphas_cumprod": a**-0.5,
        "sqrt_recipm1_alphas_cumprod": ((1 - a) / a) ** 0.5,
        "posterior_variance": var,
        "posterior_log_variance_clipped": np.log(np.clip(var, 1e-20, None)),
        "posterior_mean_coef1": beta * a_prev**0.5 / (1 - a),
        "posterior_mean_coef2": (1 - a_prev) * (1 - beta) ** 0.5 / (1 - a),
    }


def test_buffers_names_shapes_dtypes(buffers):
    assert list(buffers) == list(schedule.LDM_BUFFER_NAMES)
    assert len(buffers) == 12
    for name, value in buffers.items():
        assert value.dtype == torch.float32, name
        assert value.shape == (1000,), name


def test_buffers_match_independent_float64_derivation(buffers):
    ref = _numpy_reference()
    for name in schedule.LDM_BUFFER_NAMES:
        got = buffers[name].double().numpy()
        # float32 rounding is 6e-8 relative; np.linspace vs torch.linspace may differ by an ulp.
        np.testing.assert_allclose(got, ref[name], rtol=3e-7, atol=1e-12, err_msg=name)


def test_buffers_hand_values(buffers):
    b = {k: v.double() for k, v in buffers.items()}
    # beta_0 = (sqrt(0.00085))^2, beta_999 = 0.012, so a_0 = 1 - 0.00085.
    assert b["betas"][0].item() == pytest.approx(0.00085, rel=1e-6)
    assert b["betas"][-1].item() == pytest.approx(0.012, rel=1e-6)
    assert b["alphas_cumprod"][0].item() == pytest.approx(0.99915, abs=1e-7)
    # a_999 = exp(sum log(1 - beta)) ~= 0.00466 (the quoted "~0.0047").
    assert b["alphas_cumprod"][-1].item() == pytest.approx(0.0047, abs=6e-5)
    assert b["alphas_cumprod_prev"][0].item() == 1.0
    assert b["alphas_cumprod_prev"][1].item() == b["alphas_cumprod"][0].item()
    # sqrt(1/a_0 - 1) = sqrt(0.00085 / 0.99915) = 0.02916716 (from the float64 a_0; the same
    # expression on the float32 a_0, as k-diffusion does, gives sigma_min = 0.02916753).
    assert b["sqrt_recipm1_alphas_cumprod"][0].item() == pytest.approx(0.02916716, rel=1e-6)
    assert b["sqrt_alphas_cumprod"][0].item() == pytest.approx(math.sqrt(0.99915), rel=1e-7)
    assert b["log_one_minus_alphas_cumprod"][0].item() == pytest.approx(math.log(0.00085), rel=1e-6)
    # At t = 0 the posterior q(x_{-1} | x_0, x_0) is a point mass on x_0:
    # variance 0 (log clipped at 1e-20), mean = 1 * x_0 + 0 * x_t.
    assert b["posterior_variance"][0].item() == 0.0
    assert b["posterior_log_variance_clipped"][0].item() == pytest.approx(math.log(1e-20), rel=1e-6)
    assert b["posterior_mean_coef1"][0].item() == pytest.approx(1.0, rel=1e-6)
    assert b["posterior_mean_coef2"][0].item() == 0.0
    # t = 1 by hand from beta_0, beta_1:  a_1 = (1-beta_0)(1-beta_1), var = beta_1 (1-a_0)/(1-a_1).
    r0, r1 = math.sqrt(0.00085), math.sqrt(0.012)
    beta1 = (r0 + (r1 - r0) / 999) ** 2
    a0, a1 = 1 - 0.00085, (1 - 0.00085) * (1 - beta1)
    assert b["posterior_variance"][1].item() == pytest.approx(beta1 * (1 - a0) / (1 - a1), rel=1e-6)
    assert b["posterior_mean_coef2"][1].item() == pytest.approx(
        (1 - a0) * math.sqrt(1 - beta1) / (1 - a1), rel=1e-6
    )


def test_make_alphas_cumprod_is_the_buffer(buffers):
    ac = schedule.make_alphas_cumprod()
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert torch.equal(ac, buffers["alphas_cumprod"])
    assert bool((ac[1:] < ac[:-1]).all())
    other = schedule.make_alphas_cumprod(0.0001, 0.02, 500)
    assert other.shape == (500,) and other[0].item() == pytest.approx(0.9999, abs=1e-7)


def test_bad_schedule_parameters():
    with pytest.raises(UsageError):
        schedule.ldm_buffers(0.02, 0.01)
    with pytest.raises(UsageError):
        schedule.ldm_buffers(0.00085, 0.012, 1)


# --- DDIM grid ------------------------------------------------------------------------------


def test_ddim_timesteps_common_counts():
    ts = schedule.ddim_timesteps(50)
    assert ts.tolist() == list(range(1, 1000, 20))
    assert ts[0] == 1 and ts[-1] == 981 and len(ts) == 50
    assert schedule.ddim_timesteps(1).tolist() == [1]
    assert schedule.ddim_timesteps(2).tolist() == [1, 501]
    assert schedule.ddim_timesteps(20).tolist() == list(range(1, 1000, 50))


def test_ddim_timesteps_compvis_extra_step():
    # c = 1000 // 30 = 33 and range(0, 1000, 33) has 31 entries: CompVis runs 31 steps.
    ts = schedule.ddim_timesteps(30)
    assert len(ts) == 31 and ts[-1] == 991
    assert np.all(np.diff(ts) == 33)
    assert len(schedule.ddim_timesteps(7)) == 8  # c = 142: 0..994


def test_ddim_timesteps_compvis_overflow_cases_are_trimmed():
    # CompVis would index alphas_cumprod[1000] here; the entry >= 1000 is dropped.
    assert schedule.ddim_timesteps(3).tolist() == [1, 334, 667]
    assert schedule.ddim_timesteps(9)[-1] == 889
    assert schedule.ddim_timesteps(1000).tolist() == list(range(1, 1000))
    assert schedule.ddim_timesteps(600).tolist() == list(range(1, 1000))


def test_ddim_timesteps_all_counts_against_compvis_formula():
    for steps in range(1, 1001):
        c = 1000 // steps
        compvis = [t + 1 for t in range(0, 1000, c)]  # CompVis "uniform" + 1
        ts = schedule.ddim_timesteps(steps)
        assert ts.dtype == np.int64
        assert ts.tolist() == [t for t in compvis if t < 1000], steps
        assert len(ts) >= min(steps, 999)


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True, "10", None])
def test_ddim_timesteps_rejects_bad_steps(bad):
    with pytest.raises(UsageError):
        schedule.ddim_timesteps(bad)


# --- sigmas, Karras grid, sigma <-> t ---------------------------------------------------------


def test_discrete_sigma_range(sigmas):
    assert sigmas.dtype == torch.float32 and sigmas.shape == (1000,)
    # The values AUTOMATIC1111 uses as sigma_min / sigma_max for SD v1.x.
    assert sigmas[0].item() == pytest.approx(0.0292, abs=5e-5)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=5e-4)
    assert bool((sigmas[1:] > sigmas[:-1]).all())


def test_karras_sigmas_formula(sigmas):
    smin, smax = sigmas[0].item(), sigmas[-1].item()
    k = schedule.karras_sigmas(3, smin, smax)
    # rho = 7: sigma_1 = ((smax^(1/7) + smin^(1/7)) / 2)^7
    expected = [smax, ((smax ** (1 / 7) + smin ** (1 / 7)) / 2) ** 7, smin, 0.0]
    assert k.shape == (4,)
    np.testing.assert_allclose(k.numpy(), expected, rtol=1e-12)
    k20 = schedule.karras_sigmas(20, smin, smax)
    assert k20.shape == (21,) and k20[-1].item() == 0.0
    assert bool((k20[1:] < k20[:-1]).all())
    assert k20[0].item() == pytest.approx(smax, rel=1e-12)
    assert k20[-2].item() == pytest.approx(smin, rel=1e-12)
    # rho = 1 is a straight line.
    np.testing.assert_allclose(
        schedule.karras_sigmas(5, 1.0, 5.0, rho=1.0).numpy(), [5, 4, 3, 2, 1, 0], rtol=1e-12
    )
    assert schedule.karras_sigmas(1, smin, smax).tolist() == pytest.approx([smax, 0.0])


def test_karras_sigmas_rejects_bad_input():
    with pytest.raises(UsageError):
        schedule.karras_sigmas(0, 0.03, 14.6)
    with pytest.raises(UsageError):
        schedule.karras_sigmas(10, 14.6, 0.03)
    with pytest.raises(UsageError):
        schedule.karras_sigmas(10, 0.03, 14.6, rho=0)


def test_sigma_t_mapping(sigmas):
    # Integer timesteps land exactly on the discrete sigmas and back.
    t_int = torch.arange(1000, dtype=torch.float64)
    np.testing.assert_allclose(
        schedule.t_to_sigma(t_int, sigmas).numpy(), sigmas.double().numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(
        schedule.sigma_to_t(sigmas, sigmas).numpy(), t_int.numpy(), atol=1e-9
    )
    # Halfway in t is the geometric mean in sigma (linear in log sigma).
    s10, s11 = sigmas[10].item(), sigmas[11].item()
    geometric_mean = math.sqrt(s10 * s11)
    assert schedule.t_to_sigma(10.5, sigmas).item() == pytest.approx(geometric_mean, rel=1e-12)
    assert schedule.sigma_to_t(geometric_mean, sigmas).item() == pytest.approx(10.5, abs=1e-9)
    # Round trip at fractional t; shape is kept.
    t = torch.tensor([[0.25, 123.456], [998.9, 500.0]], dtype=torch.float64)
    back = schedule.sigma_to_t(schedule.t_to_sigma(t, sigmas), sigmas)
    assert back.shape == (2, 2)
    np.testing.assert_allclose(back.numpy(), t.numpy(), atol=1e-9)
    # Outside the table: clamp to the ends.
    assert schedule.sigma_to_t(1e-4, sigmas).item() == 0.0
    assert schedule.sigma_to_t(100.0, sigmas).item() == 999.0


# --- schedulers (issue 16) --------------------------------------------------------------------


def _log_sigmas(sigmas):
    return sigmas.double().log()


@pytest.mark.parametrize("name", list(schedule.SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 2, 7, 25, 1000])
def test_every_scheduler_descends_to_zero_inside_the_table(sigmas, name, steps):
    sig = schedule.scheduler_sigmas(name, steps, sigmas)
    assert sig.dtype == torch.float64 and sig[-1].item() == 0.0
    assert bool((sig[1:] < sig[:-1]).all())
    assert sigmas[0].item() - 1e-9 <= sig[-2].item() and sig[0].item() <= sigmas[-1].item() + 1e-9
    n = sig.numel() - 1
    assert n == schedule.scheduler_length(name, steps)
    if name == "ddim_uniform":
        assert n == len(schedule.ddim_timesteps(steps))
    elif name == "beta":
        assert 1 <= n <= steps
    else:
        assert n == steps


def test_scheduler_formulas(sigmas):
    smin, smax = sigmas[0].item(), sigmas[-1].item()
    assert torch.equal(schedule.scheduler_sigmas("karras", 9, sigmas), schedule.karras_sigmas(9, smin, smax))
    exp = schedule.scheduler_sigmas("exponential", 5, sigmas)[:-1]
    np.testing.assert_allclose(np.log(exp.numpy()), np.linspace(math.log(smax), math.log(smin), 5), rtol=1e-12)
    # normal: timesteps 999, 999 - 999/(N-1), ..., 0 through t -> sigma; sgm_uniform: N of N+1 such
    t = np.linspace(999, 0, 4)
    np.testing.assert_allclose(schedule.scheduler_sigmas("normal", 4, sigmas)[:-1].numpy(),
                               schedule.t_to_sigma(torch.tensor(t), sigmas).numpy(), rtol=1e-12)
    t = np.linspace(999, 0, 5)[:-1]
    np.testing.assert_allclose(schedule.scheduler_sigmas("sgm_uniform", 4, sigmas)[:-1].numpy(),
                               schedule.t_to_sigma(torch.tensor(t), sigmas).numpy(), rtol=1e-12)
    # simple: table entries 999, 999 - 250, ... for 4 steps (ComfyUI: sigmas[-(1 + int(i * n / steps))])
    assert schedule.scheduler_sigmas("simple", 4, sigmas)[:-1].tolist() == sigmas[[999, 749, 499, 249]].double().tolist()
    # ddim_uniform: the table at CompVis' grid, from the top
    assert schedule.scheduler_sigmas("ddim_uniform", 4, sigmas)[:-1].tolist() == sigmas[[751, 501, 251, 1]].double().tolist()
    # beta(0.6, 0.6) quantiles of 999, rounded: dense at both ends
    from scipy import stats

    ts = np.rint(stats.beta.ppf(1 - np.arange(10) / 10, 0.6, 0.6) * 999).astype(int)
    assert ts[0] == 999 and ts[-1] < 100
    assert schedule.scheduler_sigmas("beta", 10, sigmas)[:-1].tolist() == sigmas[ts.tolist()].double().tolist()


def test_discard_penultimate(sigmas):
    full = schedule.scheduler_sigmas("karras", 11, sigmas)
    cut = schedule.scheduler_sigmas("karras", 10, sigmas, discard_penultimate=True)
    assert cut.numel() == 11 and torch.equal(cut, torch.cat([full[:-2], full[-1:]]))
    assert cut[-2].item() > sigmas[0].item() * 1.5  # the last step to 0 starts above sigma_min
    assert schedule.scheduler_length("karras", 10, discard_penultimate=True) == 10
    assert schedule.scheduler_sigmas("normal", 1, sigmas, discard_penultimate=True).tolist() == [
        pytest.approx(sigmas[-1].item()), 0.0]


def test_scheduler_names_and_labels():
    assert list(schedule.SCHEDULERS) == ["karras", "exponential", "normal", "simple", "sgm_uniform",
                                         "ddim_uniform", "beta"]
    assert set(schedule.SCHEDULER_LABELS) == set(schedule.SCHEDULERS)
    assert schedule.SCHEDULER_LABELS["karras"] == "Karras" and schedule.SCHEDULER_LABELS["sgm_uniform"] == "SGM Uniform"


@pytest.mark.parametrize("bad", ["Karras", "uniform", "", None, 3])
def test_unknown_scheduler(sigmas, bad):
    with pytest.raises(UsageError) as err:
        schedule.scheduler_sigmas(bad, 10, sigmas)
    assert "karras" in str(err.value) and err.value.exit_code == 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_scheduler_rejects_bad_steps(sigmas, bad):
    with pytest.raises(UsageError):
        schedule.scheduler_sigmas("normal", bad, sigmas)
