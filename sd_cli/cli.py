"""`sd-txt2img`: the command line. Parses and checks arguments, then runs the pipeline in numbered steps.

Every flag of CompVis' scripts/txt2img.py works with its meaning and default; the known bugs of that
script are fixed (partial last batch of --from-file, file names that never overwrite, no CUDA needed).
Errors the user can act on print one line on stderr and exit 2 (usage) or 1 (runtime); --debug adds
the traceback. Ctrl-C keeps every finished image and exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import CheckpointError, PromptFileError, SdCliError, UsageError

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
EXIT_INTERRUPTED = 130

log = logging.getLogger("sd_cli")


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line (not the whole usage) before exiting 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _sampler_help() -> tuple[list[str], str]:
    from .samplers import SAMPLERS

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
            "  sd-txt2img --from-file prompts.txt --n_samples 4 --json > run.json\n\n"
            f"Put a checkpoint (sd-v1-4.ckpt, v1-5-pruned-emaonly.safetensors, ...) at {DEFAULT_CKPT} or pass --ckpt.\n"
            "Exit codes: 0 done, 1 runtime failure, 2 usage error, 130 interrupted (finished images are kept)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to draw")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt to render (default: %(default)r)")
    g.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
                   help="what to steer away from; replaces the empty unconditional prompt of guidance")
    g.add_argument("--from-file", "--from_file", dest="from_file", metavar="FILE",
                   help="read prompts from FILE, one per line (blank lines and lines starting with # are skipped); "
                        "batches of --n_samples, the last one may be smaller")
    g.add_argument("--laion400m", action="store_true", help="(CompVis) not supported: refused with an error")

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=names, default=None,
                   help=f"sampling method (default: ddim, as CompVis). {sampler_lines}")
    g.add_argument("--plms", action="store_true", help="alias of --sampler plms")
    g.add_argument("--dpm_solver", "--dpm-solver", action="store_true", help="alias of --sampler dpmpp_2m")
    g.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50,
                   help="number of sampling steps, for every sampler (default: %(default)s)")
    g.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float, default=0.0,
                   help="DDIM eta: 0 deterministic, 1 ancestral-like noise (default: %(default)s)")
    g.add_argument("--scale", type=float, default=7.5,
                   help="classifier-free guidance scale; 1 turns guidance off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of the start noise (default: %(default)s). Batch k of a run (k = iteration x "
                        "batches per iteration + batch number) uses seed + k, so with one --prompt iteration n "
                        "uses seed + n; every image's seed is written into its PNG")
    g.add_argument("--fixed_code", "--fixed-code", action="store_true",
                   help="reuse the first batch's start noise for every batch and iteration")

    g = p.add_argument_group("size and count")
    g.add_argument("--H", type=int, default=512, help="image height in pixels, a multiple of 8 (default: %(default)s)")
    g.add_argument("--W", type=int, default=512, help="image width in pixels, a multiple of 8 (default: %(default)s)")
    g.add_argument("--C", type=int, default=4, help="latent channels; must be the model's (4) (default: %(default)s)")
    g.add_argument("--f", type=int, default=8, help="downsampling factor; must be the VAE's (8) (default: %(default)s)")
    g.add_argument("--n_samples", "--batch-size", dest="n_samples", type=int, default=3,
                   help="images per batch (default: %(default)s)")
    g.add_argument("--n_iter", type=int, default=2, help="how many times to run each batch (default: %(default)s)")
    g.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: --n_samples)")

    g = p.add_argument_group("model and device")
    g.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml",
                   help="model config YAML; CompVis' original v1-inference.yaml works too (default: %(default)s)")
    g.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint .ckpt or .safetensors (default: %(default)s)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="where to run; overrides the config's runtime.device (auto: CUDA when available)")
    g.add_argument("--precision", choices=("full", "autocast"), default=None,
                   help="full: float32; autocast: float16 on CUDA, float32 on CPU (default: the config's, autocast)")

    g = p.add_argument_group("output")
    g.add_argument("--outdir", default="outputs/txt2img-samples", help="output folder (default: %(default)s)")
    g.add_argument("--skip_grid", action="store_true", help="don't write the grid image")
    g.add_argument("--skip_save", action="store_true", help="don't write the individual images")
    g.add_argument("--no-watermark", dest="no_watermark", action="store_true",
                   help='don\'t embed the invisible "StableDiffusionV1" watermark')
    g.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout listing every file written with its seed and parameters")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info lines, errors only")
    g.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    g.add_argument("--version", action="version", version=f"sd-txt2img {__version__}")
    return p


# ----------------------------------------------------------------------------------------------------
# Argument checks (all before any model is loaded, so bad input costs nothing and touches nothing).


def resolve_sampler(args: argparse.Namespace) -> str:
    chosen = [n for n, flag in (("plms", args.plms), ("dpmpp_2m", args.dpm_solver)) if flag]
    if args.sampler:
        chosen.append(args.sampler)
    if len(set(chosen)) > 1:
        raise UsageError(f"conflicting samplers: {', '.join(sorted(set(chosen)))}; pick one")
    return chosen[0] if chosen else "ddim"


def check_args(args: argparse.Namespace) -> None:
    if args.laion400m:
        raise UsageError("--laion400m is not supported: sd-txt2img runs Stable Diffusion v1.x checkpoints only")
    for name in ("H", "W"):
        value = getattr(args, name)
        if value < 8 or value % 8:
            raise UsageError(f"--{name} {value}: must be a positive multiple of 8")
    if args.H * args.W > 4096 * 4096:
        raise UsageError(f"--H {args.H} --W {args.W}: larger than 4096x4096 is not supported")
    if args.ddim_steps < 1 or args.ddim_steps > 1000:
        raise UsageError(f"--ddim_steps {args.ddim_steps}: must be between 1 and 1000")
    for name in ("n_samples", "n_iter"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.n_rows < 0:
        raise UsageError(f"--n_rows {args.n_rows}: must be 0 (same as --n_samples) or more")
    if args.seed < 0 or args.seed >= 2**63:
        raise UsageError(f"--seed {args.seed}: must be between 0 and 2**63-1")
    if args.skip_save and args.skip_grid:
        raise UsageError("--skip_save with --skip_grid would write nothing")


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a UTF-8 text file: one per line; BOM, CRLF, blank lines and # comments handled."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"--from-file {path}: no such file") from None
    except IsADirectoryError:
        raise PromptFileError(f"--from-file {path}: is a folder, not a text file") from None
    except OSError as err:
        raise PromptFileError(f"--from-file {path}: cannot read ({err.strerror})") from None
    prompts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise PromptFileError(f"--from-file {path}: line {number} is not valid UTF-8") from None
        if text and not text.startswith("#"):
            prompts.append(text)
    if not prompts:
        raise PromptFileError(f"--from-file {path}: no prompts in the file (empty, or only blank/# lines)")
    return prompts


# ----------------------------------------------------------------------------------------------------
# The run.


@dataclass
class RunState:
    """What has been written so far; printed as the summary even after Ctrl-C."""

    images: list[dict] = field(default_factory=list)
    grid: str | None = None
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


def pick_dtype(precision: str, device):
    import torch

    if precision == "autocast" and device.type == "cuda":
        return torch.float16
    return torch.float32


def missing_checkpoint_message(path: str) -> str:
    return (
        f"no checkpoint at {path}: download a Stable Diffusion v1.x checkpoint (sd-v1-4.ckpt or "
        f"v1-5-pruned-emaonly.safetensors, from the model's page on Hugging Face after accepting its licence) "
        f"and put it at {DEFAULT_CKPT}, or pass --ckpt PATH"
    )


def a1111_text(meta: dict, schedule: str) -> str:
    """The AUTOMATIC1111 `parameters` text of one image: its prompt, then A1111's own labels only."""
    from .images import a1111_parameters

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


def run(args: argparse.Namespace, state: RunState) -> None:
    from .images import ensure_writable_dir

    info = lambda msg: None if args.quiet else print(msg, file=sys.stderr)  # noqa: E731
    warn = lambda msg: print(f"warning: {msg}", file=sys.stderr)  # noqa: E731

    # 1. Arguments, prompts and output folder: all checked before anything heavy.
    check_args(args)
    sampler = resolve_sampler(args)
    from .samplers import get_sampler

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
    from .config import load_config

    cfg = load_config(args.config)
    if args.C != cfg.model.latent_channels:
        raise UsageError(f"--C {args.C}: this model has {cfg.model.latent_channels} latent channels")
    if args.f != cfg.model.downscale:
        raise UsageError(f"--f {args.f}: this model's VAE downsamples by {cfg.model.downscale}")
    device = pick_device(args.device or cfg.runtime.device)
    precision = args.precision or cfg.runtime.precision
    dtype = pick_dtype(precision, device)

    # 3. Checkpoint: exists, loads safely, is SD v1.x, fits the config.
    ckpt = Path(args.ckpt).expanduser()
    if not ckpt.exists():
        raise CheckpointError(missing_checkpoint_message(args.ckpt))
    from .checkpoint import short_hash
    from .loading import load_model

    t0 = time.perf_counter()
    info(f"loading {ckpt} ({str(dtype).replace('torch.', '')} on {device}) ...")
    model = load_model(cfg.model, ckpt, device=device, dtype=dtype)
    model_hash = short_hash(ckpt)
    info(f"model loaded in {time.perf_counter() - t0:.1f} s (hash {model_hash})")

    # 4. Generate batch by batch, writing each image as soon as it exists.
    import torch
    from tqdm import tqdm

    from .images import GRID_PATTERN, SAMPLE_PATTERN, WatermarkSkipped, apply_watermark, make_grid, save_png
    from .pipeline import Pipeline, initial_noise

    pipe = Pipeline(model, device, on_warning=warn)
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
        "device": device.type,
        "fixed_code": args.fixed_code,
        "sd_cli_version": __version__,
    }
    watermark_warned = False
    all_images = []
    total = args.n_iter * len(batches)
    bar = tqdm(total=total, desc="batches", unit="batch", disable=args.quiet, file=sys.stderr, position=0)
    for n in range(args.n_iter):
        for b, batch_prompts in enumerate(batches):
            k = 0 if args.fixed_code else n * len(batches) + b
            seed = args.seed + k
            # The batch's generator draws the full-size start noise first (a smaller last batch takes its
            # first rows), then keeps going for any noise the sampler adds (eta > 0, ancestral).
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = initial_noise(generator, args.n_samples, args.C, height, width, args.f)[: len(batch_prompts)]
            step_bar = tqdm(total=args.ddim_steps, desc=f"sampling {sampler}", unit="step", leave=False,
                            disable=args.quiet, file=sys.stderr, position=1)
            t1 = time.perf_counter()
            images = pipe.generate(
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
                meta = {**base, "prompt": batch_prompts[i], "seed": seed, "batch_size": len(batch_prompts),
                        "batch_index": i, "iteration": n}
                if not args.no_watermark:
                    try:
                        img = apply_watermark(img)
                    except WatermarkSkipped as skipped:
                        if not watermark_warned:
                            warn(str(skipped))
                            watermark_warned = True
                all_images.append(img)
                if not args.skip_save:
                    path = save_png(sample_dir, SAMPLE_PATTERN, img, parameters=a1111_text(meta, sampler_info.schedule), metadata=meta)
                    state.images.append({"path": str(path), **meta})
            bar.update(1)
    bar.close()

    # 5. The grid of every image of the run (as CompVis: n_rows images per row).
    if not args.skip_grid:
        import numpy as np

        grid = make_grid(np.stack(all_images), args.n_rows or args.n_samples)
        if not args.no_watermark:
            try:
                grid = apply_watermark(grid)
            except WatermarkSkipped:
                pass  # already said for the single images
        meta = {**base, "prompt": prompts[0] if len(prompts) == 1 else prompts, "seed": args.seed,
                "n_iter": args.n_iter, "n_samples": args.n_samples, "grid": True}
        gparams = a1111_text({**meta, "prompt": prompts[0]}, sampler_info.schedule)
        state.grid = str(save_png(outdir, GRID_PATTERN, grid, parameters=gparams, metadata=meta))


def summary(state: RunState, args: argparse.Namespace, interrupted: bool = False) -> None:
    elapsed = time.perf_counter() - state.started
    per_step = state.sampling_seconds / state.steps if state.steps else 0.0
    n = len(state.images)
    what = f"{n} image{'s' if n != 1 else ''}" + (" + grid" if state.grid else "")
    head = "interrupted: kept" if interrupted else "wrote"
    if not args.quiet or interrupted:
        print(f"{head} {what} in {args.outdir} ({elapsed:.1f} s, {per_step:.2f} s/step)", file=sys.stderr)
    if args.json:
        out = {
            "ok": not interrupted,
            "interrupted": interrupted,
            "outdir": args.outdir,
            "images": state.images,
            "grid": state.grid,
            "seconds": round(elapsed, 3),
            "seconds_per_step": round(per_step, 4),
        }
        print(json.dumps(out, ensure_ascii=False))
        sys.stdout.flush()


def fail(args: argparse.Namespace, state: RunState, message: str, code: int) -> int:
    """One line on stderr; with --json also the JSON report (with whatever was written before)."""
    print(f"sd-txt2img: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"ok": False, "error": message, "images": state.images, "grid": state.grid}, ensure_ascii=False))
    return code


def main(argv: list[str] | None = None) -> int:
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
        run(args, state)
    except KeyboardInterrupt:
        summary(state, args, interrupted=True)
        return EXIT_INTERRUPTED
    except SdCliError as err:
        if args.debug:
            traceback.print_exc()
        return fail(args, state, str(err), err.exit_code)
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
