"""The sd-txt2img command line: every flag, its help text and its default.

Every flag of CompVis' scripts/txt2img.py works with its meaning and default. Flags whose default
depends on the model (--H, --W, --scale, --ckpt, --config) or on the sampler (--steps) parse to None
when not given; the settings (sd_cli.run.settings) fill them in, so "given" is never guessed.
"""

from __future__ import annotations

import argparse

from sd_cli.run.report import one_line
from sd_cli.run.settings import (COMPVIS_STEPS, DEFAULT_CKPT, DEFAULT_EMBEDDINGS, DEFAULT_PROMPT, DEFAULT_SAMPLER,
                                 DEFAULT_STEPS, MAX_DEEPCACHE, MAX_TOME, fast_preset_text)
from sd_cli.version import __version__
from sd_cli.weights.config import DEFAULT_CONFIG
from sd_cli.weights.dtypes import DTYPE_CHOICES


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line (not the whole usage) before exiting 2."""

    last_error: str | None = None  # the usage error just printed (the CLI repeats it in --json)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.last_error = f"{message} (see --help)"
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def _sampler_help() -> tuple[list[str], str]:
    from sd_cli.sampling.samplers import SAMPLERS

    lines = [f"{name} ({info.a1111_name or info.label}, {info.schedule}): {info.description}"
             for name, info in SAMPLERS.items()]
    return list(SAMPLERS), "; ".join(lines)


def _schedulers() -> list[str]:
    from sd_cli.sampling.schedule import SCHEDULERS

    return list(SCHEDULERS)


def sampler_name(text: str) -> str:
    """A sampler by its registry name or A1111's display name ("Euler a", "DPM++ 2M SDE"), any case."""
    from sd_cli.sampling.samplers import SAMPLERS

    if text in SAMPLERS:
        return text
    wanted = text.strip().lower()
    for name, info in SAMPLERS.items():
        if wanted in (name.lower(), info.label.lower(), (info.a1111_name or "").lower()):
            return name
    raise argparse.ArgumentTypeError(f"unknown sampler {text!r}; choose one of: {', '.join(SAMPLERS)}")


IMG2IMG_EPILOG = (
    "examples:\n"
    '  sd-img2img --prompt "A fantasy landscape, trending on artstation" --init-img sketch.jpg --strength 0.8\n'
    '  sd-img2img --prompt "a green circle on a blue background" --init-img red.png --strength 0.6 --sampler euler_a\n'
    '  sd-img2img --init-img photo.jpg --prompt "oil painting" --W 512 --H 512 --resize crop\n\n'
    "The init image keeps its size (rounded down to a multiple of 8) unless --W and --H are given.\n"
    "Exit codes: 0 done, 1 runtime failure, 2 usage error, 130 interrupted (finished images are kept)."
)


def build_parser(command: str = "txt2img") -> argparse.ArgumentParser:
    """The parser of sd-txt2img, or of sd-img2img (`command` "img2img": CompVis' img2img.py flags and
    defaults, plus --init-img, --strength, --encode and --resize)."""
    names, sampler_lines = _sampler_help()
    img2img = command == "img2img"
    p = _Parser(
        prog=f"sd-{command}",
        description=("Turn an image and a text prompt into new images (image to image) with a Stable Diffusion "
                     "v1.x checkpoint, on CPU or CUDA." if img2img else
                     "Turn a text prompt into images with a Stable Diffusion v1.x checkpoint, on CPU or CUDA."),
        epilog=IMG2IMG_EPILOG if img2img else (
            "examples:\n"
            '  sd-txt2img --prompt "An astronaut riding a horse, painted by Pablo Picasso." --plms --n_iter 5 --n_samples 1\n'
            '  sd-txt2img --prompt "a lighthouse at dusk" --config configs/stable-diffusion/v1-inference-cpu.yaml\n'
            "  sd-txt2img --from-file prompts.txt --n_samples 4 --json > run.json\n"
            "  sd-txt2img --from-file prompts.txt --n_samples 4 --resume      # after Ctrl-C or a crash: finish it\n"
            "  sd-txt2img --replay outputs/txt2img-samples/samples/00000.png  # same pixels again?\n\n"
            f"Put a checkpoint (sd-v1-4.ckpt, v1-5-pruned-emaonly.safetensors, ...) at {DEFAULT_CKPT} or pass --ckpt;\n"
            "without either, the built-in demo model (64x64 shapes: 'a red circle on a blue background') runs.\n"
            "Exit codes: 0 done, 1 runtime failure, 2 usage error, 130 interrupted (finished images are kept)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _what_to_draw(p)
    if img2img:
        _image_to_image(p)
    _sampling(p, names, sampler_lines, img2img)
    _faster(p)
    _size_and_count(p, *((2, 1) if img2img else (3, 2)))  # CompVis' defaults of each script
    if not img2img:
        _hires(p)
    _model_and_device(p)
    _output(p, command)
    _check_an_image(p)
    p.set_defaults(command=command)
    return p


def _hires(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hires fix (A1111's)")
    g.add_argument("--hr-scale", "--hr_scale", dest="hr_scale", type=float, default=None, metavar="F",
                   help="render at --W x --H, then again at F times that size (image to image from the first "
                        "pass): more detail than sampling large directly, e.g. 2 for 512 -> 1024")
    g.add_argument("--hr-upscaler", "--hr_upscaler", dest="hr_upscaler", default="latent",
                   choices=("latent", "latent-nearest", "lanczos"),
                   help="how the first pass is enlarged: latent (bilinear, A1111's 'Latent'), latent-nearest, "
                        "or lanczos (decode, resize the pixels, encode) (default: %(default)s)")
    g.add_argument("--hr-steps", "--hr_steps", dest="hr_steps", type=int, default=None,
                   help="sampler steps of the second pass (default: --steps)")
    g.add_argument("--denoising-strength", "--denoising_strength", dest="denoising_strength", type=float,
                   default=None, help="how much the second pass changes, 0..1 (default: 0.7 latent, 0.5 lanczos)")


def _image_to_image(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image to image")
    g.add_argument("--init-img", "--init_img", dest="init_img", metavar="IMAGE", default=None,
                   help="the image to start from (PNG, JPEG, WebP, ...; any mode: transparency over white, 16-bit "
                        "greys scaled; EXIF orientation applied); required, except with --replay")
    g.add_argument("--strength", type=float, default=None,
                   help="how much to change it, 0..1: int(strength x steps) of the sampler's steps are run from "
                        "the matching noise level; 0 returns the image through the VAE, 1 ignores it "
                        "(default: 0.75, as CompVis)")
    g.add_argument("--encode", choices=("mean", "sample"), default="mean",
                   help="the init latent: the VAE posterior's mean (deterministic) or a sample from it, drawn from "
                        "the image's seed (default: %(default)s)")
    g.add_argument("--mask", metavar="IMAGE", default=None,
                   help="inpaint: white repaints, black keeps (resized to the image, with a warning, if another "
                        "size); the kept pixels stay the original's")
    g.add_argument("--mask-blur", "--mask_blur", dest="mask_blur", type=int, default=4,
                   help="blur of the mask's edge in pixels, as A1111 (default: %(default)s)")
    g.add_argument("--inpaint-fill", "--inpaint_fill", dest="inpaint_fill", default="original",
                   choices=("original", "latent noise", "latent nothing"),
                   help="what the repainted area starts from (A1111's 'masked content'; default: %(default)s)")
    g.add_argument("--resize", choices=("crop", "fill", "stretch"), default="crop",
                   help="with --W and --H: fit the image by scaling to cover and cropping the middle (crop), "
                        "scaling to fit on white (fill), or ignoring its aspect ratio (stretch) (default: "
                        "%(default)s)")


def _lora_flag(text: str):
    """argparse type of --lora: PATH[:WEIGHT] (sd_cli.run.loras.parse_lora_flag)."""
    from sd_cli.errors import UsageError
    from sd_cli.run.loras import parse_lora_flag

    try:
        return parse_lora_flag(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _what_to_draw(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to draw")
    g.add_argument("--prompt", default=None, help=f"the prompt to render (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
                   help="what to steer away from; replaces the empty unconditional prompt of guidance")
    g.add_argument("--from-file", "--from_file", dest="from_file", metavar="FILE",
                   help="read prompts from FILE, one per line (UTF-8, BOM and CRLF fine; blank lines and lines "
                        "starting with # are skipped); batches of --n_samples, the last one may be smaller")
    g.add_argument("--laion400m", action="store_true", help="(CompVis) not supported: refused with an error")
    g.add_argument("--params", metavar="IMAGE.png|TEXT", default=None,
                   help="take prompt, negative prompt, steps, sampler, CFG scale, seed, size, clip skip and batch "
                        "size from an A1111 infotext: a PNG (ours or A1111's) or the text itself; flags given on "
                        "the command line win; fields this tool does not use are named in a warning")
    g.add_argument("--strict-params", action="store_true", help="with --params: unused fields are an error")
    g.add_argument("--prompt-syntax", "--prompt_syntax", dest="prompt_syntax", choices=("a1111", "plain"),
                   default="a1111",
                   help="a1111 (default): AUTOMATIC1111's prompt language: (word) x1.1, [word] /1.1, (word:1.3), "
                        "\\( for a literal bracket, BREAK starts a new 75-token chunk, prompts of any length "
                        "(README 'Prompts'); plain: the text as it is, cut at CLIP's 75 tokens")
    g.add_argument("--embeddings", metavar="DIR", default=None,
                   help=f"textual-inversion embeddings (A1111 .pt/.safetensors, diffusers learned_embeds): a file's "
                        f"name without extension is its trigger word in the prompt or negative prompt "
                        f"(default: {DEFAULT_EMBEDDINGS} when it exists)")
    g.add_argument("--lora", action="append", type=_lora_flag, metavar="PATH[:WEIGHT]", default=[],
                   help="merge a LoRA/LyCORIS file (kohya, LyCORIS LoHa/LoKr/LoCon/full, diffusers) into the model "
                        "for every prompt, with WEIGHT (default 1; may be negative); repeat for several. In the "
                        "prompt, <lora:NAME:WEIGHT> (or <lora:NAME:TE:UNET>) uses NAME.safetensors from --lora-dir "
                        "for that prompt only (README 'LoRA and VAE files')")
    g.add_argument("--lora-dir", "--lora_dir", dest="lora_dir", metavar="DIR", default=None,
                   help="where <lora:NAME> finds its files, subfolders included (default: models/Lora when it "
                        "exists)")
    g.add_argument("--clip-skip", "--clip_skip", dest="clip_skip", type=int, default=1,
                   help="A1111's 'Clip skip': use the text encoder's output N layers from its end, through its "
                        "final layer norm; 1 is SD's own (default: %(default)s; 2 for many anime fine-tunes)")


def _sampling(p: argparse.ArgumentParser, names: list[str], sampler_lines: str, img2img: bool = False) -> None:
    g = p.add_argument_group("sampling")
    default = (f"ddim with {COMPVIS_STEPS} steps, as CompVis' img2img.py" if img2img else
               f"{DEFAULT_SAMPLER} with {DEFAULT_STEPS} steps; ddim when only --ddim_steps is given, as CompVis")
    g.add_argument("--sampler", type=sampler_name, default=None, metavar="NAME",
                   help=f"sampling method, by ComfyUI's name or A1111's (default: {default}). Each with its "
                        f"A1111 name and default scheduler: {sampler_lines}")
    g.add_argument("--scheduler", choices=_schedulers(), default=None,
                   help="the sigma list of the k-diffusion samplers (default: each sampler's own, as A1111's "
                        "Automatic, listed under --sampler: karras for dpmpp_2m, exponential for the multistep "
                        "SDE samplers, sgm_uniform for uni_pc, ...; ddim, plms and lcm run on their own grids)")
    g.add_argument("--s-noise", "--s_noise", dest="s_noise", type=float, default=None,
                   help="A1111's 'sigma noise' for the samplers that add noise (default: 1)")
    g.add_argument("--plms", action="store_true", help="alias of --sampler plms")
    g.add_argument("--dpm_solver", "--dpm-solver", action="store_true", help="alias of --sampler dpmpp_2m")
    g.add_argument("--steps", type=int, default=None,
                   help=f"number of sampling steps, for any sampler (default: {DEFAULT_STEPS} for dpmpp_2m and "
                        f"euler_a, {COMPVIS_STEPS} for ddim and plms)")
    g.add_argument("--ddim_steps", type=int, default=None,
                   help=f"(CompVis) number of sampling steps; with no sampler named it means DDIM with that many "
                        f"steps, as in CompVis' script (default: {COMPVIS_STEPS} for ddim/plms)")
    g.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float, default=0.0,
                   help="DDIM eta: 0 deterministic, 1 ancestral-like noise (default: %(default)s)")
    g.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale; 1 turns guidance off (default: "
                        f"{'5, as CompVis img2img.py' if img2img else '7.5'}; 3 with the demo model)")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of the first image (default: %(default)s). As in A1111, image m of the run (all "
                        "batches and iterations, in order) has seed + m and its own noise, so any image can be "
                        "made again alone with --seed S --n_samples 1; its seed is written into its PNG")
    g.add_argument("--subseed", type=int, default=None, metavar="S",
                   help="A1111's variation seed: with --subseed-strength X, each image's start noise is "
                        "slerp(X, noise(its seed), noise(S)), a variation of the same picture")
    g.add_argument("--subseed-strength", "--subseed_strength", dest="subseed_strength", type=float, default=0.0,
                   metavar="X", help="how far toward the variation seed's noise, 0..1 (default: %(default)s)")
    g.add_argument("--fixed_code", "--fixed-code", action="store_true",
                   help="give every batch and iteration the first batch's seeds, so the same start noise")


def _sigma(text: str) -> float:
    """argparse type of --cfg-interval's two values: a number >= 0, or inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a sigma (a number, or inf)") from None
    return value


def _faster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("faster sampling (README 'Faster sampling'; each option is off unless given)")
    g.add_argument("--fast", action="store_true",
                   help=f"the measured preset: {fast_preset_text()}; an option given as well wins over the "
                        "preset's value (e.g. --fast --deepcache 2)")
    g.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help=f"DeepCache: the whole UNet only every N-th call (the first and last always), in between "
                        f"only its shallow ends with the deep up-path features of the last whole call; up to N "
                        f"times fewer UNet FLOPs for a small change in the image, growing with N (1 = off, "
                        f"at most {MAX_DEEPCACHE})")
    g.add_argument("--deepcache-branch", "--deepcache_branch", dest="deepcache_branch", type=int, default=None,
                   metavar="B", help="with --deepcache: how deep the shallow calls go, input block B and its "
                                     "output block (0: the shallowest, fastest; 11: all but the middle block, "
                                     "closest to the full call) (default: 0)")
    g.add_argument("--cfg-interval", "--cfg_interval", dest="cfg_interval", nargs=2, type=_sigma, default=None,
                   metavar=("LO", "HI"),
                   help="guidance only while LO <= sigma <= HI (SD's sigmas run from 14.6 down to 0.03; HI may be "
                        "inf); outside, one conditional UNet call instead of the guided pair: those steps cost "
                        "about half. Guidance matters least at the first steps (the layout barely depends on it "
                        "and it costs variety) and the last (fine detail); e.g. 0.28 5.42, Kynkaanniemi et al.'s "
                        "interval, drops it at 13 of 25 default steps")
    g.add_argument("--tome", type=float, default=None, metavar="RATIO",
                   help=f"token merging (ToMe for SD): merge RATIO of the tokens in the full-resolution "
                        f"self-attentions (seeded, so runs reproduce); faster at 512 px and above, where those "
                        f"attentions dominate, softer detail as RATIO grows (0 = off, at most {MAX_TOME:g})")


def _size_and_count(p: argparse.ArgumentParser, n_samples: int = 3, n_iter: int = 2) -> None:
    g = p.add_argument_group("size and count")
    g.add_argument("--H", type=int, default=None, help="image height in pixels, a multiple of 8 "
                   "(default: 512; 64 with the demo model)")
    g.add_argument("--W", type=int, default=None, help="image width in pixels, a multiple of 8 "
                   "(default: 512; 64 with the demo model)")
    g.add_argument("--C", type=int, default=4, help="latent channels; must be the model's (4) (default: %(default)s)")
    g.add_argument("--f", type=int, default=8, help="downsampling factor; must be the VAE's (8) (default: %(default)s)")
    g.add_argument("--n_samples", "--batch-size", dest="n_samples", type=int, default=n_samples,
                   help="images per batch (default: %(default)s)")
    g.add_argument("--n_iter", type=int, default=n_iter, help="how many times to run each batch (default: %(default)s)")
    g.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: --n_samples)")


def _model_and_device(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument("--config", default=None,
                   help=f"model config YAML; CompVis' original v1-inference.yaml works too (default: {DEFAULT_CONFIG}; "
                        "the demo model's own without weights)")
    g.add_argument("--ckpt", default=None, help=f"checkpoint .ckpt or .safetensors (default: {DEFAULT_CKPT}; when nothing is there, the "
                        "built-in demo model, 64x64 shapes)")
    g.add_argument("--vae", metavar="PATH", default=None,
                   help="use this VAE file instead of the checkpoint's (e.g. vae-ft-mse-840000-ema-pruned; "
                        ".safetensors or .ckpt/.pt, bare or first_stage_model.* keys)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="where to run; overrides the config's runtime.device (auto: CUDA when available)")
    g.add_argument("--precision", choices=("full", "autocast"), default=None,
                   help="(CompVis) full: float32 (= --dtype fp32); autocast: --dtype auto (default: the config's, "
                        "autocast)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="compute dtype; weights are stored in it. auto: bf16 on a CPU whose native bf16 is "
                        "faster than fp32 (AMX, or AVX512-BF16 on a CPU that is not Intel's; detected), else fp32; "
                        "on CUDA bf16 where the GPU has it, else fp16 "
                        "(default: from --precision / the config). A half-precision VAE decode that gives "
                        "NaN/inf is redone in fp32")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: the physical cores this process may use)")
    g.add_argument("--vae-tiling", "--vae_tiling", dest="vae_tiling", nargs="?", const="on", default=None,
                   choices=("auto", "on", "tiles", "off"),
                   help="decode large images in pieces to bound memory. on: row bands with whole-image "
                        "statistics (exact: the same picture); tiles: overlapping 512 px tiles, cross-faded "
                        "(least memory; colours may shift slightly between tiles); auto: on for images larger "
                        "than 512x512 (default: auto; the bare flag means on)")


def _output(p: argparse.ArgumentParser, command: str = "txt2img") -> None:
    g = p.add_argument_group("output")
    g.add_argument("--outdir", default=f"outputs/{command}-samples", help="output folder (default: %(default)s)")
    g.add_argument("--skip_grid", action="store_true", help="don't write the grid image")
    g.add_argument("--skip_save", action="store_true", help="don't write the individual images")
    g.add_argument("--resume", action="store_true",
                   help="continue a killed run: run the same command again with --resume and every image whose "
                        "file already exists in OUTDIR/samples (same prompt, seed, batch position and settings, "
                        "matched by the sd_cli metadata in the PNG) is skipped; only missing ones are made, so "
                        "the folder ends as one uninterrupted run would have left it")
    g.add_argument("--no-watermark", dest="no_watermark", action="store_true",
                   help='don\'t embed the invisible "StableDiffusionV1" watermark')
    g.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout listing every file written with its seed and parameters")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info lines, errors only")
    g.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    g.add_argument("--version", action="version", version=f"sd-{command} {__version__}")


def _check_an_image(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("check an image")
    g.add_argument("--replay", metavar="IMAGE.png",
                   help="regenerate IMAGE.png from its sd_cli metadata with --ckpt and compare the pixels: prints "
                        "'identical' (exit 0) or the mean and max pixel difference (exit 1). Prompt, seed, sampler, "
                        "size etc. come from the image (giving them is an error); --ckpt, --config, --device, "
                        "--precision/--dtype apply (threads and VAE tiling: as recorded, unless given). The model "
                        "hash must match (see --force). Writes no file unless --outdir is given, then the "
                        "regenerated image goes to OUTDIR/samples")
    g.add_argument("--force", action="store_true",
                   help="with --replay: go on when --ckpt's model hash differs from the one in the image")
