"""`sd-txt2img`: flags in, settings out, then the run layer does the work (sd_cli.run.txt2img).

The only layer that sees argparse. It parses the flags (parser.py), builds the three frozen settings
objects (what to generate, where to run, where to write), demo-model defaults included, and turns every
failure into one line on stderr with an exit code: 2 usage, 1 runtime, 130 interrupted (finished
images are kept); --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from sd_cli.cli import signals
from sd_cli.errors import SdCliError, StdoutClosedByReader, StdoutError, UsageError

# Nothing heavy is imported at module level: the signal handlers go in first (`main`), so Ctrl-C during
# `import torch` is "interrupted" like any other moment.

# Flags whose values come from the image; giving one with --replay is a usage error.
GENERATION_DESTS = frozenset({
    "prompt", "negative_prompt", "from_file", "laion400m", "sampler", "plms", "dpm_solver", "ddim_steps", "steps",
    "ddim_eta", "scale", "seed", "fixed_code", "H", "W", "C", "f", "n_samples", "n_iter", "n_rows",
    "skip_grid", "skip_save", "no_watermark", "resume", "prompt_syntax", "clip_skip", "params", "strict_params",
    "scheduler", "s_noise", "lora", "strength", "encode", "resize", "subseed", "subseed_strength",
    "hr_scale", "hr_upscaler", "hr_steps", "denoising_strength", "mask_blur", "inpaint_fill",
    "fast", "deepcache", "deepcache_branch", "cfg_interval", "tome",
})
# --params keyword -> the flags that, given on the command line, win over the infotext's value.
PARAMS_FLAGS = {"prompt": ("prompt",), "negative_prompt": ("negative_prompt",), "steps": ("steps", "ddim_steps"),
                "scale": ("scale",), "seed": ("seed",), "width": ("W",), "height": ("H",),
                "sampler": ("sampler", "plms", "dpm_solver", "ddim_steps"), "clip_skip": ("clip_skip",),
                "eta": ("ddim_eta",), "n_samples": ("n_samples",), "scheduler": ("scheduler", "sampler"),
                "subseed": ("subseed",), "subseed_strength": ("subseed_strength",), "hr_scale": ("hr_scale",),
                "hr_upscaler": ("hr_upscaler",), "hr_steps": ("hr_steps",), "hr_strength": ("denoising_strength",),
                "strength": ("strength",)}
DEEPCACHE_MIN_STEPS = 20  # fewer: a warning (README "Faster sampling": measured on the demo model)
# settings.FASTER_KEYS, repeated so that this module imports without torch (tests/test_accelerate.py checks they agree)
FASTER = ("deepcache", "deepcache_branch", "cfg_interval", "tome")
PARAMS_FLAGS.update({key: (key,) for key in FASTER})


def given_options(argv: list[str] | None, command: str = "txt2img") -> dict[str, str]:
    """{dest: flag as typed on the command line} for the options actually given in `argv`."""
    from sd_cli.cli.parser import build_parser

    parser = build_parser(command)
    flags = {}
    parser._defaults.clear()  # (the command name)
    for action in parser._actions:  # argparse has no public API for "was this option given?"
        action.default = argparse.SUPPRESS
        if action.option_strings:
            flags[action.dest] = action.option_strings[0]
    given = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return {dest: flags.get(dest, dest) for dest in vars(given)}


def _check_outdir(args: argparse.Namespace) -> None:
    if args.outdir == "":
        raise UsageError('--outdir "": give a folder (. for the current one)')


def _check_combinations(args: argparse.Namespace) -> None:
    """Flags that would otherwise be silently ignored, and an empty --outdir."""
    _check_outdir(args)
    if args.force and not args.replay:
        raise UsageError("--force only applies to --replay")
    if args.strict_params and args.params is None:
        raise UsageError("--strict-params only applies to --params")
    if args.prompt is not None and args.from_file:
        raise UsageError("--prompt and --from-file: give one (the file's lines are the prompts)")


def _embeddings(args: argparse.Namespace) -> Path | None:
    from sd_cli.run.settings import DEFAULT_EMBEDDINGS

    if args.embeddings is not None:
        return Path(args.embeddings).expanduser()
    return Path(DEFAULT_EMBEDDINGS) if Path(DEFAULT_EMBEDDINGS).is_dir() else None


def _img2img(args: argparse.Namespace, kwargs: dict, demo: bool) -> dict:
    """sd-img2img's settings: the init image (its size unless --W and --H are both given), strength,
    encoding; CompVis img2img.py's defaults (DDIM with 50 steps unless a sampler is named, scale 5)."""
    from sd_cli.output.init_image import load_init_image
    from sd_cli.run.settings import DEFAULT_STRENGTH

    if args.init_img is None:
        raise UsageError("--init-img IMAGE: sd-img2img needs the image to start from")
    if (args.W is None) != (args.H is None):
        raise UsageError("--W and --H: give both (the init image is fitted to them) or neither (its own size)")
    sized = args.W is not None
    init = load_init_image(args.init_img, args.W, args.H, args.resize)
    named = args.sampler or args.plms or args.dpm_solver or kwargs.get("sampler")
    mask = None
    if args.mask is not None:
        from sd_cli.output.init_image import load_mask

        mask = load_mask(args.mask, init.size)
        if mask.resized:
            print(f"warning: --mask {args.mask} is not {init.size[0]}x{init.size[1]}; resized to the image",
                  file=sys.stderr)
    return {**kwargs, "init": init, "width": init.size[0], "height": init.size[1], "mask": mask,
            "mask_blur": args.mask_blur, "fill": args.inpaint_fill,
            "strength": kwargs.get("strength", DEFAULT_STRENGTH) if args.strength is None else args.strength,
            "encode": args.encode,
            "resize": args.resize if sized else None, "sampler": named or "ddim",
            "scale": kwargs["scale"] if kwargs["scale"] is not None or demo else 5.0}


def _faster(args: argparse.Namespace, kwargs: dict) -> dict:
    """`kwargs` with --deepcache, --deepcache-branch, --cfg-interval, --tome and --fast resolved
    (`settings.faster_options`: a given option wins over the preset, which wins over --params)."""
    from sd_cli.run.settings import faster_options

    return {**kwargs, **faster_options({k: getattr(args, k) for k in FASTER}, args.fast, kwargs.get("scale"), kwargs)}


def _add_ons(args: argparse.Namespace) -> dict:
    """--vae and --lora-dir as Runtime fields."""
    as_path = lambda p: Path(p).expanduser() if p is not None else None  # noqa: E731
    return {"vae": as_path(args.vae), "lora_dir": as_path(args.lora_dir)}


def _from_params(args: argparse.Namespace, given: dict, kwargs: dict) -> dict:
    """`kwargs` with the --params infotext's values for every setting the command line does not give."""
    from sd_cli.run.params import read_infotext, settings_from_infotext
    from sd_cli.run.settings import FAST_PRESET

    if args.from_file:
        raise UsageError("--params and --from-file: give one")
    found, unused = settings_from_infotext(read_infotext(args.params), args.command, given)
    if unused and args.strict_params:
        raise UsageError(f"--params: fields this tool does not use: {', '.join(unused)} (--strict-params)")
    if unused:
        print(f"warning: --params: not used: {', '.join(unused)}", file=sys.stderr)
    for key, value in found.items():
        flags = PARAMS_FLAGS[key] + (("fast",) if key in FAST_PRESET else ())  # (the preset's values are flags')
        if not any(flag in given for flag in flags):
            kwargs[key] = value
            if key == "steps":
                kwargs["ddim_steps"] = None  # the infotext's Steps stand for either flag
    return kwargs


def settings(args: argparse.Namespace, given: dict | None = None):
    """The three settings objects of a run, checked (UsageError otherwise), before anything heavy."""
    from sd_cli.run.prompts import read_prompt_file
    from sd_cli.run.settings import DEFAULT_PROMPT, Generation, Output, Runtime, choose_model

    if args.laion400m:
        raise UsageError("--laion400m is not supported: sd-txt2img runs Stable Diffusion v1.x checkpoints only")
    _check_combinations(args)
    ckpt, config, demo = choose_model(args.ckpt, args.config)
    runtime = Runtime(ckpt, config, demo, args.device, args.dtype, args.precision, args.threads,
                      args.vae_tiling or "auto", _embeddings(args), **_add_ons(args))
    out = Output(Path(args.outdir), args.skip_grid, args.skip_save, args.n_rows, args.resume, args.json, args.quiet)
    kwargs = dict(
        prompt=args.prompt or DEFAULT_PROMPT, sampler=args.sampler, steps=args.steps, ddim_steps=args.ddim_steps,
        plms=args.plms, dpm_solver=args.dpm_solver, eta=args.ddim_eta, scale=args.scale, height=args.H,
        width=args.W, negative_prompt=args.negative_prompt, seed=args.seed, fixed_code=args.fixed_code,
        latent_channels=args.C, factor=args.f, n_samples=args.n_samples, n_iter=args.n_iter,
        watermark=not args.no_watermark, prompt_syntax=args.prompt_syntax, clip_skip=args.clip_skip,
        scheduler=args.scheduler, s_noise=args.s_noise, loras=tuple(args.lora), subseed=args.subseed,
        subseed_strength=args.subseed_strength,
    )
    if args.params is not None:
        kwargs = _from_params(args, given or {}, kwargs)
    kwargs = _faster(args, kwargs)
    if args.command == "img2img":
        kwargs = _img2img(args, kwargs, demo)
    elif args.hr_scale is not None or "hr_scale" in kwargs:  # (--params: its hires values where no flag is given)
        kwargs = {**dict(hr_scale=args.hr_scale, hr_upscaler=args.hr_upscaler, hr_steps=args.hr_steps,
                         hr_strength=args.denoising_strength), **kwargs}
    elif args.hr_steps is not None or args.denoising_strength is not None:
        raise UsageError("--hr-steps and --denoising-strength are for the hires fix: add --hr-scale")
    prompt = kwargs.pop("prompt")
    prompts = read_prompt_file(args.from_file) if args.from_file else [prompt]
    gen = Generation.create(prompts, demo=demo, from_file=bool(args.from_file), **kwargs)
    if gen.deepcache > 1 and gen.steps < DEEPCACHE_MIN_STEPS and not args.quiet:
        print(f"warning: --deepcache {gen.deepcache} at {gen.steps} steps: the steps are far apart, so the reused "
              f"features are stale and the picture changes (the demo model's held-out accuracy at 10 steps: "
              f"80% -> 17% with --deepcache 3); use {DEEPCACHE_MIN_STEPS} steps or more", file=sys.stderr)
    return gen, runtime, out


def replay_settings(args: argparse.Namespace, argv: list[str] | None):
    """(request, runtime) of `--replay`: prompt, seed and every generation setting come from the image."""
    from sd_cli.run.replay import ReplayRequest
    from sd_cli.run.settings import Runtime, choose_model

    _check_outdir(args)
    given = given_options(argv, args.command)
    bad = sorted(flag for dest, flag in given.items() if dest in GENERATION_DESTS)
    if bad:
        raise UsageError(f"--replay takes prompt, seed and every setting from the image; drop {', '.join(bad)}")
    ckpt, config, demo = choose_model(args.ckpt, args.config)
    runtime = Runtime(ckpt, config, demo, args.device, args.dtype, args.precision, args.threads,
                      embeddings=_embeddings(args), **_add_ons(args))
    write_dir = Path(args.outdir) / "samples" if "outdir" in given else None
    init, mask = getattr(args, "init_img", None), getattr(args, "mask", None)
    return ReplayRequest(Path(args.replay), args.force, write_dir, args.vae_tiling, args.json, args.quiet,
                         Path(init) if init is not None else None, Path(mask) if mask is not None else None), runtime


def main(argv: list[str] | None = None, command: str = "txt2img") -> int:
    with signals.handled():
        try:
            return _main(argv, command)
        except BaseException as err:  # a signal before the arguments were even parsed (imports, argparse)
            if isinstance(err, SystemExit) or signals.stopped_by(err) is None:
                raise
            with signals.ignored():
                print(f"sd-{command}: interrupted", file=sys.stderr)
            return signals.EXIT_CODES[signals.stopped_by(err)]
        finally:  # under torchrun: leave the process group (sd_cli/run/distributed.py)
            with signals.ignored():
                from sd_cli.run.distributed import close

                close()


def _execute(args: argparse.Namespace, argv: list[str] | None, state) -> int:
    """Build the settings and run the use case: --replay checks an image, otherwise txt2img."""
    if args.replay:
        from sd_cli.run.replay import replay

        request, runtime = replay_settings(args, argv)
        from sd_cli.demo import GUIDANCE

        _demo_note(runtime, GUIDANCE, args.quiet)
        return replay(request, runtime, state)
    from sd_cli.run.txt2img import txt2img

    gen, runtime, out = settings(args, given_options(argv, args.command) if args.params is not None else None)
    _demo_note(runtime, gen.scale, args.quiet)
    txt2img(gen, runtime, out, state)
    return 0


def _demo_note(runtime, scale: float, quiet: bool) -> None:
    from sd_cli.run.settings import DEFAULT_CKPT

    if runtime.demo and not quiet:  # -q: errors only (the PNG metadata names the model)
        print(f"note: using the built-in demo model (64x64 shapes, guidance {scale:g}); put real SD v1 weights at "
              f"{DEFAULT_CKPT} or pass --ckpt", file=sys.stderr)


def _main(argv: list[str] | None, command: str = "txt2img") -> int:
    from sd_cli.cli.parser import build_parser
    from sd_cli.run.report import RunState, summary

    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed by argparse
        raw = sys.argv[1:] if argv is None else argv
        if parser.last_error is not None and "--json" in raw:  # the same JSON as every other usage error
            _json_usage(parser.last_error)
        return int(done.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.ERROR if args.quiet else logging.WARNING),
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    state = RunState(prog=parser.prog)
    try:
        code = _execute(args, argv, state)
        if not args.replay:
            summary(state, args.outdir, quiet=args.quiet, as_json=args.json)
    except BaseException as err:  # noqa: BLE001 - every way out becomes one line and an exit code
        if isinstance(err, SystemExit):
            raise
        return _failed(err, args, state)
    return code


def _failed(err: BaseException, args: argparse.Namespace, state) -> int:
    """The exit code and the one line (and --json report) for a run that did not finish."""
    from sd_cli.run.report import fail, summary

    if args.debug:
        traceback.print_exc()
    stop = signals.stopped_by(err)
    if stop is not None:  # Ctrl-C or SIGTERM, whatever exception it surfaced as
        with signals.ignored():
            try:
                summary(state, args.outdir, quiet=args.quiet, as_json=args.json, interrupted=True)
            except StdoutError:
                pass  # stdout gone as well: the summary line on stderr is out
        return signals.EXIT_CODES[stop]
    if isinstance(err, StdoutClosedByReader):
        return err.exit_code  # the reader went away (`--json | head`): quiet, as Unix tools are
    as_json = args.json and not isinstance(err, StdoutError)  # no second try at a stdout that failed
    if isinstance(err, SdCliError):
        message = str(err)
        if state.images and not args.replay and not isinstance(err, StdoutError):
            message += (f" ({len(state.images)} image(s) written before it are kept; to finish, run the same "
                        "command again with --resume)")
        return _fail_quietly(fail, state, message, err.exit_code, as_json)
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        return _fail_quietly(fail, state, "out of memory; try a smaller --H/--W or --n_samples", 1, as_json)
    if not isinstance(err, Exception):
        raise err
    first = (str(err).strip().splitlines() or [""])[0]
    return _fail_quietly(fail, state, f"unexpected {type(err).__name__}: {first} (run again with --debug for the "
                         "traceback)", 1, as_json)


def _json_usage(message: str) -> None:
    """The --json report of an argparse usage error (its line is already on stderr)."""
    from sd_cli.run.report import print_json

    try:
        print_json({"ok": False, "error": message, "images": [], "grid": None})
    except StdoutError:
        pass  # stdout cannot take it either: the line on stderr is out


def _fail_quietly(fail, state, message: str, code: int, as_json: bool) -> int:
    try:
        return fail(state, message, code, as_json=as_json)
    except StdoutError:  # the JSON of a failure could not be written either: the line on stderr is out
        return code


def run_img2img() -> None:
    """The entry point of `sd-img2img`."""
    run("img2img")


def run(command: str = "txt2img") -> None:
    """The program's entry point (`sd-txt2img`, `python -m sd_cli`): `main`, then exit with its code.

    An interrupted run ends with `os._exit` once stdout and stderr are flushed: a Ctrl-C that passed through
    a C extension's embedded Python call (pybind11 runs some) can leave CPython's "unhandled Ctrl-C" flag
    set, and the interpreter would then kill itself with SIGINT at exit (seen in 1 of 4 interrupts while
    the model loads) instead of returning 130. Every file is already complete by then.
    """
    code = main(command=command)
    if code in signals.EXIT_CODES.values():
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
