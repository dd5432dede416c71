"""`StableDiffusion`: a loaded model and the one render path. The CLI, torchrun, --resume, --replay,
eval_demo and Python callers all make their images through `StableDiffusion.render`.

    sd = StableDiffusion.load("model.safetensors", device="cpu", dtype="auto")  # no path: the demo model
    images = sd.txt2img("a red circle on a blue background", seed=42, steps=25, n=2)

Setting up (`StableDiffusion(runtime)`) reads the config, picks device, dtype and threads and hashes the
checkpoint; the weights load on first use (`pipeline()`), so a --resume run with every image present
never loads them. The reproducibility rule lives in `render` alone: a CPU generator seeded with the
item's seed draws the full batch's start noise (n_samples rows; a smaller batch takes the first rows)
and then any noise the sampler adds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from sd_cli.errors import CheckpointError, SdCliError, UsageError
from sd_cli.run.report import Log, path_text
from sd_cli.run.settings import DEFAULT_CKPT, DEFAULT_SEED, Generation, Runtime, choose_model
from sd_cli.run.work import WorkItem, WorkPlan
from sd_cli.version import __version__

StepCallback = Callable[[int, int, object], None]  # (step index, total steps, latents)


def missing_checkpoint_message(path: str) -> str:
    return (
        f"no checkpoint at {path}: download a Stable Diffusion v1.x checkpoint (sd-v1-4.ckpt or "
        f"v1-5-pruned-emaonly.safetensors, from the model's page on Hugging Face after accepting its licence) "
        f"and put it at {DEFAULT_CKPT}, or pass --ckpt PATH"
    )


def pick_device(requested: str):
    import torch

    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SdCliError("--device cuda: no CUDA device is available to this torch build; use --device cpu")
        return torch.device("cuda")
    if requested == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class StableDiffusion:
    """One checkpoint on one device in one dtype, ready to render work items."""

    def __init__(self, runtime: Runtime, *, ddp=None, log: Log | None = None, gen: Generation | None = None):
        from sd_cli.weights.checkpoint import short_hash
        from sd_cli.weights.config import load_config
        from sd_cli.weights.precision import choose_dtype, dtype_name, requested_mode, set_threads

        self.runtime, self.ddp, self.log = runtime, ddp, log or Log(quiet=True)
        self.config = load_config(_config_for(runtime))
        if gen is not None:
            self.check(gen)
        device = pick_device(runtime.device or self.config.runtime.device)
        mode = requested_mode(runtime.dtype, runtime.precision, self.config.runtime.precision)
        self.dtype_auto = mode == "auto"  # the dtype is the machine's choice (--resume then ignores it)
        self.dtype_choice = choose_dtype(mode, device)
        self.dtype_name = dtype_name(self.dtype_choice.dtype)
        if not runtime.ckpt.exists():
            raise CheckpointError(missing_checkpoint_message(str(runtime.ckpt)))
        if ddp is not None:
            device = ddp.start(device)  # rendezvous; cuda:LOCAL_RANK on CUDA
        self.device = device
        self.threads = None
        if device.type == "cpu":  # torchrun: by default the host's cores are shared among its ranks
            from sd_cli.model.cpu import default_threads

            asked = runtime.threads or (ddp.threads(default_threads()) if ddp else None)
            self.threads = set_threads(asked)
        self.model_hash = short_hash(runtime.ckpt)  # (cached per file; part of every image's metadata)
        from sd_cli.model.tokenizer import get_tokenizer
        from sd_cli.weights.embeddings import EmbeddingSet

        self.embeddings = EmbeddingSet(runtime.embeddings, get_tokenizer(), self.config.model.text.hidden_size)
        from sd_cli.run.loras import LoraBank
        from sd_cli.weights.lora import model_layout

        self.loras = LoraBank(runtime.lora_dir, lambda: model_layout(self.config.model))
        self.default_loras: tuple = ()  # the API's LoRA set (`load(loras=...)`, `set_loras`)
        self._pipe = None
        if gen is not None:
            self.check_loras(gen)

    @classmethod
    def load(cls, ckpt: str | Path | None = None, *, config: str | None = None, device: str | None = None,
             dtype: str | None = None, threads: int | None = None, vae_tiling: str = "auto",
             vae: str | Path | None = None, loras=(), lora_dir: str | Path | None = None) -> "StableDiffusion":
        """Load a checkpoint (.ckpt or .safetensors); without one, the CLI's default (the demo model when
        nothing is at models/ldm/stable-diffusion-v1/model.ckpt). device (auto|cpu|cuda) and dtype
        (auto|fp32|bf16|fp16) default, as in the CLI, to the config's runtime section. `vae`: a VAE file
        instead of the checkpoint's; `loras`: [(path, weight)] for every image (`set_loras` changes them);
        `lora_dir`: where prompt tags `<lora:NAME:W>` look (default models/Lora)."""
        path, config, demo = choose_model(str(ckpt) if ckpt is not None else None, config)
        as_path = lambda p: Path(p).expanduser() if p is not None else None  # noqa: E731
        sd = cls(Runtime(path, config, demo, device, dtype, None, threads, vae_tiling, vae=as_path(vae),
                         lora_dir=as_path(lora_dir)))
        sd.set_loras(loras)
        sd.pipeline().set_loras(_uses(sd.loras.resolve(list(sd.default_loras))))  # merged now, as part of loading
        return sd

    @property
    def rank(self) -> int:
        return self.ddp.rank if self.ddp is not None else 0

    def check(self, gen: Generation) -> None:
        """Settings that must agree with this model's config (--C, --f)."""
        m = self.config.model
        if gen.latent_channels != m.latent_channels:
            raise UsageError(f"--C {gen.latent_channels}: this model has {m.latent_channels} latent channels")
        if gen.factor != m.downscale:
            raise UsageError(f"--f {gen.factor}: this model's VAE downsamples by {m.downscale}")
        if gen.clip_skip > m.text.num_hidden_layers:
            raise UsageError(f"--clip-skip {gen.clip_skip}: this model's text encoder has {m.text.num_hidden_layers} "
                             "layers")
        blocks = 1 + len(m.unet.channel_mult) * m.unet.num_res_blocks + len(m.unet.channel_mult) - 1
        if gen.deepcache_branch >= blocks:
            raise UsageError(f"--deepcache-branch {gen.deepcache_branch}: this model's UNet has {blocks} input blocks "
                             f"(0..{blocks - 1})")

    def pipeline(self):
        """The model, loaded on first use."""
        if self._pipe is None:
            from sd_cli.pipeline.generate import Pipeline
            from sd_cli.weights import loading
            from sd_cli.weights.merge import file_stamp

            t0 = time.perf_counter()
            stamp = file_stamp(self.runtime.ckpt)
            on = f"{self.device}, {self.threads} threads" if self.threads else str(self.device)
            self.log.info(f"loading {self.runtime.ckpt} ({self.dtype_name}, {self.dtype_choice.reason}; on {on}) ...")
            model = loading.load_model(self.config.model, self.runtime.ckpt, device=self.device,
                                       dtype=self.dtype_choice.dtype, vae=self.runtime.vae)
            self.log.info(f"model loaded in {time.perf_counter() - t0:.1f} s (hash {self.model_hash})")
            self._pipe = Pipeline(model, self.device, on_warning=self.log.warn, vae_tiling=self.runtime.vae_tiling,
                                  embeddings=self.embeddings, ckpt=self.runtime.ckpt, ckpt_stamp=stamp)
        return self._pipe

    def base_metadata(self, gen: Generation) -> dict:
        """The sd_cli metadata every image of `gen` shares (prompt, seed and batch position come per image)."""
        from sd_cli.pipeline.vae_tiling import decode_method

        return {
            "negative_prompt": gen.negative_prompt,
            "steps": gen.steps,
            "sampler": gen.sampler,
            "sampler_label": _label(gen),
            "scale": gen.scale,
            "eta": gen.eta,
            "width": gen.width,
            "height": gen.height,
            "model_hash": self.model_hash,
            "model_name": path_text(self.runtime.ckpt.stem),  # undecodable file-name bytes escaped
            "dtype": self.dtype_name,
            "vae_decode": decode_method(self.runtime.vae_tiling, gen.height, gen.width),  # whole | bands | tiles
            "device": self.device.type,
            "threads": self.threads,  # CPU results depend on it (in the last bit); --replay uses the same number
            "fixed_code": gen.fixed_code,
            **_sampling_fields(gen),
            "seed_rule": gen.seed_rule,
            "prompt_syntax": gen.prompt_syntax,
            "clip_skip": gen.clip_skip,
            **({"vae": self.vae_record()} if self.runtime.vae is not None else {}),
            **(_init_fields(gen) if gen.init is not None else {}),
            **({"subseed": gen.subseed, "subseed_strength": gen.subseed_strength} if gen.subseed_strength else {}),
            **({"hires": {"scale": gen.hr_scale, "upscaler": gen.hr_upscaler, "steps": gen.hr_steps or gen.steps,
                          "strength": gen.hr_denoise, "width": gen.out_size[0], "height": gen.out_size[1],
                          "steps_rule": gen.hr_rule}}
               if gen.hr_scale else {}),
            **_faster_fields(gen),
            "sd_cli_version": __version__,
        }

    def vae_record(self) -> dict:
        """The --vae file as the metadata records it (A1111: "VAE hash" is its AutoV2 hash, "VAE" its name)."""
        from sd_cli.weights.checkpoint import file_hash

        vae = self.runtime.vae
        digest = file_hash(vae)  # (cached per file)
        return {"file": path_text(vae), "name": path_text(vae.name), "sha256": digest, "a1111_hash": digest[:10]}

    def lora_set(self, gen: Generation, prompt: str):
        """The LoRAs of one prompt's images, read and checked, in merge order."""
        return self.loras.resolve(self.loras.requests(gen.loras, prompt, gen.prompt_syntax))

    def check_loras(self, gen: Generation) -> None:
        """Every prompt's LoRA tags name a file, and every file fits this model: before any image."""
        for prompt in dict.fromkeys(gen.prompts):
            self.lora_set(gen, prompt)

    def set_loras(self, loras) -> None:
        """The API's LoRA set for later `txt2img` calls: [(path, weight) or (path, te_weight, unet_weight)].
        Only the touched layers change (from the checkpoint's own tensors); nothing is read from disk again
        but those layers."""
        from sd_cli.run.loras import LoraRequest

        reqs = []
        for entry in loras:
            path, *weights = entry if isinstance(entry, (tuple, list)) else (entry,)
            te = float(weights[0]) if weights else 1.0
            unet = float(weights[1]) if len(weights) > 1 else te
            reqs.append(LoraRequest(Path(path).expanduser(), te, unet, Path(path).stem))
        self.loras.resolve(reqs)  # read and check now
        self.default_loras = tuple(reqs)

    def describe(self, gen: Generation, prompt: str) -> dict:
        """Per-image metadata that depends on the prompt: its token count and the embeddings it (or the
        negative prompt) uses, {name: hash} (only when there are some)."""
        from sd_cli.model.tokenizer import get_tokenizer
        from sd_cli.pipeline.conditioning import chunk_prompt, token_count

        loras = [r.record() for r in self.lora_set(gen, prompt)]
        fields = {"loras": loras} if loras else {}
        if gen.prompt_syntax != "a1111":
            return {"token_count": token_count(prompt, gen.prompt_syntax), **fields}
        tok = get_tokenizer()
        (texts, edited), (negatives, neg_edited) = _edit_texts(gen, prompt), _edit_texts(gen, gen.negative_prompt)
        chunked = [chunk_prompt(text, tok, self.embeddings) for text in texts]
        used = {name: h for c in (*chunked, *(chunk_prompt(t, tok, self.embeddings) for t in negatives))
                for name, h in c.embeddings.items()}
        if edited or neg_edited:
            fields["prompt_editing"] = True  # (its absence: the brackets were emphasis, as before editing)
        return {"token_count": max(c.token_count for c in chunked),
                **({"embeddings": dict(sorted(used.items()))} if used else {}), **fields}

    def plan(self, gen: Generation) -> WorkPlan:
        """The work items of `gen` on this model."""
        return WorkPlan(gen, self.base_metadata(gen), lambda prompt: self.describe(gen, prompt))

    def render(self, gen: Generation, item: WorkItem, on_step: StepCallback | None = None) -> list[np.ndarray]:
        """The images (H, W, 3) uint8 of one work item: seed, then noise, then sample (and the hires pass),
        then decode, then watermark."""
        from sd_cli.output.watermark import apply_watermark

        generator, noise = _start_noise(gen, item, gen.width, gen.height)
        pipe = self.pipeline()
        pipe.set_loras(_uses(self.lora_set(gen, item.prompts[0])))
        init, t_enc = _init_latents(pipe, gen, len(item.prompts), generator)
        mask = _blurred_mask(gen) if gen.mask is not None else None  # (H, W) uint8
        inpaint, concat = None, _concat(pipe, gen, mask, len(item.prompts))
        if mask is not None and init is not None:
            from sd_cli.pipeline.inpaint import filled, latent_mask

            repaint = latent_mask(mask, gen.factor)  # (1, 1, h, w), 1 = repaint
            inpaint = (init, repaint)
            init = filled(init, repaint, gen.fill, noise) if gen.strength < 1.0 else None  # 1: from noise
        common = dict(negative_prompt=gen.negative_prompt, sampler=gen.sampler, scale=gen.scale, eta=gen.eta,
                      callback=on_step, prompt_syntax=gen.prompt_syntax, clip_skip=gen.clip_skip,
                      scheduler=gen.scheduler, s_noise=gen.s_noise,
                      prompt_steps="auto" if gen.prompt_editing else None, deepcache=gen.deepcache,
                      deepcache_branch=gen.deepcache_branch, cfg_interval=gen.cfg_interval, tome=gen.tome)
        latents = pipe.latents(list(item.prompts), noise, steps=gen.steps, generator=generator, init=init,
                               t_enc=t_enc, inpaint=inpaint, concat=concat, **common)  # (B, 4, H/8, W/8)
        if gen.hr_scale:
            latents = _hires_pass(pipe, gen, item, latents, common)  # (B, 4, H'/8, W'/8)
        images = pipe.decode(latents)
        if mask is not None:  # the kept pixels are the original's (A1111's overlay)
            from sd_cli.pipeline.inpaint import paste_back

            images = paste_back(images, gen.init.pixels, mask)
        return [apply_watermark(img) if gen.watermarked else img for img in images]

    def txt2img(self, prompt: str, *, seed: int = DEFAULT_SEED, n: int = 1, **settings) -> list:
        """`n` images of `prompt` as one batch (PIL images carrying the CLI's metadata in `.info`), equal
        to `sd-txt2img --prompt PROMPT --seed SEED --n_samples N --n_iter 1`. Keyword settings as
        `Generation.create`: negative_prompt, sampler, steps, scale, eta, height, width, fixed_code,
        watermark, and the faster sampling of README "Faster sampling" (deepcache, deepcache_branch,
        cfg_interval=(LO, HI), tome; `settings.FAST_PRESET` is --fast's). The prompt's `<lora:NAME:W>` tags
        and the `set_loras` set apply. Nothing is written; `image.save(path)` keeps the metadata,
        `save_images` numbers files."""
        from sd_cli.output.a1111 import a1111_text
        from sd_cli.sampling.samplers import get_sampler

        gen = Generation.create([prompt], demo=self.runtime.demo, seed=seed, n_samples=n, n_iter=1,
                                **{"loras": self.default_loras, **settings})
        self.check(gen)
        self.check_loras(gen)
        item = self.plan(gen)[0]
        schedule = get_sampler(gen.sampler).schedule
        return [_pil(img, a1111_text(meta, schedule), meta) for img, meta in zip(self.render(gen, item), item.metas)]


def _edit_texts(gen: Generation, text: str) -> tuple[list[str], bool]:
    """(The texts a prompt is during the first pass, whether it has prompt editing): itself when it has
    none, else its schedule's distinct texts. (Token count and embeddings are taken over these.)"""
    from sd_cli.pipeline.generate import schedule_steps
    from sd_cli.pipeline.prompt_schedule import has_editing, schedule
    from sd_cli.pipeline.prompt_syntax import extra_networks

    stripped = extra_networks(text)[0]
    if not gen.prompt_editing or not has_editing(stripped):
        return [text], False
    return list(dict.fromkeys(t for _, t in schedule(stripped, schedule_steps(gen.sampler, gen.steps)))), True


def _config_for(runtime: Runtime) -> str:
    """The config to build the model from: the one asked for, except that the default config with an
    inpainting checkpoint (a 9-channel UNet input) means the inpainting config."""
    from sd_cli.errors import SdCliError
    from sd_cli.weights.config import DEFAULT_CONFIG, INPAINTING_CONFIG
    from sd_cli.weights.detect import unet_in_channels

    if runtime.config != DEFAULT_CONFIG or runtime.demo or not runtime.ckpt.is_file():
        return runtime.config
    try:
        channels = unet_in_channels(runtime.ckpt)
    except SdCliError:  # a broken file: loading it says what is wrong
        return runtime.config
    return INPAINTING_CONFIG if channels == 9 else runtime.config


def _start_noise(gen: Generation, item: WorkItem, width: int, height: int):
    """(generator(s), start noise (B, 4, height/8, width/8)) of one item. Seed rule "image": one generator
    per image, its noise drawn from it alone (with a variation seed: slerp toward that seed's noise);
    "batch": the batch's n_samples rows of noise from one generator, a smaller batch takes the first."""
    import torch

    from sd_cli.pipeline.generate import initial_noise, slerp

    shape = (gen.latent_channels, height, width, gen.factor)
    if item.seeds:
        generator = [torch.Generator("cpu").manual_seed(s) for s in item.seeds]
        noise = torch.cat([initial_noise(g, 1, *shape) for g in generator])
        if gen.subseed_strength > 0:
            other = _variation_noise(gen, width, height)  # (C, h, w) at this pass's size, the same for every image
            noise = torch.cat([slerp(gen.subseed_strength, row, other) for row in noise])
        return generator, noise
    generator = torch.Generator("cpu").manual_seed(item.seed)
    return generator, initial_noise(generator, gen.n_samples, *shape)[: len(item.prompts)]


def _hires_pass(pipe, gen: Generation, item: WorkItem, latents, common: dict):
    """A1111's hires fix: the first pass's latents upscaled (in latent space, or decoded, resized with
    Lanczos and encoded again), then image to image at that size with the hires strength and steps, from
    fresh noise of each image's own seed at the new size (as A1111 draws it)."""
    import torch.nn.functional as F

    from sd_cli.pipeline.generate import schedule_steps

    width, height = gen.out_size
    size = (height // gen.factor, width // gen.factor)
    if gen.hr_upscaler == "lanczos":
        from PIL import Image

        small = pipe.decode(latents)  # (B, H, W, 3) uint8
        big = np.stack([np.asarray(Image.fromarray(im).resize((width, height), Image.LANCZOS)) for im in small])
        up = pipe.encode_images(big)
    else:
        mode = "nearest-exact" if gen.hr_upscaler == "latent-nearest" else "bilinear"
        up = F.interpolate(latents, size=size, mode=mode, **({"antialias": False} if mode == "bilinear" else {}))
    generator, noise = _start_noise(gen, item, width, height)
    steps, t_enc = gen.hr_plan()
    # prompt editing counts the hires steps from 1 after the first pass's (A1111's hires timeline)
    editing = (schedule_steps(gen.sampler, gen.hr_steps or gen.steps), schedule_steps(gen.sampler, gen.steps))
    return pipe.latents(list(item.prompts), noise, steps=steps, generator=generator, init=up, t_enc=t_enc,
                        **{**common, "prompt_steps": editing if gen.prompt_editing else None})


def _concat(pipe, gen: Generation, mask: np.ndarray | None, batch: int):
    """An inpainting model's [mask, masked-image latents] for an img2img item, from the blurred `mask`
    (None: all repainted); None without an init image (the pipeline's all-repainted default)."""
    if not pipe.model.cfg.inpainting or gen.init is None:
        return None
    from sd_cli.pipeline.inpaint import concat_conditioning

    if mask is None:
        mask = np.full(gen.init.pixels.shape[:2], 255, np.uint8)
    return concat_conditioning(pipe, gen.init.pixels, mask, batch, (gen.height // gen.factor, gen.width // gen.factor))


def _uses(resolved) -> list:
    """The merge list (sd_cli.weights.merge.LoraUse) of resolved LoRAs (`LoraBank.resolve`)."""
    from sd_cli.weights.merge import LoraUse

    return [LoraUse(r.file, r.request.te, r.request.unet) for r in resolved]


def _blurred_mask(gen: Generation) -> np.ndarray:
    from sd_cli.pipeline.inpaint import blurred

    return blurred(gen.mask.pixels, gen.mask_blur)


def _variation_noise(gen: Generation, width: int, height: int):
    """The variation seed's start noise (C, h, w) at that size, drawn as an image of that seed would draw it."""
    import torch

    from sd_cli.pipeline.generate import initial_noise

    g = torch.Generator("cpu").manual_seed(gen.subseed)
    return initial_noise(g, 1, gen.latent_channels, height, width, gen.factor)[0]


def _init_fields(gen: Generation) -> dict:
    """Image to image in the metadata: the init image (file, sha256, its own size, how it was fitted),
    the strength and the encoding."""
    init = gen.init
    out = {"init_image": {"file": path_text(init.file), "sha256": init.sha256, "width": init.source_size[0],
                          "height": init.source_size[1], "resize": gen.resize},
           "strength": gen.strength, "encode": gen.encode}
    if gen.mask is not None:
        out["mask"] = {"file": path_text(gen.mask.file), "sha256": gen.mask.sha256, "blur": gen.mask_blur,
                       "fill": gen.fill}
    return out


def _init_latents(pipe, gen: Generation, batch: int, generator):
    """(init latents (B, 4, h, w) or None, denoising steps) of one batch; strength 1 ignores the image
    (but for the kept part of an inpainting mask)."""
    from sd_cli.sampling.samplers import denoising_steps

    if gen.init is None or gen.strength >= 1.0 and gen.mask is None:
        return None, 0
    pixels = gen.init.pixels[None]  # (1, H, W, 3)
    if gen.encode == "mean":  # deterministic: encode once for the whole batch
        latents = pipe.encode_images(pixels).expand(batch, -1, -1, -1)
    else:
        latents = pipe.encode_images(np.repeat(pixels, batch, axis=0), "sample", generator)
    return latents, denoising_steps(gen.strength, gen.steps)


def _faster_fields(gen: Generation) -> dict:
    """DeepCache, the guidance interval and token merging, each only when it is on (images without them
    keep their metadata as it was). An open upper end of the interval is written as null (JSON has no inf)."""
    out: dict = {}
    if gen.deepcache > 1:
        out.update(deepcache=gen.deepcache, deepcache_branch=gen.deepcache_branch)
    if gen.cfg_interval is not None:
        lo, hi = gen.cfg_interval
        out["cfg_interval"] = [float(lo), float(hi) if hi != float("inf") else None]
    if gen.tome:
        out["tome"] = float(gen.tome)
    return out


def _sampling_fields(gen: Generation) -> dict:
    """The scheduler and s_noise, recorded where they are not what the four first samplers always ran
    with (so images of those keep their metadata as it was)."""
    from sd_cli.sampling.samplers import get_sampler

    out = {}
    if gen.scheduler is not None and gen.scheduler != get_sampler(gen.sampler).schedule or gen.sampler not in LEGACY:
        out["scheduler"] = gen.scheduler
    if gen.s_noise != 1.0:
        out["s_noise"] = gen.s_noise
    return out


def _label(gen: Generation) -> str:
    """A1111's sampler name; "DPM++ 2M Karras" stays as older versions wrote it unless another schedule."""
    from sd_cli.sampling.samplers import get_sampler

    info = get_sampler(gen.sampler)
    if gen.scheduler in (None, info.schedule):
        return info.label
    return info.a1111_name or info.label


LEGACY = ("ddim", "plms", "dpmpp_2m", "euler_a")  # the samplers before issue 16


def _pil(img: np.ndarray, parameters: str, metadata: dict):
    from sd_cli.output.image import GeneratedImage

    return GeneratedImage.of(img, parameters, metadata)


def save_images(images: list, directory: str | Path) -> list[Path]:
    """Write API images as the CLI does: next free numbers (00000.png, ...), atomic, never overwriting,
    byte-identical to the CLI's files. Returns the paths."""
    from sd_cli.output.png import SAMPLE_PATTERN, ensure_writable_dir, save_png

    directory = Path(directory)
    ensure_writable_dir(directory)
    return [save_png(directory, SAMPLE_PATTERN, np.asarray(im), parameters=im.info["parameters"],
                     metadata=im.sd_cli_metadata) for im in images]
