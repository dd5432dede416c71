"""`sd-txt2img`: the command line. Parses and checks arguments, then runs the pipeline in numbered steps.

Every flag of CompVis' scripts/txt2img.py works with its meaning and default; the known bugs of that
script are fixed (partial last batch of --from-file, file names that never overwrite, no CUDA needed).
Errors the user can act on print one line on stderr and exit 2 (usage) or 1 (runtime); --debug adds
the traceback. Ctrl-C keeps every finished image and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from sd_cli.version import __version__
from sd_cli.errors import CheckpointError, SdCliError, UsageError
from sd_cli.run.prompts import read_prompt_file  # noqa: F401  (--from-file; also imported from here by callers)

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
EXIT_INTERRUPTED = 130
# With no sampler and no step count given: DPM-Solver++(2M) Karras, 25 steps. Evidence (README, Samplers;
# tests/test_default_sampler.py): on the analytic guided case at scale 7.5 it is 3x closer to the exact
# endpoint than CompVis' PLMS at 50 steps and 5x closer than DDIM 50; at 20 steps it still beats both at
# 7.5 but breaks down at scale 12, where 25 steps stays stable.
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 25
COMPVIS_STEPS = 50  # CompVis' --ddim_steps default: ddim and plms without a step count
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")  # sd_cli.precision.DTYPE_CHOICES (kept light: no torch here)

log = logging.getLogger("sd_cli")


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line (not the whole usage) before exiting 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(text: str) -> str:
    """`text` with line breaks, other control characters and undecodable bytes escaped (\\n, \\udcff):
    an error message stays one line whatever the user typed or a file name holds."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _sampler_help() -> tuple[list[str], str]:
    from sd_cli.sampling.samplers import SAMPLERS

    lines = [f"{name}: {info.description}" for name, info in SAMPLERS.items()]
    return list(SAMPLERS), "; ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    names, sampler_lines = _sampler_help()
    p = _Parser(
        prog="sd-txt2img",
        description="Turn a text prompt into images with a Stable Diffusion v1.x checkpoint, on CPU or CUDA.",
        epilog=(
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
    g = p.add_argument_group("what to draw")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt to render (default: %(default)r)")
    g.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
                   help="what to steer away from; replaces the empty unconditional prompt of guidance")
    g.add_argument("--from-file", "--from_file", dest="from_file", metavar="FILE",
                   help="read prompts from FILE, one per line (UTF-8, BOM and CRLF fine; blank lines and lines "
                        "starting with # are skipped); batches of --n_samples, the last one may be smaller")
    g.add_argument("--laion400m", action="store_true", help="(CompVis) not supported: refused with an error")

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=names, default=None,
                   help=f"sampling method (default: {DEFAULT_SAMPLER} with {DEFAULT_STEPS} steps; ddim when only "
                        f"--ddim_steps is given, as CompVis). {sampler_lines}")
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
    g.add_argument("--scale", type=float, default=7.5,
                   help="classifier-free guidance scale; 1 turns guidance off (default: %(default)s; 3 with the demo model)")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of the start noise (default: %(default)s). Batch k of a run (k = iteration x "
                        "batches per iteration + batch number) uses seed + k, so with one --prompt iteration n "
                        "uses seed + n; every image's seed is written into its PNG")
    g.add_argument("--fixed_code", "--fixed-code", action="store_true",
                   help="reuse the first batch's start noise for every batch and iteration")

    g = p.add_argument_group("size and count")
    g.add_argument("--H", type=int, default=512, help="image height in pixels, a multiple of 8 "
                   "(default: %(default)s; 64 with the demo model)")
    g.add_argument("--W", type=int, default=512, help="image width in pixels, a multiple of 8 "
                   "(default: %(default)s; 64 with the demo model)")
    g.add_argument("--C", type=int, default=4, help="latent channels; must be the model's (4) (default: %(default)s)")
    g.add_argument("--f", type=int, default=8, help="downsampling factor; must be the VAE's (8) (default: %(default)s)")
    g.add_argument("--n_samples", "--batch-size", dest="n_samples", type=int, default=3,
                   help="images per batch (default: %(default)s)")
    g.add_argument("--n_iter", type=int, default=2, help="how many times to run each batch (default: %(default)s)")
    g.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: --n_samples)")

    g = p.add_argument_group("model and device")
    g.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml",
                   help="model config YAML; CompVis' original v1-inference.yaml works too (default: %(default)s)")
    g.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint .ckpt or .safetensors (default: %(default)s; when nothing is there, the "
                        "built-in demo model, 64x64 shapes)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="where to run; overrides the config's runtime.device (auto: CUDA when available)")
    g.add_argument("--precision", choices=("full", "autocast"), default=None,
                   help="(CompVis) full: float32 (= --dtype fp32); autocast: --dtype auto (default: the config's, "
                        "autocast)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="compute dtype; weights are stored in it. auto: bf16 on a CPU with native bf16 "
                        "(AVX512-BF16 or AMX, detected), else fp32; on CUDA bf16 where the GPU has it, else fp16 "
                        "(default: from --precision / the config). A half-precision VAE decode that gives "
                        "NaN/inf is redone in fp32")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: the physical cores this process may use)")
    g.add_argument("--vae-tiling", "--vae_tiling", dest="vae_tiling", nargs="?", const="on", default="auto",
                   choices=("auto", "on", "tiles", "off"),
                   help="decode large images in pieces to bound memory. on: row bands with whole-image "
                        "statistics (exact: the same picture); tiles: overlapping 512 px tiles, cross-faded "
                        "(least memory; colours may shift slightly between tiles); auto: on for images larger "
                        "than 512x512 (default: %(default)s; the bare flag means on)")

    g = p.add_argument_group("output")
    g.add_argument("--outdir", default="outputs/txt2img-samples", help="output folder (default: %(default)s)")
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
    g.add_argument("--version", action="version", version=f"sd-txt2img {__version__}")

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
    return p


# ----------------------------------------------------------------------------------------------------
# Argument checks (all before any model is loaded, so bad input costs nothing and touches nothing).


def resolve_sampler(args: argparse.Namespace) -> str:
    return resolve_sampling(args)[0]


def resolve_sampling(args: argparse.Namespace) -> tuple[str, int]:
    """(sampler, steps) from --sampler/--plms/--dpm_solver and --steps/--ddim_steps.

    Nothing given: DEFAULT_SAMPLER with DEFAULT_STEPS. Only --ddim_steps N: DDIM with N steps (CompVis'
    meaning); only --steps N: DEFAULT_SAMPLER with N. A named sampler without a step count runs
    COMPVIS_STEPS (ddim, plms: as CompVis) or DEFAULT_STEPS (dpmpp_2m, euler_a).
    """
    chosen = [n for n, flag in (("plms", args.plms), ("dpmpp_2m", args.dpm_solver)) if flag]
    if args.sampler:
        chosen.append(args.sampler)
    if len(set(chosen)) > 1:
        raise UsageError(f"conflicting samplers: {', '.join(sorted(set(chosen)))}; pick one")
    steps, ddim_steps = getattr(args, "steps", None), args.ddim_steps
    if steps is not None and ddim_steps is not None and steps != ddim_steps:
        raise UsageError(f"--steps {steps} and --ddim_steps {ddim_steps} disagree; give one")
    given = steps if steps is not None else ddim_steps
    if chosen:
        sampler = chosen[0]
    elif steps is None and ddim_steps is not None:
        sampler = "ddim"  # CompVis: --ddim_steps alone is DDIM
    else:
        sampler = DEFAULT_SAMPLER
    if given is None:
        given = COMPVIS_STEPS if sampler in ("ddim", "plms") else DEFAULT_STEPS
    return sampler, given


def _encodable(text: str) -> bool:
    """False for lone surrogates (bytes the terminal could not decode): they cannot go into a PNG."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_args(args: argparse.Namespace) -> None:
    if args.laion400m:
        raise UsageError("--laion400m is not supported: sd-txt2img runs Stable Diffusion v1.x checkpoints only")
    for name in ("H", "W"):
        value = getattr(args, name)
        if value < 8 or value % 8:
            raise UsageError(f"--{name} {value}: must be a positive multiple of 8")
    if args.H * args.W > 4096 * 4096:
        raise UsageError(f"--H {args.H} --W {args.W}: larger than 4096x4096 is not supported")
    for flag, value in (("--steps", getattr(args, "steps", None)), ("--ddim_steps", args.ddim_steps)):
        if value is not None and not 1 <= value <= 1000:
            raise UsageError(f"{flag} {value}: must be between 1 and 1000")
    threads = getattr(args, "threads", None)
    if threads is not None and not 1 <= threads <= 1024:
        raise UsageError(f"--threads {threads}: must be between 1 and 1024")
    for name in ("n_samples", "n_iter"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.n_rows < 0:
        raise UsageError(f"--n_rows {args.n_rows}: must be 0 (same as --n_samples) or more")
    if args.seed < 0 or args.seed >= 2**63:
        raise UsageError(f"--seed {args.seed}: must be between 0 and 2**63-1")
    if args.skip_save and args.skip_grid:
        raise UsageError("--skip_save with --skip_grid would write nothing")
    if not math.isfinite(args.scale):
        raise UsageError(f"--scale {args.scale}: must be a finite number")
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        if "\0" in text or not _encodable(text):
            raise UsageError(f"{flag}: not valid text (a NUL or undecodable bytes from the terminal?)")
    if args.resume and args.skip_save:
        raise UsageError("--resume finds finished images in OUTDIR/samples; it cannot be combined with --skip_save")


# ----------------------------------------------------------------------------------------------------
# The run.


@dataclass
class RunState:
    """What has been written so far; printed as the summary even after Ctrl-C."""

    images: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # --resume: images found already done
    grid: str | None = None
    grid_kept: bool = False  # --resume: an equal grid already existed
    rank: int = 0  # under torchrun: only rank 0 prints the summary and --json
    steps: int = 0
    sampling_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def pick_device(requested: str):
    import torch

    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SdCliError("--device cuda: no CUDA device is available to this torch build; use --device cpu")
        return torch.device("cuda")
    if requested == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(precision: str, device, dtype_arg: str | None = None):
    """The compute dtype for --precision/config precision and --dtype on `device` (sd_cli.precision)."""
    return pick_dtype_choice(dtype_arg, None, precision, device).dtype


def pick_dtype_choice(dtype_arg: str | None, precision_arg: str | None, config_precision: str, device):
    from sd_cli.weights.precision import choose_dtype, requested_mode

    return choose_dtype(requested_mode(dtype_arg, precision_arg, config_precision), device)


DEMO_DIR = Path(__file__).resolve().parent / "demo"


def use_demo_model(args: argparse.Namespace, argv: list[str] | None) -> bool:
    """No --ckpt given and nothing at DEFAULT_CKPT: switch to the built-in demo model (sd_cli/demo), with its
    config, native size and guidance scale unless --config/--H/--W/--scale are given. False (and args
    untouched) otherwise."""
    from sd_cli.run.replay import given_options

    given = given_options(argv)
    ckpt, config = DEMO_DIR / "demo.safetensors", DEMO_DIR / "demo.yaml"
    if "ckpt" in given or Path(DEFAULT_CKPT).exists() or not (ckpt.is_file() and config.is_file()):
        return False
    from sd_cli.demo.scenes import GUIDANCE, SIZE

    args.ckpt = str(ckpt)
    if "config" not in given:
        args.config = str(config)
    if "H" not in given:
        args.H = SIZE
    if "W" not in given:
        args.W = SIZE
    if "scale" not in given:
        args.scale = GUIDANCE
    return True


def missing_checkpoint_message(path: str) -> str:
    return (
        f"no checkpoint at {path}: download a Stable Diffusion v1.x checkpoint (sd-v1-4.ckpt or "
        f"v1-5-pruned-emaonly.safetensors, from the model's page on Hugging Face after accepting its licence) "
        f"and put it at {DEFAULT_CKPT}, or pass --ckpt PATH"
    )


def a1111_text(meta: dict, schedule: str) -> str:
    """The AUTOMATIC1111 `parameters` text of one image: its prompt, then A1111's own labels only."""
    from sd_cli.output.a1111 import a1111_parameters

    bs = meta.get("batch_size", 1)
    return a1111_parameters({
        **{k: meta[k] for k in ("prompt", "negative_prompt", "steps", "sampler_label", "scale", "seed",
                                "width", "height", "model_hash", "model_name")},
        "Schedule type": "Karras" if schedule == "karras" else None,
        "Eta DDIM": meta["eta"] if meta["sampler"] == "ddim" and meta["eta"] else None,
        "Batch size": bs if bs > 1 else None,
        "Batch pos": meta.get("batch_index") if bs > 1 else None,
        "Version": f"sd_cli {__version__}",
    })


def resolve_runtime(args: argparse.Namespace):
    """(config, device, dtype) from --config, --C/--f, --device, --precision (also used by --replay)."""
    from sd_cli.weights.config import load_config

    cfg = load_config(args.config)
    if args.C != cfg.model.latent_channels:
        raise UsageError(f"--C {args.C}: this model has {cfg.model.latent_channels} latent channels")
    if args.f != cfg.model.downscale:
        raise UsageError(f"--f {args.f}: this model's VAE downsamples by {cfg.model.downscale}")
    device = pick_device(args.device or cfg.runtime.device)
    choice = pick_dtype_choice(getattr(args, "dtype", None), args.precision, cfg.runtime.precision, device)
    args.dtype_reason = choice.reason  # for the "loading ..." line
    return cfg, device, choice.dtype


def run(args: argparse.Namespace, state: RunState) -> None:
    from sd_cli.output.png import ensure_writable_dir

    info = lambda msg: None if args.quiet else print(msg, file=sys.stderr)  # noqa: E731
    warn = lambda msg: print(f"warning: {msg}", file=sys.stderr)  # noqa: E731

    # 1. Arguments, prompts and output folder: all checked before anything heavy.
    check_args(args)
    sampler, args.ddim_steps = resolve_sampling(args)  # from here on, ddim_steps = the steps of any sampler
    from sd_cli.sampling.samplers import get_sampler

    sampler_info = get_sampler(sampler)
    if sampler == "plms" and args.ddim_eta != 0:
        raise UsageError("--plms needs --ddim_eta 0 (PLMS is deterministic)")
    try:
        eta = sampler_info.resolve_eta(args.ddim_eta)  # e.g. Euler a's standard eta is 1
    except UsageError as err:
        raise UsageError(f"--ddim_eta {args.ddim_eta}: {err}") from None
    prompts = read_prompt_file(args.from_file) if args.from_file else [args.prompt]
    batches = [prompts[i : i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]
    if not args.from_file:
        batches = [[args.prompt] * args.n_samples]
    outdir = Path(args.outdir)
    sample_dir = outdir / "samples"
    ensure_writable_dir(outdir)
    if not args.skip_save:
        ensure_writable_dir(sample_dir)

    # 2. Config, device and precision.
    cfg, device, dtype = resolve_runtime(args)

    # 3. Checkpoint: exists, loads safely, is SD v1.x, fits the config.
    ckpt = Path(args.ckpt).expanduser()
    if not ckpt.exists():
        raise CheckpointError(missing_checkpoint_message(args.ckpt))
    from sd_cli.run.distributed import from_env

    ddp = from_env()  # under torchrun: this process's rank; None when run as one process
    if ddp is not None:
        device = ddp.start(device)  # rendezvous; cuda:LOCAL_RANK on CUDA
        state.rank = ddp.rank
        if not ddp.is_main:  # rank 0 speaks for the job; the others only warn, naming their rank
            info = lambda msg: None  # noqa: E731
            warn = lambda msg: print(f"warning: [rank {ddp.rank}] {msg}", file=sys.stderr)  # noqa: E731
    from sd_cli.weights.checkpoint import short_hash
    from sd_cli.weights.loading import load_model

    from sd_cli.weights.precision import default_threads, set_threads

    if device.type == "cpu":  # torchrun: by default the host's cores are shared among its ranks
        threads = set_threads(args.threads or (ddp.threads(default_threads()) if ddp else None))
    else:
        threads = None
    model_hash = short_hash(ckpt)  # (cached per file; part of every image's metadata)
    from sd_cli.pipeline.generate import Pipeline, initial_noise

    pipe: Pipeline | None = None

    def get_pipe() -> Pipeline:
        """The model, loaded on first use: a --resume run whose images all exist never loads it."""
        nonlocal pipe
        if pipe is None:
            t0 = time.perf_counter()
            on = f"{device}, {threads} threads" if threads else str(device)
            info(f"loading {ckpt} ({str(dtype).replace('torch.', '')}, {args.dtype_reason}; on {on}) ...")
            model = load_model(cfg.model, ckpt, device=device, dtype=dtype)
            info(f"model loaded in {time.perf_counter() - t0:.1f} s (hash {model_hash})")
            pipe = Pipeline(model, device, on_warning=warn, vae_tiling=args.vae_tiling)
        return pipe

    if not (args.resume and ddp is None):  # (under torchrun every rank loads before the collectives)
        get_pipe()

    # 4. Generate batch by batch, writing each image as soon as it exists.
    import torch
    from tqdm import tqdm

    from sd_cli.output.pixels import make_grid
    from sd_cli.output.png import GRID_PATTERN, SAMPLE_PATTERN, next_free_index, save_png
    from sd_cli.output.watermark import WATERMARK_MIN_PIXELS, WatermarkSkipped, apply_watermark
    from sd_cli.pipeline.vae_tiling import decode_method

    height, width = args.H, args.W
    base = {
        "negative_prompt": args.negative_prompt,
        "steps": args.ddim_steps,
        "sampler": sampler,
        "sampler_label": sampler_info.label,
        "scale": args.scale,
        "eta": eta,
        "width": width,
        "height": height,
        "model_hash": model_hash,
        "model_name": ckpt.stem,
        "dtype": str(dtype).replace("torch.", ""),
        "vae_decode": decode_method(args.vae_tiling, height, width),  # whole | bands | tiles
        "device": device.type,
        "threads": threads,  # CPU results depend on it (in the last bit); --replay uses the same number
        "fixed_code": args.fixed_code,
        "sd_cli_version": __version__,
    }
    watermark_warned = False
    # Recorded per image (replay needs it): the watermark goes on unless disabled or the image is too small.
    watermark = not args.no_watermark and height * width >= WATERMARK_MIN_PIXELS
    from sd_cli.run.resume import ResumePlan, deferred_interrupt, find_equal_grid, read_pixels

    if args.resume:  # --resume: what is done already (under torchrun rank 0 looks, see sd_cli/distributed.py)
        plan = ResumePlan.scan(sample_dir, warn=warn) if ddp is None or ddp.is_main else ResumePlan(sample_dir, warn)
    else:
        plan = None
    all_images = []
    # Work item j = one batch, in the order one process runs them: iteration n, batch b, j = n * len(batches) + b.
    items = [(n, b, batch_prompts) for n in range(args.n_iter) for b, batch_prompts in enumerate(batches)]

    def metas_of(j: int) -> tuple[int, list[dict]]:
        """(seed, metadata of each image) of work item j: batch k = j uses seed + k (seed with --fixed_code)."""
        n, b, batch_prompts = items[j]
        seed = args.seed + (0 if args.fixed_code else j)
        return seed, [{**base, "prompt": prompt, "seed": seed, "batch_size": len(batch_prompts), "batch_index": i,
                       "n_samples": args.n_samples, "iteration": n, "watermark": watermark}
                      for i, prompt in enumerate(batch_prompts)]

    def run_item(j: int, slot=None) -> None:
        """Make work item j's images; under torchrun `slot` says which exist and each new file's number."""
        nonlocal watermark_warned
        batch_prompts = items[j][2]
        seed, metas = metas_of(j)
        if slot is not None:
            done = [Path(p) if p else None for p in slot.done]
        else:
            done = plan.take_batch(metas) if plan else [None] * len(metas)
        if all(done):  # --resume: every image of this batch exists; its pixels still go into the grid
            if ddp is None:  # (under torchrun rank 0 lists and reads them at the end)
                state.skipped.extend({"path": str(path), **meta} for path, meta in zip(done, metas))
                if not args.skip_grid:
                    all_images.extend(read_pixels(path) for path in done)
            return
        # The batch's generator draws the full-size start noise first (a smaller last batch takes its
        # first rows), then keeps going for any noise the sampler adds (eta > 0, ancestral).
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = initial_noise(generator, args.n_samples, args.C, height, width, args.f)[: len(batch_prompts)]
        step_bar = tqdm(total=args.ddim_steps, desc=f"sampling {sampler}", unit="step", leave=False,
                        disable=quiet_bars, file=sys.stderr, position=1)
        t1 = time.perf_counter()
        images = get_pipe().generate(
            batch_prompts,
            noise,
            negative_prompt=args.negative_prompt,
            sampler=sampler,
            steps=args.ddim_steps,
            scale=args.scale,
            eta=eta,
            generator=generator,
            callback=lambda i, tot, x: (setattr(step_bar, "total", tot), step_bar.update(1)),
        )
        # DDIM/PLMS may run one step more than asked (CompVis' grid: range(0, 1000, 1000 // N) + 1).
        state.steps += step_bar.n
        step_bar.close()
        state.sampling_seconds += time.perf_counter() - t1
        for i, img in enumerate(images):
            meta = metas[i]
            if not args.no_watermark:
                try:
                    img = apply_watermark(img)
                except WatermarkSkipped as skipped:
                    if not watermark_warned:
                        warn(str(skipped))
                        watermark_warned = True
            if done[i] is not None:  # --resume, batch partly done: keep the existing file as it is
                if ddp is None:
                    kept = read_pixels(done[i])
                    plan.check_same(done[i], img, kept)
                    state.skipped.append({"path": str(done[i]), **meta})
                    all_images.append(kept)
                elif done[i].is_file():  # torchrun: rank 0 lists it; compare where the file can be seen
                    plan.check_same(done[i], img, read_pixels(done[i]))
                continue
            if ddp is None:
                all_images.append(img)
            elif not args.skip_grid:
                share.pixels[(j, i)] = img
            if not args.skip_save:
                number = slot.numbers[i] if slot is not None else 0
                with deferred_interrupt():  # Ctrl-C waits until the file is saved and recorded
                    path = save_png(sample_dir, SAMPLE_PATTERN, img, parameters=a1111_text(meta, sampler_info.schedule),
                                    metadata=meta, start_index=number, exact=slot is not None)
                    state.images.append({"path": str(path), **meta})
                    if ddp is not None:
                        share.images.append((j, i, state.images[-1]))

    quiet_bars = args.quiet or (ddp is not None and not ddp.is_main)  # torchrun: rank 0 shows its share
    if ddp is None:
        bar = tqdm(total=len(items), desc="batches", unit="batch", disable=quiet_bars, file=sys.stderr, position=0)
        for j in range(len(items)):
            run_item(j)
            bar.update(1)
    else:
        from sd_cli.run.distributed import Share, grid_pixels, merge

        share = Share(ddp.rank)
        item_metas = [metas_of(j)[1] for j in range(len(items))]
        free = None if args.skip_save else (lambda: next_free_index(sample_dir, SAMPLE_PATTERN))
        slots = ddp.plan_files(item_metas, plan, free)
        bar = tqdm(total=len(ddp.share(len(items))), desc=f"batches (rank 0 of {ddp.world_size})", unit="batch",
                   disable=quiet_bars, file=sys.stderr, position=0)
        ddp.run_share(len(items), lambda j: run_item(j, slots[j]), lambda: bar.update(1))
        bar.close()
        share.steps, share.seconds = state.steps, state.sampling_seconds
        shares = ddp.finish(share)
        if shares is not None and slots is not None:  # rank 0: the whole job's files, in one-process order
            state.images, state.skipped = merge(shares, item_metas, slots)
            state.steps = sum(s.steps for s in shares)
            state.sampling_seconds = sum(s.seconds for s in shares)
        ddp.raise_failure(shares)
        if not ddp.is_main:
            return
        if not args.skip_grid:
            all_images = grid_pixels(shares, slots, read_pixels)

    # 5. The grid of every image of the run (as CompVis: n_rows images per row).
    if not args.skip_grid:
        import numpy as np

        grid = make_grid(np.stack(all_images), args.n_rows or args.n_samples)
        grid_marked = False
        if not args.no_watermark:
            try:
                grid = apply_watermark(grid)
                grid_marked = True
            except WatermarkSkipped:
                pass  # already said for the single images
        meta = {**base, "prompt": prompts[0] if len(prompts) == 1 else prompts, "seed": args.seed,
                "n_iter": args.n_iter, "n_samples": args.n_samples, "grid": True, "watermark": grid_marked}
        gparams = a1111_text({**meta, "prompt": prompts[0]}, sampler_info.schedule)
        existing = find_equal_grid(outdir, meta, grid) if plan else None
        if existing is not None:  # --resume of a finished run: that grid is already there
            state.grid, state.grid_kept = str(existing), True
        else:
            with deferred_interrupt():
                state.grid = str(save_png(outdir, GRID_PATTERN, grid, parameters=gparams, metadata=meta))


def summary(state: RunState, args: argparse.Namespace, interrupted: bool = False) -> None:
    elapsed = time.perf_counter() - state.started
    per_step = state.sampling_seconds / state.steps if state.steps else 0.0
    n = len(state.images)
    what = f"{n} image{'s' if n != 1 else ''}" + (" + grid" if state.grid and not state.grid_kept else "")
    head = "interrupted: kept" if interrupted else "wrote"
    if state.skipped or state.grid_kept:
        what += f" ({len(state.skipped)} already there{', grid too' if state.grid_kept else ''}: --resume)"
    tail = "; to finish, run the same command again with --resume" if interrupted else ""
    if state.rank and not interrupted:
        return  # torchrun: rank 0 reports the whole job
    rank = f"[rank {state.rank}] " if state.rank else ""
    if not args.quiet or interrupted:
        print(f"{rank}{head} {what} in {one_line(args.outdir)} ({elapsed:.1f} s, {per_step:.2f} s/step){tail}",
              file=sys.stderr)
    if args.json and not state.rank:
        out = {
            "ok": not interrupted,
            "interrupted": interrupted,
            "outdir": args.outdir,
            "images": state.images,
            "skipped": state.skipped,
            "grid": state.grid,
            "seconds": round(elapsed, 3),
            "seconds_per_step": round(per_step, 4),
        }
        print_json(out)


def print_json(obj: dict) -> None:
    """One JSON line on stdout; non-ASCII kept where stdout can take it, escaped where it cannot."""
    try:
        print(json.dumps(obj, ensure_ascii=False))
    except UnicodeEncodeError:  # e.g. an ASCII-only stdout, or undecodable bytes in a path
        print(json.dumps(obj, ensure_ascii=True))
    sys.stdout.flush()


def fail(args: argparse.Namespace, state: RunState, message: str, code: int) -> int:
    """One line on stderr; with --json also the JSON report (with whatever was written before)."""
    rank = f"[rank {state.rank}] " if state.rank else ""  # torchrun: every rank's own error, rank 0's JSON
    print(f"sd-txt2img: error: {rank}{one_line(message)}", file=sys.stderr)
    if args.json and not state.rank:
        print_json({"ok": False, "error": message, "images": state.images, "grid": state.grid})
    return code


@contextlib.contextmanager
def _sigint_ignored():
    """Ctrl-C is ignored inside (the summary after a first Ctrl-C must not be cut short)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:  # under torchrun: leave the process group (sd_cli/distributed.py)
        from sd_cli.run.distributed import close

        close()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed by argparse
        return int(done.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.ERROR if args.quiet else logging.WARNING),
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    state = RunState()
    try:
        if use_demo_model(args, argv):  # said even with -q: the pictures are not from SD weights
            print(f"note: using the built-in demo model (64x64 shapes, guidance {args.scale:g}); put real SD v1 weights at "
                  f"{DEFAULT_CKPT} or pass --ckpt", file=sys.stderr)
        if args.replay:  # check an image instead of making new ones (sd_cli/replay.py)
            from sd_cli.run.replay import replay

            return replay(args, argv, state)
        run(args, state)
    except KeyboardInterrupt:
        with _sigint_ignored():
            summary(state, args, interrupted=True)
        return EXIT_INTERRUPTED
    except SdCliError as err:
        if args.debug:
            traceback.print_exc()
        message = str(err)
        if state.images and not args.replay:
            message += (f" ({len(state.images)} image(s) written before it are kept; to finish, run the same "
                        "command again with --resume)")
        return fail(args, state, message, err.exit_code)
    except Exception as err:  # not one of ours: out of memory, a driver error, or a bug
        if args.debug:
            traceback.print_exc()
        if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
            return fail(args, state, "out of memory; try a smaller --H/--W or --n_samples", 1)
        first = (str(err).strip().splitlines() or [""])[0]
        return fail(args, state, f"unexpected {type(err).__name__}: {first} (run again with --debug for the traceback)", 1)
    summary(state, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
