"""UniPC (sd_cli/sampling/unipc.py): equality with diffusers' UniPCMultistepScheduler, image to image, the
registry and the CLI names.

Parity: diffusers' scheduler (solver_order 3, lower_order_final, predict_x0, bh1 / bh2) steps on the
same sigmas as ours, fed the eps of the tiny model of test_samplers_kdiffusion.py (guidance 7.5 plus the
exact Gaussian eps) at the same fractional timesteps. The final sigma: ComfyUI's sample_unipc (whose
results `uni_pc` reproduces) replaces a final 0 by 0.001 and returns x there; diffusers' own
final_sigmas_type "zero" gives NaN for bh1 (B(h) = -h is -inf on the step to 0, times a zero residual;
checked on diffusers 0.42.1) and "sigma_min" ends at the model's sigma_min (0.0292). So diffusers gets our
list WITH the 0.001 (its `sigmas` set to it), where the two rules agree, and its VP result is turned
into VE (x / alpha at 0.001) as ComfyUI does. Below 15 steps throughout: older diffusers lowered the
final order only there. Bound: max |ours - diffusers| <= 1e-4 on the final latents (fp32).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import test_samplers_kdiffusion as kdt
from test_samplers import AC, SIGMAS, GaussianEps, _noise

from sd_cli.errors import UsageError
from sd_cli.sampling import schedule
from sd_cli.sampling.common import make_denoiser
from sd_cli.sampling.samplers import SAMPLERS, get_sampler, img2img_start
from sd_cli.sampling.unipc import (
    COMFY_FINAL_SIGMA,
    final_sigma_rule,
    run_uni_pc,
    step_coefficients,
    step_order,
)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]

tiny_eps = kdt.tiny_eps  # the fixture: the tiny UNet under guidance plus the exact Gaussian eps
SEED, SHAPE, TOL = kdt.SEED, kdt.SHAPE, 1e-4
VARIANTS = {"uni_pc": "bh1", "uni_pc_bh2": "bh2"}


def _sigmas(name: str, steps: int, scheduler: str | None) -> list[float]:
    info = SAMPLERS[name]
    return final_sigma_rule(schedule.scheduler_sigmas(info.resolve_scheduler(scheduler), steps, SIGMAS).tolist())


def _diffusers(variant: str, sig: list[float]):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        solver_order=3, solver_type=variant, lower_order_final=True, predict_x0=True,
        prediction_type="epsilon", thresholding=False)
    n = len(sig) - 1
    sched.set_timesteps(n)  # resets its state; then our sigmas (float32, as diffusers keeps them)
    sched.sigmas = torch.tensor(sig, dtype=torch.float32)
    sched.timesteps = torch.arange(n - 1, -1, -1)  # only counted (lower_order_final) and passed back
    return sched


def _diffusers_run(eps, variant: str, sig: list[float], x_ve: torch.Tensor, begin: int = 0) -> torch.Tensor:
    """diffusers from x_ve (B,C,h,w) at sig[begin] to the end: VP in, model on the VP x, VE out."""
    sched = _diffusers(variant, sig)
    sched.set_begin_index(begin)
    x = x_ve / math.sqrt(1 + sig[begin] ** 2)  # VP: alpha x_ve, alpha = 1 / sqrt(1 + sigma^2)
    for i in range(begin, len(sig) - 1):
        t = schedule.sigma_to_t(sig[i], SIGMAS).item()
        e = eps(x, torch.full((x.shape[0],), t, dtype=torch.float32))
        x = sched.step(e, sched.timesteps[i], x, return_dict=False)[0]
    return x * math.sqrt(1 + sig[-1] ** 2)  # / alpha at the final 0.001 (ComfyUI's x /= marginal_alpha)


def _x_T():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)


PARITY = [(8, None), (12, "karras"), (5, "normal"), (3, "exponential"), (2, None), (14, "simple")]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("steps, scheduler", PARITY, ids=[f"{s}-{c or 'default'}" for s, c in PARITY])
def test_equals_diffusers_unipc(tiny_eps, name, steps, scheduler):
    sig = _sigmas(name, steps, scheduler)
    ref = _diffusers_run(tiny_eps, VARIANTS[name], sig, _x_T() * sig[0])
    ours = SAMPLERS[name].fn(tiny_eps, _x_T(), AC, steps, scheduler=scheduler)
    diff = (ours - ref).abs().max().item()
    print(f"{name} {steps} [{scheduler or SAMPLERS[name].schedule}]: max|ours - diffusers| = {diff:.2e} "
          f"(max|ref| {ref.abs().max().item():.3g})")
    assert ours.dtype == torch.float32 and torch.isfinite(ref).all()
    assert diff <= TOL


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("t_enc", [3, 7])
def test_img2img_start_equals_diffusers_begin_index(tiny_eps, name, t_enc):
    """A start > 0 run is UniPC begun afresh at sigma_start (warm-up from order 1), as diffusers' image to
    image (set_begin_index) runs it, on the latents img2img_start noises to that sigma."""
    steps = 10
    info = get_sampler(name)
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    x_T, start = img2img_start(info, x0, noise, AC, steps, None, t_enc)
    sig = _sigmas(name, steps, None)
    assert start == steps - t_enc - 1 and torch.allclose(x_T * sig[start], x0 + sig[start] * noise, atol=1e-5)
    ref = _diffusers_run(tiny_eps, VARIANTS[name], sig, x_T * sig[start], begin=start)
    ours = info.fn(tiny_eps, x_T, AC, steps, start=start)
    diff = (ours - ref).abs().max().item()
    print(f"{name} img2img start {start}: max|ours - diffusers| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_start_is_a_fresh_run_from_that_sigma(name):
    """start = s is the loop on the list from sigma_s with x = x_T sigma_s (orders restart at 1 there)."""
    x_T = _noise((1, 4, 4, 4), seed=2, dtype=torch.float32)
    sig = _sigmas(name, 9, None)
    seen = []
    ours = SAMPLERS[name].fn(GaussianEps(), x_T, AC, 9, start=4, callback=lambda i, n, x: seen.append((i, n)))
    loop = run_uni_pc(make_denoiser(GaussianEps(), SIGMAS), x_T * sig[4], sig[4:], VARIANTS[name], 3)
    assert torch.equal(ours, loop) and seen == [(i, 5) for i in range(5)]


def test_orders_and_final_sigma():
    assert [step_order(i, 8, 3) for i in range(8)] == [1, 2, 3, 3, 3, 3, 2, 1]
    assert [step_order(i, 3, 3) for i in range(3)] == [1, 2, 1]
    assert [step_order(i, 2, 3) for i in range(2)] == [1, 1] and step_order(0, 1, 3) == 1
    assert final_sigma_rule([14.6, 1.0, 0.0]) == [14.6, 1.0, COMFY_FINAL_SIGMA] == [14.6, 1.0, 0.001]
    assert final_sigma_rule([14.6, 1.0, 0.5]) == [14.6, 1.0, 0.5]


def _one_step(lam, i, p, variant, poly, corrector):
    """One UniP / UniC step from x = 0 at lam[i] for a denoiser D = poly(lambda) that ignores x."""
    h, b_h, rks, rho_p, rho_c = step_coefficients(lam, i, p, variant)
    m0 = poly(lam[i])
    d1s = [(poly(lam[i - k]) - m0) / rks[k - 1] for k in range(1, p)]
    base = -math.expm1(-h) * m0
    if not corrector:
        return base - b_h * float(np.dot(rho_p, d1s)) if p > 1 else base
    return base - b_h * (float(np.dot(rho_c[:-1], d1s)) + rho_c[-1] * (poly(lam[i + 1]) - m0))


def _exact(lam_s, lam_t, poly):
    """x at lam_t from x = 0 at lam_s along dx/dlambda = D - x: int e^-(lam_t - l) D(l) dl (Gauss-Legendre)."""
    nodes, weights = np.polynomial.legendre.leggauss(20)
    ls = (lam_s + lam_t) / 2 + (lam_t - lam_s) / 2 * nodes
    return float(np.sum(weights * np.exp(-(lam_t - ls)) * poly(ls)) * (lam_t - lam_s) / 2)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_coefficients_are_exact_on_polynomial_denoisers(variant):
    """The order conditions R rho = g / B(h): UniC-p integrates a denoiser polynomial of degree p in lambda
    exactly, UniP-p (p >= 3, a real solve) one of degree p - 1; one degree more is not exact, nor is the
    simplified UniP-2 weight 1/2 on a line. Uneven steps, h up to 0.9."""
    lam = [-2.6, -1.7, -1.1, -0.3, 0.4]
    rng = np.random.default_rng(0)
    for p, i in ((2, 2), (3, 3), (3, 2)):
        for degree, corrector, exact in ((p, True, True), (p + 1, True, False),
                                         (p - 1, False, p >= 3), (p, False, False)):
            poly = np.polynomial.Polynomial(rng.normal(size=degree + 1))
            got, want = _one_step(lam, i, p, variant, poly, corrector), _exact(lam[i], lam[i + 1], poly)
            assert (abs(got - want) < 1e-12 * max(1.0, abs(want))) == exact, (p, i, degree, corrector, got, want)
    assert list(step_coefficients(lam, 1, 2, variant)[3]) == [0.5]
    assert list(step_coefficients(lam, 0, 1, variant)[4]) == [0.5]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("steps", [1, 2, 6])
def test_one_call_per_step_at_each_nonzero_sigma(name, steps):
    model = GaussianEps()
    seen = []
    out = SAMPLERS[name].fn(model, _noise((2, 4, 4, 4), seed=4, dtype=torch.float32), AC, steps,
                            callback=lambda i, n, x: seen.append((i, n)))
    sig = _sigmas(name, steps, None)
    assert torch.isfinite(out).all() and seen == [(i, steps) for i in range(steps)]
    assert model.calls == steps == SAMPLERS[name].calls(steps)
    np.testing.assert_allclose(model.ts, [schedule.sigma_to_t(s, SIGMAS).item() for s in sig[:-1]], atol=2e-4)


def test_registry_entries():
    for name, variant in VARIANTS.items():
        info = get_sampler(name)
        assert (info.label, info.schedule, info.noise, info.evals, info.discard_penultimate) == (
            "UniPC", "sgm_uniform", "none", 1, False)
        assert not info.supports_eta and not info.supports_s_noise and info.default_eta == 0.0
        assert info.fn.__name__ == ("sample_uni_pc" if variant == "bh1" else "sample_uni_pc_bh2")
        assert info.calls(20) == 20 and info.calls(7, "ddim_uniform") == 8
    x_T = _noise((1, 4, 2, 2), seed=1)
    a = SAMPLERS["uni_pc"].fn(GaussianEps(), x_T, AC, 6)
    b = SAMPLERS["uni_pc_bh2"].fn(GaussianEps(), x_T, AC, 6)
    assert not torch.equal(a, b) and (a - b).abs().max().item() < 0.05


@pytest.mark.parametrize("kwargs", [{"eta": 0.2}, {"s_noise": 0.9}, {"variant": "vary_coeff"},
                                    {"order": 0}, {"order": 2.0}, {"order": True}])
def test_bad_arguments(kwargs):
    with pytest.raises(UsageError):
        SAMPLERS["uni_pc"].fn(GaussianEps(), _noise((1, 4, 2, 2), seed=1), AC, 4, **kwargs)


def test_order_argument():
    x_T = _noise((1, 4, 2, 2), seed=1)
    run = lambda order: SAMPLERS["uni_pc"].fn(GaussianEps(), x_T, AC, 8, order=order)  # noqa: E731
    assert torch.equal(run(3), SAMPLERS["uni_pc"].fn(GaussianEps(), x_T, AC, 8))
    assert not torch.equal(run(2), run(3))


def test_cli_and_infotext_names():
    from sd_cli.cli.parser import build_parser, sampler_name

    assert sampler_name("uni_pc") == "uni_pc" and sampler_name("uni_pc_bh2") == "uni_pc_bh2"
    assert sampler_name("UniPC") == "uni_pc" and sampler_name("unipc") == "uni_pc"  # A1111's name: bh1
    for text in ("uni_pc", "UniPC"):
        args = build_parser("txt2img").parse_args(["--prompt", "x", "--sampler", text])
        assert args.sampler == "uni_pc"
    from sd_cli.run.params import settings_from_infotext

    out, _ = settings_from_infotext("a cat\nSteps: 20, Sampler: UniPC, CFG scale: 7, Seed: 1, Size: 512x512")
    assert out["sampler"] == "uni_pc" and "scheduler" not in out


def test_bh2_round_trips_through_the_infotext():
    """uni_pc_bh2 writes A1111's "UniPC variant: bh2" (both variants are "UniPC" there), and --params
    reads it back; a variant this tool lacks is named, not dropped."""
    from sd_cli.output.a1111 import a1111_text
    from sd_cli.run.params import settings_from_infotext

    meta = {"prompt": "a cat", "negative_prompt": "", "steps": 12, "sampler_label": "UniPC", "scale": 7.0,
            "seed": 3, "width": 512, "height": 512, "model_hash": None, "model_name": None,
            "sampler": "uni_pc_bh2", "eta": 0.0}
    text = a1111_text(meta, "sgm_uniform")
    assert "UniPC variant: bh2" in text
    assert settings_from_infotext(text)[0]["sampler"] == "uni_pc_bh2"
    assert "UniPC variant" not in a1111_text({**meta, "sampler": "uni_pc"}, "sgm_uniform")
    out, unused = settings_from_infotext("a\nSteps: 9, Sampler: UniPC, UniPC variant: vary_coeff, Seed: 1")
    assert out["sampler"] == "uni_pc" and unused == ["UniPC variant: vary_coeff"]
