"""The three settings objects below the CLI: what to generate, where to run, where to write.

Each is frozen and checked once, when it is built (`__post_init__`); nothing changes them afterwards.
The CLI builds them from its flags, the Python API from keyword arguments, `--replay` from a PNG's
metadata. Values a caller leaves as None get the tool's defaults here, once: the sampler and step rule
(`resolve_sampling`), and the demo model's size and guidance when the demo model runs (`choose_model`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sd_cli.demo import DEMO_CKPT, DEMO_CONFIG, GUIDANCE, SIZE, demo_available
from sd_cli.errors import UsageError
from sd_cli.pipeline.conditioning import SYNTAXES
from sd_cli.pipeline.inpaint import FILLS
from sd_cli.output.a1111 import HR_LABELS
from sd_cli.pipeline.prompt_syntax import check_a1111
from sd_cli.weights.config import DEFAULT_CONFIG
from sd_cli.weights.dtypes import DTYPE_CHOICES

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_EMBEDDINGS = "models/embeddings"  # A1111's folder; used when it exists and --embeddings is not given
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
# No sampler and no step count given: DPM-Solver++(2M) Karras, 25 steps (README "Samplers";
# tests/test_default_sampler.py has the evidence).
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 25
COMPVIS_STEPS = 50  # CompVis' --ddim_steps default: ddim and plms without a step count
DEFAULT_SCALE = 7.5
DEFAULT_SIZE = 512
DEFAULT_SEED = 42
SEED_LIMIT = 2**63  # seeds are 0 .. 2**63 - 1 (torch.Generator.manual_seed takes any int64)
MAX_PIXELS = 4096 * 4096
MAX_BATCH = 256  # largest batch (--n_samples); also what a recorded image may claim (replay)
MAX_PROMPT_TOKENS = 7500  # 100 chunks of 75: far past any real prompt; bounds the tokenizer's work
MAX_IMAGES = 1_000_000  # images in one run (--n_iter x prompts): a year of 512x512 images on a CPU
VAE_TILING = ("auto", "on", "tiles", "off")
SEED_RULES = ("image", "batch")
ENCODE_MODES = ("mean", "sample")
INPAINT_FILLS = FILLS
# --hr-upscaler -> (A1111's label, how): latent upscales the latents (A1111's "Latent" is bilinear without
# antialiasing), lanczos decodes, resizes with Pillow and encodes again.
HR_RULES = ("a1111", "fraction")
HR_UPSCALERS = HR_LABELS
HR_STRENGTH = {"latent": 0.7, "latent-nearest": 0.7, "lanczos": 0.5}


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires pass's (width, height): scale times the first pass's, down to a multiple of 8."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8
DEFAULT_STRENGTH = 0.75  # CompVis img2img.py
# Faster sampling (README "Faster sampling"): DeepCache (a full UNet call every N, shallow calls between),
# guidance only in a sigma interval, token merging. --fast is this preset (explicit flags win); its figures
# on the demo model are in the README, the full-size timings from `bench/bench.py --only accel`.
FAST_PRESET = {"deepcache": 3, "deepcache_branch": 0, "cfg_interval": (0.28, 5.42)}
MAX_DEEPCACHE = 50
MAX_DEEPCACHE_BRANCH = 11  # SD v1 has 12 input blocks; the model's own count is checked against its config
MAX_TOME = 0.75  # ToMe's 2x2 cells keep one destination each: past 3/4 nothing more is merged


FASTER_KEYS = ("deepcache", "deepcache_branch", "cfg_interval", "tome")  # Generation's faster-sampling fields


def faster_options(given: dict, fast: bool = False, scale: float | None = None, base: dict | None = None) -> dict:
    """The faster-sampling keywords of a run: each option in `given` (its value, None: not given), else
    the FAST_PRESET value when `fast` (its guidance interval only where there is guidance, scale != 1;
    its branch only with DeepCache on), else `base`'s (e.g. --params), else nothing (off)."""
    out = {k: v for k, v in (base or {}).items() if k in FASTER_KEYS}
    out.update({k: tuple(v) if k == "cfg_interval" else v for k, v in given.items() if v is not None})
    for key, value in FAST_PRESET.items() if fast else ():
        if given.get(key) is not None or key == "cfg_interval" and scale == 1.0:
            continue
        if key == "deepcache_branch" and out.get("deepcache", 1) == 1:
            continue  # (--fast --deepcache 1: DeepCache off, so no branch)
        out[key] = value
    return out


def fast_preset_text() -> str:
    """FAST_PRESET as the flags it stands for ("--deepcache 3 --deepcache-branch 0 --cfg-interval 0.28 5.42")."""
    parts = []
    for key, value in FAST_PRESET.items():
        text = " ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"
        parts.append(f"--{key.replace('_', '-')} {text}")
    return " ".join(parts)


def resolve_sampling(sampler: str | None, steps: int | None, ddim_steps: int | None = None,
                     plms: bool = False, dpm_solver: bool = False) -> tuple[str, int]:
    """(sampler, steps) from --sampler/--plms/--dpm_solver and --steps/--ddim_steps.

    Nothing given: DEFAULT_SAMPLER with DEFAULT_STEPS. Only --ddim_steps N: DDIM with N steps (CompVis'
    meaning); only --steps N: DEFAULT_SAMPLER with N. A named sampler without a step count runs
    COMPVIS_STEPS (ddim, plms: as CompVis) or DEFAULT_STEPS (the others).
    """
    chosen = [n for n, flag in (("plms", plms), ("dpmpp_2m", dpm_solver)) if flag]
    if sampler:
        chosen.append(sampler)
    if len(set(chosen)) > 1:
        raise UsageError(f"conflicting samplers: {', '.join(sorted(set(chosen)))}; pick one")
    if steps is not None and ddim_steps is not None and steps != ddim_steps:
        raise UsageError(f"--steps {steps} and --ddim_steps {ddim_steps} disagree; give one")
    given = steps if steps is not None else ddim_steps
    if chosen:
        name = chosen[0]
    elif steps is None and ddim_steps is not None:
        name = "ddim"  # CompVis: --ddim_steps alone is DDIM
    else:
        name = DEFAULT_SAMPLER
    if given is None:
        given = COMPVIS_STEPS if name in ("ddim", "plms") else DEFAULT_STEPS
    return name, given


def choose_model(ckpt: str | None, config: str | None) -> tuple[Path, str, bool]:
    """(checkpoint, config, demo?): no checkpoint given and nothing at DEFAULT_CKPT means the built-in
    demo model (with its own config unless one is given). An explicit checkpoint always wins."""
    if ckpt is None and not Path(DEFAULT_CKPT).exists() and demo_available():
        return DEMO_CKPT, config or str(DEMO_CONFIG), True
    return Path(ckpt or DEFAULT_CKPT).expanduser(), config or DEFAULT_CONFIG, False


def _encodable(text: str) -> bool:
    """False for lone surrogates (bytes the terminal could not decode): they cannot go into a PNG."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_length(text: str) -> None:
    """At most MAX_PROMPT_TOKENS tokens; the tokenizer stops counting just past that (a 1 MB line costs
    a fraction of a second, not minutes)."""
    from sd_cli.model.tokenizer import get_tokenizer

    if len(text) > MAX_PROMPT_TOKENS and len(get_tokenizer().encode(text, limit=MAX_PROMPT_TOKENS)) > MAX_PROMPT_TOKENS:
        raise UsageError(f"the prompt is more than {MAX_PROMPT_TOKENS} tokens (100 chunks of 75); shorten it")


def _check_text(flag: str, text: str) -> None:
    if not isinstance(text, str) or "\0" in text or not _encodable(text):
        raise UsageError(f"{flag}: not valid text (a NUL or undecodable bytes from the terminal?)")


def _lora_key(prompt: str, syntax: str) -> tuple:
    """What decides a prompt's LoRA set (its tags; plain text has none)."""
    if syntax != "a1111" or "<" not in prompt:
        return ()
    from sd_cli.pipeline.prompt_syntax import extra_networks

    return tuple(sorted((t.name, t.te, t.unet) for t in extra_networks(prompt)[1]))


@dataclass(frozen=True)
class Generation:
    """What to generate: prompts, sampling, size, count and seeds; everything that decides the pixels."""

    prompts: tuple[str, ...]  # the prompt, or every prompt of --from-file
    from_file: bool = False  # batching: file prompts go n_samples at a time; one prompt fills a batch
    negative_prompt: str = ""
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    eta: float = 0.0  # what the sampler runs with (Euler a's 0 means its standard 1)
    seed: int = DEFAULT_SEED
    fixed_code: bool = False
    height: int = DEFAULT_SIZE
    width: int = DEFAULT_SIZE
    latent_channels: int = 4  # --C, must be the model's
    factor: int = 8  # --f, must be the VAE's
    n_samples: int = 1
    n_iter: int = 1
    watermark: bool = True  # asked for; images too small to read it back go without (recorded per image)
    prompt_syntax: str = "a1111"  # A1111's prompt language; "plain": the text as it is (images before it)
    prompt_editing: bool = True  # a1111: [from:to:when] and [a|b] change the text during sampling (False:
    #                              read as emphasis brackets, as images made before editing existed)
    clip_skip: int = 1  # A1111's "Clip skip": stop the text encoder this many layers from its end
    scheduler: str | None = None  # the sigma list (karras, normal, ...); None: the sampler's default
    s_noise: float = 1.0  # A1111's sigma noise, where the sampler has it
    seed_rule: str = "image"  # image: image m of the run has seed + m and its own generator (A1111);
    #                           batch: batch k has seed + k, one generator (images before the field)
    loras: tuple = ()  # the run's --lora files (sd_cli.run.loras.LoraRequest), for every prompt
    subseed: int | None = None  # A1111's variation seed ...
    subseed_strength: float = 0.0  # ... and how far the start noise goes toward its noise (slerp)
    hr_scale: float | None = None  # hires fix: a second pass at this many times the size (> 1) ...
    hr_upscaler: str = "latent"  # ... from the first pass upscaled so (HR_UPSCALERS) ...
    hr_steps: int | None = None  # ... with this many steps (None: steps) ...
    hr_strength: float | None = None  # ... and this denoising strength (None: 0.7 latent, 0.5 lanczos);
    hr_rule: str = "a1111"  # a1111: hr_steps steps of a schedule of hr_steps / strength (A1111); "fraction":
    #                         int(strength x hr_steps) of hr_steps (images made before the rule)
    init: object = None  # image to image: the init image (sd_cli.output.init_image.InitImage), or None
    strength: float = DEFAULT_STRENGTH  # its denoising strength: 0 keeps it (through the VAE), 1 ignores it
    encode: str = "mean"  # the init latent: the VAE posterior's mean, or a "sample" from it
    resize: str | None = None  # how the init image was fitted to --W/--H (None: its own size, down to x8)
    mask: object = None  # inpainting: the mask (sd_cli.output.init_image.MaskImage; white repaints), or None
    mask_blur: int = 4  # its blur in pixels (A1111's default)
    fill: str = "original"  # what the repainted area starts from: original | latent noise | latent nothing
    deepcache: int = 1  # DeepCache: a full UNet call every N calls, shallow ones between (1: off)
    deepcache_branch: int = 0  # ... keeping input block B and its output block (0: the shallowest skip)
    cfg_interval: tuple[float, float] | None = None  # guidance only while LO <= sigma <= HI (HI may be inf)
    tome: float = 0.0  # token merging ratio in the full-resolution self-attentions (0: off)

    def __post_init__(self) -> None:
        from sd_cli.sampling.samplers import get_sampler

        if not self.prompts:
            raise UsageError("nothing to draw: no prompt")
        for prompt in self.prompts:
            _check_text("--prompt", prompt)
        _check_text("--negative-prompt", self.negative_prompt)
        for name, value in (("H", self.height), ("W", self.width)):
            if value < 8 or value % 8:
                raise UsageError(f"--{name} {value}: must be a positive multiple of 8")
        if self.height * self.width > MAX_PIXELS:
            raise UsageError(f"--H {self.height} --W {self.width}: larger than 4096x4096 is not supported")
        if not 1 <= self.steps <= 1000:
            raise UsageError(f"--steps {self.steps}: must be between 1 and 1000")
        for name in ("n_samples", "n_iter"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.n_samples > MAX_BATCH:
            raise UsageError(f"--n_samples {self.n_samples}: at most {MAX_BATCH} images per batch; use --n_iter "
                             "for more")
        self._check_counts()
        if self.seed_rule not in SEED_RULES:
            raise UsageError(f"seed rule {self.seed_rule!r}: one of {', '.join(SEED_RULES)}")
        if self.prompt_syntax not in SYNTAXES:
            raise UsageError(f"--prompt-syntax {self.prompt_syntax}: choose one of {', '.join(SYNTAXES)}")
        if not 1 <= self.clip_skip <= 12:
            raise UsageError(f"--clip-skip {self.clip_skip}: must be between 1 and 12 (1: the last layer, as SD)")
        if self.prompt_syntax == "a1111":
            for i, text in enumerate((*self.prompts, self.negative_prompt)):
                check_a1111(text, negative=i == len(self.prompts))
                _check_length(text)
        self._check_init()
        self._check_variation()
        self._check_hires()
        if not math.isfinite(self.scale):
            raise UsageError(f"--scale {self.scale}: must be a finite number")
        self._check_faster()
        info = get_sampler(self.sampler)
        if self.scheduler is not None and info.resolve_scheduler(self.scheduler) != self.scheduler:
            raise UsageError(f"--scheduler {self.scheduler}: {self.sampler} runs on its own grid")
        if info.resolve_s_noise(self.s_noise) != self.s_noise:
            raise UsageError(f"--s-noise {self.s_noise}: not what {self.sampler} runs with")
        if self.sampler == "plms" and self.eta != 0:
            raise UsageError("--plms needs --ddim_eta 0 (PLMS is deterministic)")
        try:
            if info.resolve_eta(self.eta) != self.eta:
                raise UsageError(f"eta {self.eta} is not what {self.sampler} runs with; build with Generation.create")
        except UsageError as err:
            raise UsageError(f"--ddim_eta {self.eta}: {err}") from None

    @property
    def out_size(self) -> tuple[int, int]:
        """(width, height) of the images written: the hires pass's size, or --W x --H."""
        return hires_size(self.width, self.height, self.hr_scale) if self.hr_scale else (self.width, self.height)

    @property
    def hr_denoise(self) -> float:
        return self.hr_strength if self.hr_strength is not None else HR_STRENGTH.get(self.hr_upscaler, 0.7)

    def hr_plan(self) -> tuple[int, int]:
        """(schedule steps, t_enc) of the hires pass. A1111 (`setup_img2img_steps` with steps given) runs
        the hires steps N as the last N of a schedule of int(N / min(strength, 0.999)) steps (t_enc = N - 1
        in A1111's count, where the k-samplers run t_enc + 1 steps); the older rule ran
        int(strength x N) of a schedule of N."""
        from sd_cli.sampling.samplers import denoising_steps

        n = self.hr_steps or self.steps
        if self.hr_rule == "fraction":
            return n, denoising_steps(self.hr_denoise, n)
        d = min(self.hr_denoise, 0.999)
        return (int(n / d), n - 1) if d > 0 else (n, 0)

    def _check_hires(self) -> None:
        if self.hr_scale is None:
            return
        if self.hr_rule not in HR_RULES:
            raise UsageError(f"hires steps rule {self.hr_rule!r}: one of {', '.join(HR_RULES)}")
        if not isinstance(self.hr_scale, (int, float)) or not 1.0 < self.hr_scale <= 8.0:
            raise UsageError(f"--hr-scale {self.hr_scale}: must be more than 1 (2 doubles the size) and at most 8")
        if self.hr_upscaler not in HR_UPSCALERS:
            raise UsageError(f"--hr-upscaler {self.hr_upscaler}: choose one of {', '.join(HR_UPSCALERS)}")
        if self.hr_steps is not None and not 1 <= self.hr_steps <= 1000:
            raise UsageError(f"--hr-steps {self.hr_steps}: must be between 1 and 1000")
        if not 0.0 <= self.hr_denoise <= 1.0:
            raise UsageError(f"--denoising-strength {self.hr_denoise}: must be between 0 and 1")
        if self.hr_plan()[0] > 1000:
            raise UsageError(f"--denoising-strength {self.hr_denoise} with {self.hr_steps or self.steps} hires steps "
                             "needs a schedule of more than 1000 steps (A1111 runs them as the last steps of "
                             "steps / strength); raise the strength or lower --hr-steps")
        w, h = self.out_size
        if w * h > MAX_PIXELS:
            raise UsageError(f"--hr-scale {self.hr_scale}: {w}x{h} is larger than 4096x4096")
        if self.init is not None or self.seed_rule != "image":
            raise UsageError("--hr-scale is for text to image (with per-image seeds)")

    def _check_faster(self) -> None:
        """--deepcache, --deepcache-branch, --cfg-interval, --tome (README "Faster sampling")."""
        n, b = self.deepcache, self.deepcache_branch
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DEEPCACHE:
            raise UsageError(f"--deepcache {n}: must be a whole number from 1 (off) to {MAX_DEEPCACHE}")
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= MAX_DEEPCACHE_BRANCH:
            raise UsageError(f"--deepcache-branch {b}: must be a whole number from 0 to {MAX_DEEPCACHE_BRANCH}")
        if b and n == 1:
            raise UsageError(f"--deepcache-branch {b}: only with --deepcache N, N > 1 (DeepCache is off)")
        if self.cfg_interval is not None:
            ok = isinstance(self.cfg_interval, tuple) and len(self.cfg_interval) == 2 \
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.cfg_interval)
            lo, hi = self.cfg_interval if ok else (math.nan, math.nan)
            if not (ok and math.isfinite(lo) and 0 <= lo < hi and not math.isnan(hi)):
                shown = " ".join(map(str, self.cfg_interval)) if ok else repr(self.cfg_interval)
                raise UsageError(f"--cfg-interval {shown}: two sigmas LO HI with 0 <= LO < HI (HI may be inf)")
            if self.scale == 1.0:
                raise UsageError("--cfg-interval: --scale 1 has no guidance to limit")
        r = self.tome
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= MAX_TOME:
            raise UsageError(f"--tome {r}: a ratio from 0 (off) to {MAX_TOME} (2x2 cells keep one token in four)")

    def _check_variation(self) -> None:
        x = self.subseed_strength
        if not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
            raise UsageError(f"--subseed-strength {x}: must be between 0 and 1")
        if self.subseed is not None and not 0 <= self.subseed < SEED_LIMIT:
            raise UsageError(f"--subseed {self.subseed}: must be between 0 and 2**63-1")
        if x > 0 and self.subseed is None:
            raise UsageError("--subseed-strength: give the variation seed too (--subseed S)")
        if x > 0 and self.seed_rule != "image":
            raise UsageError("variation seeds need the per-image seed rule")

    def _check_init(self) -> None:
        if not isinstance(self.strength, (int, float)) or not 0.0 <= self.strength <= 1.0:
            raise UsageError(f"--strength {self.strength}: must be between 0 and 1 (0 keeps the image, 1 ignores it)")
        if self.encode not in ENCODE_MODES:
            raise UsageError(f"--encode {self.encode}: choose one of {', '.join(ENCODE_MODES)}")
        if self.mask is not None and self.init is None:
            raise UsageError("--mask needs --init-img (the picture to inpaint)")
        if not isinstance(self.mask_blur, int) or not 0 <= self.mask_blur <= 256:
            raise UsageError(f"--mask-blur {self.mask_blur}: must be between 0 and 256 pixels")
        if self.fill not in INPAINT_FILLS:
            raise UsageError(f"--inpaint-fill {self.fill}: choose one of {', '.join(INPAINT_FILLS)}")
        if self.init is not None and tuple(self.init.size) != (self.width, self.height):
            raise UsageError(f"the init image is {self.init.size[0]}x{self.init.size[1]} but the run is "
                             f"{self.width}x{self.height}")

    def batches(self) -> list[tuple[str, ...]]:
        """The batches of one iteration. A batch never mixes LoRA sets: consecutive file prompts with the
        same `<lora:...>` tags share batches of up to n_samples; a prompt with other tags starts a new one."""
        if not self.from_file:
            return [tuple(self.prompts[:1]) * self.n_samples]
        out: list[list[str]] = []
        last = None
        for prompt in self.prompts:
            key = _lora_key(prompt, self.prompt_syntax)
            if not out or len(out[-1]) == self.n_samples or key != last:
                out.append([])
            out[-1].append(prompt)
            last = key
        return [tuple(b) for b in out]

    def _check_counts(self) -> None:
        """At most MAX_IMAGES images, and every batch's seed (seed + batch number) below 2**63."""
        per_iter = len(self.batches()) if self.from_file and self.seed_rule == "batch" else 1
        batches = self.n_iter * per_iter
        images = self.n_iter * (len(self.prompts) if self.from_file else self.n_samples)
        if self.seed_rule == "image":  # the last seed is that of the last image (of the first batch: fixed)
            batches = self.n_samples if self.fixed_code else images
        if images > MAX_IMAGES:
            raise UsageError(f"--n_iter {self.n_iter}: {images} images in one run, more than {MAX_IMAGES:,}; "
                             "split the job into several runs")
        if not 0 <= self.seed < SEED_LIMIT:
            raise UsageError(f"--seed {self.seed}: must be between 0 and 2**63-1")
        last = self.seed + (0 if self.fixed_code and self.seed_rule == "batch" else batches - 1)
        if last >= SEED_LIMIT:
            raise UsageError(f"--seed {self.seed}: the last image would get seed {last}, past 2**63-1 (each image "
                             "gets its own seed, counting up); pick a smaller --seed")

    @classmethod
    def create(cls, prompts: list[str] | tuple[str, ...], *, demo: bool = False, sampler: str | None = None,
               steps: int | None = None, ddim_steps: int | None = None, plms: bool = False,
               dpm_solver: bool = False, eta: float | None = 0.0, scale: float | None = None,
               height: int | None = None, width: int | None = None, scheduler: str | None = None,
               s_noise: float | None = None, **rest) -> "Generation":
        """The settings with the tool's defaults filled in: the sampler/step rule, the sampler's own eta,
        and 512x512 at guidance 7.5 (64x64 at guidance 3 for the demo model) where None is given."""
        from sd_cli.sampling.samplers import get_sampler

        for flag, value in (("--steps", steps), ("--ddim_steps", ddim_steps)):
            if value is not None and not 1 <= value <= 1000:
                raise UsageError(f"{flag} {value}: must be between 1 and 1000")
        name, n_steps = resolve_sampling(sampler, steps, ddim_steps, plms, dpm_solver)
        if name == "plms" and eta:
            raise UsageError("--plms needs --ddim_eta 0 (PLMS is deterministic)")
        try:
            run_eta = get_sampler(name).resolve_eta(eta)  # e.g. Euler a's standard eta is 1
        except UsageError as err:
            raise UsageError(f"--ddim_eta {eta}: {err}") from None
        size = SIZE if demo else DEFAULT_SIZE
        info = get_sampler(name)
        try:
            sched, noise = info.resolve_scheduler(scheduler), info.resolve_s_noise(s_noise)
        except UsageError as err:
            raise UsageError(f"--scheduler/--s-noise: {err}") from None
        return cls(tuple(prompts), sampler=name, steps=n_steps, eta=run_eta, scheduler=sched, s_noise=noise,
                   scale=scale if scale is not None else (GUIDANCE if demo else DEFAULT_SCALE),
                   height=height if height is not None else size, width=width if width is not None else size,
                   **rest)

    @property
    def watermarked(self) -> bool:
        """Whether the images carry the watermark: asked for, and big enough for imwatermark."""
        from sd_cli.output.watermark import can_watermark

        width, height = self.out_size
        return self.watermark and can_watermark(height, width)


@dataclass(frozen=True)
class Runtime:
    """Where to run: which weights and config, on which device, in which dtype, with how many threads."""

    ckpt: Path
    config: str = DEFAULT_CONFIG
    demo: bool = False  # the built-in demo model (said once on stderr)
    device: str | None = None  # auto | cpu | cuda; None: the config's
    dtype: str | None = None  # auto | fp32 | bf16 | fp16; None: from precision / the config
    precision: str | None = None  # CompVis' full | autocast
    threads: int | None = None  # CPU threads; None: the physical cores
    vae_tiling: str = "auto"
    embeddings: Path | None = None  # textual-inversion folder (a file's stem is its trigger word)
    vae: Path | None = None  # a VAE file that replaces the checkpoint's
    lora_dir: Path | None = None  # where <lora:NAME> tags look (None: models/Lora when it exists)

    def __post_init__(self) -> None:
        if self.embeddings is not None and not self.embeddings.is_dir():
            raise UsageError(f"--embeddings {self.embeddings}: not a folder")
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise UsageError(f"--lora-dir {self.lora_dir}: not a folder")
        if self.vae is not None and not self.vae.is_file():
            raise UsageError(f"--vae {self.vae}: no such file")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise UsageError(f"--threads {self.threads}: must be between 1 and 1024")
        if self.dtype not in (None, *DTYPE_CHOICES):
            raise UsageError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPE_CHOICES)}")
        if self.device not in (None, "auto", "cpu", "cuda"):
            raise UsageError(f"--device {self.device}: choose auto, cpu or cuda")
        if self.vae_tiling not in VAE_TILING:
            raise UsageError(f"--vae-tiling {self.vae_tiling}: choose one of {', '.join(VAE_TILING)}")


@dataclass(frozen=True)
class Output:
    """Where to write: the folder, which files, --resume, and what goes to stdout/stderr."""

    outdir: Path
    skip_grid: bool = False
    skip_save: bool = False
    n_rows: int = 0  # images per grid row; 0: n_samples
    resume: bool = False
    json: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.n_rows < 0:
            raise UsageError(f"--n_rows {self.n_rows}: must be 0 (same as --n_samples) or more")
        if self.skip_save and self.skip_grid:
            raise UsageError("--skip_save with --skip_grid would write nothing")
        if self.resume and self.skip_save:
            raise UsageError("--resume finds finished images in OUTDIR/samples; it cannot be combined with --skip_save")

    @property
    def sample_dir(self) -> Path:
        return self.outdir / "samples"
