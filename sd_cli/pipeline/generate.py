"""Prompt batch -> images, as numbered steps. No argparse here; the CLI builds the requests.

Data flow: prompt -> token ids (B, 77) -> text embeddings (B, 77, 768) -> sampler loop over the
guided UNet on latents (B, 4, H/8, W/8) -> VAE decode (B, 3, H, W) -> uint8 images (B, H, W, 3).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import numpy as np
import torch

from sd_cli.errors import SdCliError, UsageError
from sd_cli.pipeline.conditioning import chunk_prompt, encode_chunked
from sd_cli.pipeline.guidance import guided_eps_model
from sd_cli.pipeline.prompt_syntax import extra_networks
from sd_cli.output.pixels import to_uint8
from sd_cli.model.ldm import LatentDiffusion
from sd_cli.sampling.samplers import get_sampler, img2img_start
from sd_cli.sampling.schedule import sigmas_from_alphas_cumprod
from sd_cli.model.tokenizer import get_tokenizer
from sd_cli.pipeline.vae_tiling import LatentDecoder
from sd_cli.weights.precision import dtype_name

log = logging.getLogger(__name__)
TOME_SEED = 0  # token merging's destination draws: the same for every run, so images reproduce


def initial_noise(
    generator: torch.Generator, batch: int, channels: int, height: int, width: int, factor: int
) -> torch.Tensor:
    """Start latents (batch, C, H/f, W/f) from a seeded CPU generator, in float32, so a seed gives the
    same picture on every device: `torch.Generator("cpu").manual_seed(seed)` then one randn call."""
    return torch.randn((batch, channels, height // factor, width // factor), generator=generator, dtype=torch.float32)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed mix of two noise tensors (C, h, w) -> (1, C, h, w): spherical
    interpolation with the vectors taken along dim 1 (as A1111 does on one image's (C, h, w) noise);
    where they are nearly parallel (mean cosine > 0.9995) A1111's linear fallback low*val + high*(1-val)."""
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)  # (C, w)
    if dot.mean() > 0.9995:
        return (low * val + high * (1 - val)).unsqueeze(0)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    res = (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high
    return res.unsqueeze(0)


def schedule_steps(sampler: str, steps: int) -> int:
    """The steps prompt editing counts for `steps` of `sampler`: A1111 doubles them for its second-order
    samplers (two UNet calls a step), whose denoiser counts calls."""
    return steps * (2 if get_sampler(sampler).evals == 2 else 1)


def pass_calls(info, steps: int, scheduler: str | None, start: int = 0) -> int:
    """UNet evaluations of one sampling pass: the sampler's calls for `steps` (`SamplerInfo.calls`) less
    those of the `start` steps an image-to-image pass skips (`evals` each: a skipped step is never the
    last one, which takes a single call)."""
    return info.calls(steps, scheduler) - info.evals * start


def interval_calls(info, ac: torch.Tensor, steps: int, eta: float, extra: dict,
                   interval: tuple[float, float]) -> int | None:
    """The UNet evaluations of a pass whose sigma lies in `interval` (LO, HI) when the pass's last one
    does (the uncond stream then ends with the run, and its last call is made full), else None (it ends
    before: no forced full call). The sampler runs dry on a 1x1 latent with a zero eps-model (its
    timesteps do not depend on the latents), counting the calls as `guided_eps_model` decides them."""
    from sd_cli.pipeline.guidance import sigma_at

    sigmas = sigmas_from_alphas_cumprod(ac.detach().to("cpu", torch.float32))
    inside = []

    def dry(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside.append(interval[0] <= sigma_at(t, sigmas) <= interval[1])
        return torch.zeros_like(x)

    info.fn(dry, torch.zeros(1, 4, 1, 1), ac.cpu(), steps, eta=eta, generator=torch.Generator().manual_seed(0),
            **extra)
    return sum(inside) if inside and inside[-1] else None


@contextlib.contextmanager
def _token_merging(unet, ratio: float):
    """ToMe on `unet` inside the block (ratio 0: nothing); the patch goes on any way out (try/finally)."""
    if not ratio:
        yield
        return
    from sd_cli.model.tome import TokenMerging

    with TokenMerging(unet, ratio, seed=TOME_SEED):
        yield


def _finite(ctx) -> bool:
    return bool(torch.isfinite(ctx).all()) if isinstance(ctx, torch.Tensor) else ctx.all_finite()


class Pipeline:
    #: NaN guard: check each step's latents at once (None: only on the CPU, where it costs nothing; on a
    #: GPU the per-step flags stay on the device and are read once after the loop, no sync per step).
    eager_nan_check: bool | None = None

    def __init__(
        self,
        model: LatentDiffusion,
        device: torch.device,
        on_warning: Callable[[str], None] | None = None,
        vae_tiling: str = "auto",
        embeddings=None,
        ckpt=None,
        ckpt_stamp=None,
    ):
        """`ckpt`: the checkpoint file the model was loaded from (LoRA changes re-read its layers) and its
        `merge.file_stamp` from before loading (a file replaced since is refused)."""
        self.model = model
        self.device = device
        self.ckpt, self.ckpt_stamp = ckpt, ckpt_stamp
        self._patcher = None
        self.tokenizer = get_tokenizer()
        self.embeddings = embeddings  # textual inversion (sd_cli.weights.embeddings.EmbeddingSet) or None
        self.on_warning = on_warning or (lambda msg: log.warning(msg))
        self._uncond_cache: dict[str, torch.Tensor] = {}
        # VAE decode: tiled above 512x512 (auto), redone in float32 if half precision gives NaN/inf.
        self.decoder = LatentDecoder(model, vae_tiling, self.on_warning)

    def set_loras(self, uses) -> None:
        """Merge exactly these LoRAs (sd_cli.weights.merge.LoraUse, in order) into the weights; only the
        layers whose adapters change are rewritten (sd_cli.weights.merge.Patcher)."""
        if not uses and self._patcher is None:
            return
        if self._patcher is None:
            from sd_cli.weights.merge import Patcher

            if self.ckpt is None:
                raise SdCliError("LoRAs need the checkpoint file the model was loaded from")
            self._patcher = Patcher(self.model, self.ckpt, self.ckpt_stamp)
        if self._patcher.apply(uses):
            self._uncond_cache.clear()  # the text encoder may have changed

    def _encode(self, texts: list[str], what: str, syntax: str = "plain", clip_skip: int = 1) -> torch.Tensor:
        """Context (B, 77 k, 768) of `texts` (sd_cli.pipeline.conditioning)."""
        if syntax == "a1111":
            return self._encode_chunks([chunk_prompt(text, self.tokenizer, self.embeddings) for text in texts],
                                       clip_skip)
        tok = self.tokenizer(texts)
        for text, dropped, n in zip(texts, tok.n_dropped, tok.n_tokens):
            if dropped:
                short = text if len(text) <= 40 else text[:37] + "..."
                self.on_warning(f"{what} {short!r} is {n} tokens; CLIP reads 75, so the last {dropped} were dropped")
        return self._text(tok.ids.to(self.device), clip_skip)  # (B, 77, 768)

    def _encode_chunks(self, chunked: list, clip_skip: int) -> torch.Tensor:
        """Context (B, 77 k, 768) of B chunked prompts (`conditioning.chunk_prompt`)."""
        return encode_chunked(lambda ids, fixes: self._text(ids, clip_skip, fixes), chunked, self.device)

    def _context(self, texts: list[str], what: str, syntax: str, clip_skip: int, prompt_steps):
        """Context of B texts: a tensor (B, 77 k, 768), or a `conditioning.Scheduled` when one of them
        changes during sampling (A1111's prompt editing over `prompt_steps` = (schedule steps, the first
        pass's steps for a hires pass, else None); None: editing off, the text as it is)."""
        if syntax != "a1111" or prompt_steps is None:
            return self._encode(texts, what, syntax, clip_skip)
        from sd_cli.pipeline.conditioning import MAX_EDIT_CHUNKS, Scheduled
        from sd_cli.pipeline.prompt_schedule import schedule

        stripped = [extra_networks(text)[0] for text in texts]  # (A1111 takes the tags out first)
        plans = [schedule(text, *prompt_steps) for text in stripped]
        if all(plan == ((prompt_steps[0], text),) for plan, text in zip(plans, stripped)):
            return self._encode(texts, what, syntax, clip_skip)  # no editing: as before it existed
        if all(len(plan) == 1 for plan in plans):
            return self._encode([plan[0][1] for plan in plans], what, syntax, clip_skip)
        distinct = list(dict.fromkeys(text for plan in plans for _, text in plan))
        chunked = [chunk_prompt(t, self.tokenizer, self.embeddings) for t in distinct]  # (tokenized once)
        chunks = len(distinct) * max(len(c.ids) for c in chunked)
        if chunks > MAX_EDIT_CHUNKS:
            raise UsageError(f"the {what}'s editing makes {len(distinct)} different texts, {chunks} chunks of 77 "
                             f"tokens to encode (at most {MAX_EDIT_CHUNKS}); use fewer alternatives or a shorter "
                             "text")
        index = {text: i for i, text in enumerate(distinct)}
        contexts = self._encode_chunks(chunked, clip_skip)  # (E, 77 k, 768)
        return Scheduled(contexts, tuple(tuple((end, index[text]) for end, text in plan) for plan in plans))

    def _text(self, ids: torch.Tensor, clip_skip: int = 1, fixes=None) -> torch.Tensor:
        """The text encoder on (B, 77) ids; the extra arguments only when they are not the defaults."""
        if clip_skip == 1 and not fixes:
            return self.model.encode_text(ids)
        return self.model.encode_text(ids, clip_skip, fixes)

    def _nan_hint(self) -> str:
        dtype = next(self.model.parameters()).dtype
        if dtype != torch.float32:
            return f"the model runs in {dtype_name(dtype)}; try --precision full (float32)"
        return "the model runs in float32: is --scale extreme, or are the weights damaged?"

    def _uncond(self, negative_prompt: str, syntax: str, clip_skip: int, prompt_steps):
        """The unconditional (or negative) context (1, 77 k, 768) or its schedule, encoded once per distinct
        text and settings (the guidance repeats it over the batch)."""
        key = (negative_prompt, syntax, clip_skip, prompt_steps)
        if key not in self._uncond_cache:
            self._uncond_cache[key] = self._context([negative_prompt], "negative prompt", syntax, clip_skip,
                                                    prompt_steps)
        return self._uncond_cache[key]


    @torch.inference_mode()
    def generate(self, prompts: list[str], noise: torch.Tensor, **settings) -> np.ndarray:
        """Images (B, H, W, 3) uint8 for B prompts from start noise (B, 4, H/8, W/8): `latents`, then
        `decode`."""
        return self.decode(self.latents(prompts, noise, **settings))

    @torch.inference_mode()
    def latents(
        self,
        prompts: list[str],
        noise: torch.Tensor,
        *,
        negative_prompt: str = "",
        sampler: str = "ddim",
        steps: int = 50,
        scale: float = 7.5,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        prompt_syntax: str = "plain",
        clip_skip: int = 1,
        scheduler: str | None = None,
        s_noise: float = 1.0,
        init: torch.Tensor | None = None,
        t_enc: int = 0,
        inpaint: tuple[torch.Tensor, torch.Tensor] | None = None,
        concat: torch.Tensor | None = None,
        prompt_steps: tuple[int, int | None] | None | str = "auto",
        deepcache: int = 1,
        deepcache_branch: int = 0,
        cfg_interval: tuple[float, float] | None = None,
        tome: float = 0.0,
    ) -> torch.Tensor:
        """Sampled latents (B, 4, H/8, W/8) float32 for B prompts from start noise (B, 4, H/8, W/8). Image
        to image: `init` (B, 4, H/8, W/8) scaled latents and `t_enc` denoising steps
        (`samplers.img2img_start`); t_enc 0 returns `init` as it is. Inpainting: `inpaint` = (the init
        latents to keep (B, 4, h, w), the repaint mask (1, 1, h, w)) (`inpaint.masked_eps_model`). An
        inpainting UNet also gets `concat` (B, 5, h, w): [mask, masked-image latents] (default: all
        repainted, `inpaint.concat_conditioning` of no image). Prompt editing (a1111 syntax): `prompt_steps`
        = (schedule steps, first-pass steps of a hires pass or None), "auto" = A1111's for this sampler and
        `steps`, None = off (images made before it). Faster sampling (README "Faster sampling"): `deepcache`
        N > 1 with `deepcache_branch` B (`deepcache.DeepCacheUNet`), `cfg_interval` (LO, HI) in sigma
        (`guidance.guided_eps_model`), `tome` ratio > 0 (`tome.TokenMerging`); the defaults are off."""
        batch = len(prompts)
        if noise.shape[0] != batch:
            raise ValueError(f"noise batch {noise.shape[0]} != {batch} prompts")
        if prompt_steps == "auto":
            prompt_steps = (schedule_steps(sampler, steps), None)

        # 1. Encode the prompts (and the negative prompt, unless guidance is off).
        cond = self._context(prompts, "prompt", prompt_syntax, clip_skip, prompt_steps)  # (B, 77 k, 768)
        uncond = self._uncond(negative_prompt, prompt_syntax, clip_skip, prompt_steps) if scale != 1.0 else None
        if not (_finite(cond) and (uncond is None or _finite(uncond))):
            raise SdCliError(f"the text encoder produced non-finite values (NaN/inf); {self._nan_hint()}")

        # 2. Classifier-free guidance: one batched UNet call per model evaluation. DeepCache with a guidance
        # interval: uncond and cond as two calls, each its own DeepCache stream (the cond one sees every
        # evaluation, so its cache spans the switch from guided to conditional calls).
        sigmas = None if cfg_interval is None else sigmas_from_alphas_cumprod(
            self.model.alphas_cumprod.detach().to("cpu", torch.float32))  # (n,) as the k-samplers' sigmas
        split = deepcache > 1 and cfg_interval is not None and uncond is not None
        caches = [self._deepcache(deepcache, deepcache_branch) for _ in range(1 + split)] if deepcache > 1 else []
        unets = [self._unet(noise, concat, cache) for cache in caches] or [self._unet(noise, concat)]
        eps_model = guided_eps_model(unets[0], cond, uncond, scale, cfg_interval=cfg_interval, sigmas=sigmas,
                                     uncond_unet=unets[1] if split else None)

        # 3. Denoising loop from the seeded start latents (kept in float32 between steps).
        if init is not None and t_enc == 0:
            return init.to(self.device, torch.float32)  # strength 0: the image through the VAE
        if inpaint is not None:
            from sd_cli.pipeline.inpaint import masked_eps_model

            kept, repaint = (v.to(self.device, torch.float32) for v in inpaint)
            eps_model = masked_eps_model(eps_model, kept, repaint, self.model.alphas_cumprod.to(self.device))
        out = self._denoise(eps_model, noise, sampler, steps, eta, generator, callback, scheduler, s_noise,
                            init, t_enc, caches, tome, cfg_interval)
        return out if inpaint is None else out * repaint + kept * (1 - repaint)

    def _deepcache(self, interval: int, branch: int):
        """A new DeepCache wrapper of the raw UNet (one per sampling pass and call stream)."""
        from sd_cli.model.deepcache import DeepCacheUNet

        return DeepCacheUNet(self.model.model.diffusion_model, interval, branch)

    def _unet(self, noise: torch.Tensor, concat: torch.Tensor | None, cache=None):
        """The UNet as the sampler calls it: the model's, or its DeepCache wrapper `cache`; an inpainting
        UNet gets [x, mask, masked-image latents] (the concat stays outside DeepCache)."""
        unet = cache if cache is not None else self.model.unet
        if not self.model.cfg.inpainting:
            return unet
        from sd_cli.pipeline.inpaint import concat_conditioning

        if concat is None:  # text to image with an inpainting model: everything is repainted
            b, _, h, w = noise.shape
            concat = concat_conditioning(self, None, None, b, (h, w))
        cc = concat.to(self.device, torch.float32)  # (B, 5, h, w)

        def with_concat(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            rows = cc.repeat(x.shape[0] // cc.shape[0], 1, 1, 1)  # [uncond; cond] halves: the same rows
            return unet(torch.cat([x, rows.to(x.dtype)], dim=1), t, c)  # (N, 9, h, w) in

        return with_concat

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, 4, h, w) -> images (B, 8h, 8w, 3) uint8; refuses to give black/NaN images."""
        pixels = self.decoder(latents)  # (B, 3, H, W) in about [-1, 1]
        if not torch.isfinite(pixels).all():
            raise SdCliError(f"the VAE decode produced non-finite pixels (NaN/inf); {self._nan_hint()}")
        return to_uint8(pixels)

    def _denoise(self, eps_model, noise, sampler, steps, eta, generator, callback, scheduler, s_noise,
                 init, t_enc, caches=(), tome: float = 0.0, cfg_interval=None) -> torch.Tensor:
        """The sampler's loop: latents (B, 4, h, w) float32 from noise (txt2img) or from `init` noised to
        the level of t_enc (img2img). NaN guard: every step's latents are checked (one reduction on a
        small tensor) and the error names the first bad step; on the CPU a bad step stops the run at
        once, on a GPU the flags stay on the device and are read once after the loop (no sync per step).
        `caches`: the pass's DeepCache wrappers, each reset to the calls its stream gets (`pass_calls`; the
        uncond stream of a guidance interval: the calls inside it, `interval_calls`); `tome` > 0: token
        merging on the UNet for the loop only (seeded, so runs reproduce; removed on any way out)."""
        info = get_sampler(sampler)
        x_T = noise.to(self.device, torch.float32)  # (B, 4, H/8, W/8)
        ac = self.model.alphas_cumprod.to(self.device)
        extra = {"scheduler": scheduler} if scheduler not in (None, info.schedule) else {}
        if s_noise != 1.0:
            extra["s_noise"] = s_noise
        if init is not None:
            x_T, extra["start"] = img2img_start(info, init.to(self.device, torch.float32), x_T, ac, steps,
                                                scheduler, t_enc)
        finite: list[torch.Tensor] = []

        def bad_step(i: int, total: int) -> SdCliError:
            return SdCliError(f"sampling ({sampler}) produced non-finite latents (NaN/inf) at step {i + 1} of "
                              f"{total}; {self._nan_hint()}")

        eager = self.eager_nan_check if self.eager_nan_check is not None else x_T.device.type == "cpu"

        def checked(i: int, total: int, x: torch.Tensor) -> None:
            ok = torch.isfinite(x).all()
            if eager:
                if not bool(ok):
                    raise bad_step(i, total)
            else:
                finite.append(ok)
            if callback is not None:
                callback(i, total, x)

        for i, cache in enumerate(caches):  # [cond (or the batched pair)] or [cond, uncond]
            cache.reset(pass_calls(info, steps, scheduler, extra.get("start", 0)) if i == 0 else
                        interval_calls(info, ac, steps, eta, extra, cfg_interval))
        with _token_merging(self.model.model.diffusion_model, tome):
            latents = info.fn(eps_model, x_T, ac, steps, eta=eta, generator=generator, callback=checked, **extra)
        if finite:
            flags = torch.stack(finite).cpu().tolist()
            if not all(flags):
                raise bad_step(flags.index(False), len(flags))
        if not torch.isfinite(latents).all():
            raise SdCliError(f"sampling ({sampler}) produced non-finite latents (NaN/inf); {self._nan_hint()}")
        return latents

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray, mode: str = "mean", generators=None) -> torch.Tensor:
        """Init images (B, H, W, 3) uint8 -> scaled latents (B, 4, H/8, W/8) float32: the VAE posterior's
        mean ("mean", deterministic) or a draw from it ("sample": one row of noise from each image's
        generator, after its start noise). Pixels go to [-1, 1] as CompVis' load_img: x / 255 * 2 - 1."""
        x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.encode_pixels(2.0 * x - 1.0, mode, generators)

    @torch.inference_mode()
    def encode_pixels(self, x: torch.Tensor, mode: str = "mean", generators=None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8) float32 (`encode_images`)."""
        vae = self.model.first_stage_model
        mean, logvar = vae.encode_moments(x.to(self.device, vae.quant_conv.weight.dtype))  # (B, 4, h, w) each
        z = mean.float()
        if mode == "sample":
            gens = generators if isinstance(generators, list) else [generators] * x.shape[0]
            draws = torch.cat([torch.randn((1, *z.shape[1:]), generator=g, dtype=torch.float32) for g in gens])
            z = z + torch.exp(0.5 * logvar.float()) * draws.to(z.device)
        if not torch.isfinite(z).all():
            raise SdCliError(f"the VAE encoder produced non-finite latents (NaN/inf); {self._nan_hint()}")
        return z * self.model.cfg.scale_factor
