"""Fidelity against an independent implementation of the same math: diffusers.

Requirement: our images equal, within fp32 rounding, what diffusers gives for the same weights, noise
and sampler. The reference (tests/diffusers_ref.py) is built from the same LDM-format file with
diffusers' OWN single-file conversion code and configs, attention on diffusers' classic AttnProcessor
and transformers' eager CLIP attention (we run SDPA), schedules from diffusers' schedulers (their
alphas_cumprod is a float32 cumprod, ours a float64 one rounded once: they differ by <= 1e-6 relative).

Tolerances. Everything runs in float32 (unit roundoff u = 6e-8). Two implementations that order their
sums differently (conv/matmul kernels, SDPA vs softmax(QK^T)V, fused vs plain GroupNorm) disagree by a
few ulps per op; through the ~60 stacked layers of the UNet/VAE that accumulates to ~1e-6 of the output
scale: measured 0.5e-6 (CLIP) .. 4.5e-6 (VAE decode, where diffusers' own fp32 result is the one
farther from a float64 evaluation, see `test_fp32_differences_are_rounding_error`). We assert
max|ours - ref| <= RTOL * max(1, max|ref|) with RTOL = 2e-5: >= 4x above that noise, but 30x below the
smallest real slip we know of (GroupNorm eps 1e-6 instead of 1e-5 in the UNet gives 6e-4; see
`test_tolerance_catches_a_groupnorm_eps_slip`). Sampling loops (10-20 steps, guidance 7.5, which
amplifies eps differences 7.5x; latents grow to ~30-60 with these random weights) stay at 1e-6 .. 2.5e-6
relative, so they get the same bound. Decoded uint8 images: a float difference of ~1e-5 flips a
rounding decision only for values within that distance of a .5 boundary, so bytes may differ by 1 on a
tiny fraction of values (measured <= 0.03 %); we allow max 1 and < 1 % of the values, and require the
images to be mostly unsaturated so the byte comparison means something.

Differences BY DESIGN (compared only where comparable, documented per test):
* DDIM/PLMS: CompVis' grid 1, 1+c, ... (c = 1000 // steps) equals diffusers' "leading" spacing with
  steps_offset=1 only when c * steps covers the grid exactly (steps dividing 1000); e.g. steps=15 gives
  CompVis 16 timesteps (1..991) but diffusers 15 (1..925). We compare at 10 and 20 steps.
* DPM++ 2M Karras: diffusers' DPMSolverMultistepScheduler ROUNDS the UNet timesteps to integers;
  k-diffusion (and we) feed the fractional t(sigma). The reference loop therefore runs diffusers'
  solver (its own Karras sigmas and 2M update) with the UNet fed the fractional timesteps that
  diffusers' EulerDiscreteScheduler(use_karras_sigmas=True) computes for the same sigmas; we also
  check that rounding ours gives exactly DPMSolverMultistep's integer timesteps.
  diffusers starts from latents * init_noise_sigma (1.0, VP); k-diffusion from noise * sigma_max (VE),
  which is noise * sigma_max / sqrt(1 + sigma_max^2) in VP: the reference is started from that.
* Euler ancestral: diffusers' EulerAncestralDiscreteScheduler has no Karras option. The reference uses
  its step (ancestral split, Euler step, noise draw) with the Karras sigmas / fractional timesteps of
  diffusers' EulerDiscreteScheduler(use_karras_sigmas=True). Start: noise * sigma_max (k-diffusion)
  instead of diffusers' sqrt(sigma_max^2 + 1) for "leading" spacing.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

# diffusers' schedulers call np.array() on torch tensors; numpy 2 warns about the copy keyword (not ours).
# One torch thread (conftest): the tiny models gain nothing from intra-op threads, and on a busy CI box
# (other jobs holding cores) OpenMP's spinning workers make each UNet call ~100x slower.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.usefixtures("one_torch_thread")]

from conftest import TINY_YAML, load_config_from_text  # noqa: E402
from diffusers_ref import build_reference, diffusers_uint8  # noqa: E402

from sd_cli.pipeline.guidance import guided_eps_model  # noqa: E402
from sd_cli.weights.loading import load_model  # noqa: E402
from sd_cli.sampling.schedule import ddim_timesteps  # noqa: E402

RTOL = 2e-5  # max|ours - ref| / max(1, max|ref|); fp32 noise measured at <= 4.5e-6 (module docstring)
SCALE = 7.5
SCHED_KW = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def rel_diff(ours: torch.Tensor, ref: torch.Tensor, name: str) -> float:
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all(), name
    d = ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1.0)).item()
    print(f"{name}: max|diff| / max(1, max|ref|) = {d:.2e}  (max|ref| = {ref.abs().max().item():.3g})")
    return d


def assert_close(ours: torch.Tensor, ref: torch.Tensor, name: str, rtol: float = RTOL) -> None:
    d = rel_diff(ours, ref, name)
    assert d <= rtol, f"{name}: relative max difference {d:.3e} > {rtol:.0e}"


def assert_uint8_close(ours: np.ndarray, ref: np.ndarray, name: str) -> None:
    assert ours.dtype == np.uint8 and ref.dtype == np.uint8 and ours.shape == ref.shape, name
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    frac = float((diff > 0).mean())
    inside = float(((ref > 0) & (ref < 255)).mean())
    print(f"{name}: uint8 max diff {diff.max()}, {frac:.3%} of values differ, {inside:.1%} unsaturated")
    assert diff.max() <= 1, f"{name}: uint8 images differ by up to {diff.max()}"
    assert frac < 0.01, f"{name}: {frac:.2%} of the uint8 values differ"
    assert inside > 0.5, f"{name}: the images are mostly saturated, the comparison would be weak"


# --- models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_files):
    """(ours, ref): our loader on the .safetensors file; diffusers built from the same file's tensors."""
    from safetensors.torch import load_file

    ours = load_model(load_config_from_text(TINY_YAML).model, tiny_files["safetensors"], "cpu", torch.float32)
    ref = build_reference(load_file(str(tiny_files["safetensors"])), TINY_YAML)
    return ours, ref


def prompt_ids(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary (but CLIP-shaped) token ids: cond (batch, 77) of different lengths, uncond (1, 77) = ''."""
    g = torch.Generator().manual_seed(7)
    cond = torch.full((batch, 77), 49407, dtype=torch.long)
    for i in range(batch):
        n = 5 + 7 * i
        cond[i, 0] = 49406
        cond[i, 1 : 1 + n] = torch.randint(0, 49406, (n,), generator=g)
    uncond = torch.full((1, 77), 49407, dtype=torch.long)
    uncond[0, 0] = 49406
    return cond, uncond


@pytest.fixture(scope="module")
def embeddings(models):
    """The same prompt embeddings for both sides (from the reference CLIP; ours is checked separately)."""
    _, ref = models
    cond_ids, uncond_ids = prompt_ids(2)
    with torch.no_grad():
        cond = ref.text_encoder(input_ids=cond_ids).last_hidden_state
        uncond = ref.text_encoder(input_ids=uncond_ids).last_hidden_state
    return cond, uncond  # (2, 77, 32), (1, 77, 32)


def ref_cfg_eps(ref, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline guidance: one call on [uncond; cond], e_u + s (e_c - e_u)."""
    b = x.shape[0]
    ctx = torch.cat([uncond.expand(b, -1, -1), cond])
    t = torch.as_tensor(t, dtype=torch.float32)
    out = ref.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
    e_u, e_c = out.chunk(2)
    return e_u + SCALE * (e_c - e_u)


# --- 1. the conversion itself -----------------------------------------------------------------


def test_diffusers_configs_equal_the_tiny_yaml(models):
    """diffusers derives (from the CompVis-layout numbers) exactly the architecture we intend."""
    _, ref = models
    u = ref.unet.config
    assert list(u.block_out_channels) == [32, 64, 128, 128]  # model_channels * channel_mult
    assert u.layers_per_block == 2
    assert u.cross_attention_dim == 32
    assert u.attention_head_dim == 2  # SD1 quirk: diffusers' attention_head_dim is the number of heads
    assert list(u.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(u.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (u.norm_num_groups, u.norm_eps, u.act_fn) == (32, 1e-5, "silu")
    assert (u.flip_sin_to_cos, u.freq_shift) == (True, 0)  # [cos | sin], exponent / half
    assert (u.use_linear_projection, u.upcast_attention, u.transformer_layers_per_block) == (False, False, 1)
    assert (u.in_channels, u.out_channels, u.center_input_sample) == (4, 4, False)
    v = ref.vae.config
    assert list(v.block_out_channels) == [32, 64, 128, 128]
    assert (v.layers_per_block, v.latent_channels, v.norm_num_groups) == (2, 4, 32)
    assert v.scaling_factor == pytest.approx(0.18215)
    # Every converted CLIP tensor has a home except position_ids (a non-persistent arange buffer in
    # transformers 5; ours keeps it persistent so keys equal the checkpoint's, and derives its value).
    assert ref.clip_keys_dropped == ["embeddings.position_ids"]


def test_conversion_maps_every_learned_tensor(models):
    """diffusers' conversion, loaded strictly, holds as many values as our learned tensors (no tensor
    dropped or duplicated); spot checks of the renaming incl. the VAE attention's 1x1 conv -> linear."""
    from sd_cli.model.ldm import SCHEDULE_KEYS

    ours, ref = models
    sd = ours.state_dict()
    n_ours = sum(v.numel() for k, v in sd.items() if k not in SCHEDULE_KEYS and not k.endswith("position_ids"))
    n_ref = sum(v.numel() for m in (ref.unet, ref.vae, ref.text_encoder) for v in m.state_dict().values()
                if v.is_floating_point())
    assert n_ours == n_ref
    assert torch.equal(ref.vae.state_dict()["decoder.mid_block.attentions.0.to_q.weight"],
                       sd["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert torch.equal(ref.unet.state_dict()["up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"],
                       sd["model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"])


# --- 2. single forward passes -----------------------------------------------------------------


def test_text_embeddings(models):
    ours, ref = models
    cond_ids, uncond_ids = prompt_ids(3)
    ids = torch.cat([cond_ids, uncond_ids])  # (4, 77)
    with torch.no_grad():
        assert_close(ours.encode_text(ids), ref.text_encoder(input_ids=ids).last_hidden_state, "text embeddings")


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)], ids=["64x64px", "72x56px"])
def test_unet_eps(models, hw):
    """eps for integer and fractional timesteps (one per batch row), incl. the ends 0 and 999; the
    72x56 px case (latent 9x7) exercises the odd-size upsampling (diffusers: forward_upsample_size)."""
    ours, ref = models
    g = torch.Generator().manual_seed(11)
    t = torch.tensor([0.0, 1.0, 37.25, 500.5, 998.75, 999.0])
    x = torch.randn(len(t), 4, *hw, generator=g)
    ctx = torch.randn(len(t), 77, 32, generator=g)
    with torch.no_grad():
        assert_close(ours.unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample, f"unet eps {hw}")


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)], ids=["64x64px", "72x56px"])
def test_vae_decode(models, hw):
    """Our decode divides by scale_factor itself; diffusers' pipeline divides by vae.config.scaling_factor."""
    ours, ref = models
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert_close(ours.decode(z), ref.vae.decode(z / ref.vae.config.scaling_factor).sample, f"vae decode {hw}")


@pytest.mark.parametrize("hw", [(64, 64), (72, 56)], ids=["64x64px", "72x56px"])
def test_vae_encoder_moments(models, hw):
    ours, ref = models
    img = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(13)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.first_stage_model.encode_moments(img)
        dist = ref.vae.encode(img).latent_dist
    assert_close(mean, dist.mean, f"vae posterior mean {hw}")
    assert_close(logvar, dist.logvar, f"vae posterior logvar {hw}")


# --- 3. sampling loops --------------------------------------------------------------------------


def test_ddim_grid_and_schedule_equal_diffusers_leading_spacing():
    """CompVis' uniform grid == diffusers DDIM 'leading' + steps_offset=1 when steps divides 1000;
    the schedules agree to fp32 rounding (diffusers: float32 cumprod; ours: float64, rounded once)."""
    from diffusers import DDIMScheduler

    from sd_cli.sampling.schedule import make_alphas_cumprod

    sched = DDIMScheduler(**SCHED_KW, clip_sample=False)
    for steps in (1, 2, 4, 5, 10, 20, 25, 50, 100):
        sched.set_timesteps(steps)
        assert ddim_timesteps(steps)[::-1].tolist() == sched.timesteps.tolist(), steps
    # By design (CompVis, see schedule.ddim_timesteps): 15 steps -> c = 66 -> 16 timesteps up to 991.
    sched.set_timesteps(15)
    assert len(ddim_timesteps(15)) == 16 and sched.timesteps.tolist()[0] == 925
    ours = make_alphas_cumprod().double()
    assert ((sched.alphas_cumprod.double() - ours).abs() / ours).max().item() < 2e-6
    assert sched.final_alpha_cumprod.item() == pytest.approx(ours[0].item(), rel=1e-6)  # alphas_prev[0]


def _sd_pipeline(ref, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=ref.vae,
        text_encoder=ref.text_encoder,
        tokenizer=None,
        unet=ref.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_sd_pipeline(ref, scheduler, cond, uncond, x_T, steps, eta=0.0, generator=None):
    """diffusers' StableDiffusionPipeline end to end: (final latents, uint8 images)."""
    pipe = _sd_pipeline(ref, scheduler)
    captured = {}

    def grab(_pipe, _i, _t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    with torch.no_grad():
        out = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond.expand(cond.shape[0], -1, -1),
            latents=x_T.clone(),
            num_inference_steps=steps,
            guidance_scale=SCALE,
            eta=eta,
            generator=generator,
            height=8 * x_T.shape[-2],
            width=8 * x_T.shape[-1],
            output_type="np",
            callback_on_step_end=grab,
        ).images  # (B, H, W, 3) float in [0, 1]
    return captured["latents"], (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("sampler", "steps", "eta", "hw"),
    [
        ("ddim", 10, 0.0, (8, 8)),
        ("ddim", 20, 0.0, (8, 8)),
        ("ddim", 10, 0.0, (9, 7)),
        ("ddim", 10, 1.0, (8, 8)),
        ("plms", 10, 0.0, (8, 8)),
    ],
    ids=["ddim10", "ddim20", "ddim10-72x56px", "ddim10-eta1", "plms10"],
)
def test_discrete_sampler_matches_stable_diffusion_pipeline(models, embeddings, sampler, steps, eta, hw):
    """DDIM vs StableDiffusionPipeline + DDIMScheduler; PLMS vs + PNDMScheduler(skip_prk_steps), whose
    PLMS warm-up (a 2nd-order step with one extra UNet call at the next timestep, then the 2-, 3-, 4-step
    Adams-Bashforth mixes) is CompVis' PLMS. Same start latents, embeddings, CFG 7.5. With eta > 0 both
    draw torch.randn(latents.shape) from the same seeded CPU generator once per step, after the UNet
    call (sigma_t = eta sqrt((1 - a_prev)/(1 - a) (1 - a/a_prev)) in both), so even that is comparable."""
    from diffusers import DDIMScheduler, PNDMScheduler

    from sd_cli.sampling.samplers import get_sampler

    ours, ref = models
    cond, uncond = embeddings
    x_T = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(21))
    scheduler = DDIMScheduler(**SCHED_KW, clip_sample=False) if sampler == "ddim" else PNDMScheduler(
        **SCHED_KW, skip_prk_steps=True
    )
    ref_latents, ref_u8 = _run_sd_pipeline(
        ref, scheduler, cond, uncond, x_T, steps, eta=eta, generator=torch.Generator().manual_seed(3)
    )

    eps_model = guided_eps_model(ours.unet, cond, uncond, SCALE)
    name = f"{sampler} {steps} steps eta {eta} {8 * hw[0]}x{8 * hw[1]}px"
    with torch.no_grad():
        latents = get_sampler(sampler).fn(
            eps_model, x_T.clone(), ours.alphas_cumprod, steps, eta=eta, generator=torch.Generator().manual_seed(3)
        )
        pixels = ours.decode(latents)
        ref_pixels = ref.vae.decode(ref_latents / ref.vae.config.scaling_factor).sample
    assert_close(latents, ref_latents, f"{name}: final latents")
    assert_close(pixels, ref_pixels, f"{name}: decoded pixels (unclamped)")
    assert_uint8_close(diffusers_uint8(pixels), ref_u8, f"{name}: uint8 images")


def _karras_reference(steps: int):
    """diffusers' Karras grid: sigmas (steps+1,) f32 and fractional timesteps (steps,) of
    EulerDiscreteScheduler(use_karras_sigmas=True); 'linspace' so its sigma_min/max are the ends of the
    1000 discrete sigmas (as DPMSolverMultistep's, k-diffusion's and ours)."""
    from diffusers import EulerDiscreteScheduler

    kw = dict(SCHED_KW, timestep_spacing="linspace")
    kw.pop("set_alpha_to_one")
    kw.pop("steps_offset")
    euler = EulerDiscreteScheduler(**kw, use_karras_sigmas=True, final_sigmas_type="zero")
    euler.set_timesteps(steps)
    return euler.sigmas.clone(), euler.timesteps.clone()


def _recording(eps_model, seen: list[float]):
    def wrapped(x, t):
        seen.append(float(t[0]))
        return eps_model(x, t)

    return wrapped


def test_dpmpp_2m_karras_matches_dpm_solver_multistep(models, embeddings):
    """DPM++ 2M Karras vs DPMSolverMultistepScheduler(dpmsolver++, order 2, Karras, final sigma 0).
    15 steps (>= 15, so diffusers' lower_order_final only touches the last step, to sigma 0, where both
    take the first-order step x = D). See the module docstring for the timestep rounding and start."""
    from diffusers import DPMSolverMultistepScheduler

    from sd_cli.sampling.samplers import get_sampler

    ours, ref = models
    cond, uncond = embeddings
    steps = 15
    kw = dict(SCHED_KW)
    kw.pop("set_alpha_to_one")
    sched = DPMSolverMultistepScheduler(
        **kw,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        use_karras_sigmas=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    k_sigmas, k_t = _karras_reference(steps)
    assert torch.allclose(sched.sigmas, k_sigmas, rtol=1e-6, atol=0)  # one Karras grid in diffusers

    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(31))
    seen: list[float] = []
    with torch.no_grad():
        x0 = get_sampler("dpmpp_2m").fn(
            _recording(guided_eps_model(ours.unet, cond[:1], uncond, SCALE), seen), x_T.clone(),
            ours.alphas_cumprod, steps
        )
        s_max = sched.sigmas[0].double()
        x = (x_T.double() * s_max / (s_max**2 + 1).sqrt()).float()  # k-diffusion start, in diffusers' VP
        for i, t_int in enumerate(sched.timesteps):
            eps = ref_cfg_eps(ref, x, k_t[i], cond[:1], uncond)  # fractional t, as k-diffusion
            x = sched.step(eps, t_int, x).prev_sample
    # Our fractional timesteps are diffusers' (EulerDiscrete Karras) ones, and round to DPMSolver's.
    assert np.allclose(seen, k_t.numpy(), rtol=0, atol=1e-3), (seen, k_t.tolist())
    assert np.round(seen).astype(int).tolist() == sched.timesteps.tolist()
    assert_close(x0, x, "dpmpp_2m 15 steps: final latents")
    with torch.no_grad():
        assert_uint8_close(diffusers_uint8(ours.decode(x0)),
                           diffusers_uint8(ref.vae.decode(x / ref.vae.config.scaling_factor).sample),
                           "dpmpp_2m 15 steps: uint8 images")


def test_euler_ancestral_karras_matches_diffusers_step(models, embeddings):
    """Euler a (eta 1) vs EulerAncestralDiscreteScheduler.step on diffusers' Karras grid, same seed for the
    per-step noise (both draw torch.randn(shape) on the CPU in float32, once per step)."""
    from diffusers import EulerAncestralDiscreteScheduler

    from sd_cli.sampling.samplers import get_sampler

    ours, ref = models
    cond, uncond = embeddings
    steps = 15
    kw = dict(SCHED_KW)
    kw.pop("set_alpha_to_one")
    sched = EulerAncestralDiscreteScheduler(**kw)
    sched.set_timesteps(steps)
    k_sigmas, k_t = _karras_reference(steps)
    sched.sigmas, sched.timesteps = k_sigmas, k_t  # diffusers' Karras grid into diffusers' ancestral step

    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(41))
    seen: list[float] = []
    with torch.no_grad():
        x0 = get_sampler("euler_a").fn(
            _recording(guided_eps_model(ours.unet, cond[:1], uncond, SCALE), seen), x_T.clone(),
            ours.alphas_cumprod, steps, eta=1.0, generator=torch.Generator().manual_seed(5)
        )
        g = torch.Generator().manual_seed(5)
        x = x_T * k_sigmas[0]  # k-diffusion start (diffusers would use sqrt(sigma_max^2 + 1) for 'leading')
        for t in sched.timesteps:
            eps = ref_cfg_eps(ref, sched.scale_model_input(x, t), t, cond[:1], uncond)
            x = sched.step(eps, t, x, generator=g).prev_sample
    assert np.allclose(seen, k_t.numpy(), rtol=0, atol=1e-3), (seen, k_t.tolist())
    assert_close(x0, x, "euler_a 15 steps: final latents")
    with torch.no_grad():
        assert_uint8_close(diffusers_uint8(ours.decode(x0)),
                           diffusers_uint8(ref.vae.decode(x / ref.vae.config.scaling_factor).sample),
                           "euler_a 15 steps: uint8 images")


# --- 4. our whole Pipeline (tokenizer -> CLIP -> CFG DDIM -> VAE -> uint8) -------------------------


def test_pipeline_generate_matches_stable_diffusion_pipeline(models, tiny_files):
    """`Pipeline.generate` vs StableDiffusionPipeline fed the embeddings of the same token ids (our
    tokenizer; diffusers' would need a vocab download) from the reference CLIP, DDIM 10 steps, CFG 7.5."""
    if importlib.util.find_spec("sd_cli.output.png") is None:
        pytest.skip("sd_cli/images.py (to_uint8) is not in the tree yet")
    from diffusers import DDIMScheduler

    from sd_cli.pipeline.generate import Pipeline

    ours, ref = models
    prompts = ["a photograph of an astronaut riding a horse", "a red cube"]
    pipe = Pipeline(ours, torch.device("cpu"))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(51))
    images = pipe.generate(prompts, noise.clone(), negative_prompt="", sampler="ddim", steps=10, scale=SCALE)

    with torch.no_grad():
        cond = ref.text_encoder(input_ids=pipe.tokenizer(prompts).ids).last_hidden_state
        uncond = ref.text_encoder(input_ids=pipe.tokenizer([""]).ids).last_hidden_state
    _, ref_u8 = _run_sd_pipeline(ref, DDIMScheduler(**SCHED_KW, clip_sample=False), cond, uncond, noise, 10)
    assert_uint8_close(images, ref_u8, "Pipeline.generate ddim 10: uint8 images")


# --- the tolerance is meaningful -----------------------------------------------------------------


def test_fp32_differences_are_rounding_error(models):
    """Against diffusers run in float64 (the 'exact' value of the same math), our float32 result is about
    as close as diffusers' own float32 result: what separates ours from diffusers is rounding, not math."""
    import copy

    ours, ref = models
    unet64 = copy.deepcopy(ref.unet).double()
    vae64 = copy.deepcopy(ref.vae).double()
    g = torch.Generator().manual_seed(71)
    x, ctx = torch.randn(3, 4, 9, 7, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([3.0, 480.5, 990.0])
    z = torch.randn(2, 4, 9, 7, generator=g)
    sf = ref.vae.config.scaling_factor
    with torch.no_grad():
        cases = {
            "unet": (ours.unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample,
                     unet64(x.double(), t.double(), encoder_hidden_states=ctx.double()).sample),
            "vae decode": (ours.decode(z), ref.vae.decode(z / sf).sample, vae64.decode(z.double() / sf).sample),
        }
    for name, (o32, r32, r64) in cases.items():
        ours_err = rel_diff(o32, r64, f"{name}: ours fp32 vs diffusers fp64")
        ref_err = rel_diff(r32, r64, f"{name}: diffusers fp32 vs diffusers fp64")
        assert ours_err <= max(3 * ref_err, 2e-6), name



def test_tolerance_catches_a_groupnorm_eps_slip(models):
    """Mutation check: our UNet with its GroupNorm eps changed 1e-5 -> 1e-6 must FAIL the UNet bound."""
    ours, ref = models
    unet = ours.model.diffusion_model
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm) and m.eps == 1e-5]
    assert norms
    g = torch.Generator().manual_seed(61)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 32, generator=g)
    try:
        for m in norms:
            m.eps = 1e-6
        with torch.no_grad():
            d = rel_diff(unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample, "mutant unet (eps 1e-6)")
    finally:
        for m in norms:
            m.eps = 1e-5
    assert d > 3 * RTOL
