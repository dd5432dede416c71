"""`sd-txt2img`: flags in, settings out, then the run layer does the work (sd_cli.run.txt2img).

The only layer that sees argparse. It parses the flags (parser.py), builds the three frozen settings
objects (what to generate, where to run, where to write), demo-model defaults included, and turns every
failure into one line on stderr with an exit code: 2 usage, 1 runtime, 130 interrupted (finished
images are kept); --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

from sd_cli.cli.parser import build_parser
from sd_cli.demo import GUIDANCE
from sd_cli.errors import SdCliError, UsageError
from sd_cli.run.report import EXIT_INTERRUPTED, RunState, fail, summary
from sd_cli.run.settings import DEFAULT_CKPT, Generation, Output, Runtime, choose_model

# Flags whose values come from the image; giving one with --replay is a usage error.
GENERATION_DESTS = frozenset({
    "prompt", "negative_prompt", "from_file", "laion400m", "sampler", "plms", "dpm_solver", "ddim_steps", "steps",
    "ddim_eta", "scale", "seed", "fixed_code", "H", "W", "C", "f", "n_samples", "n_iter", "n_rows",
    "skip_grid", "skip_save", "no_watermark", "resume",
})


def given_options(argv: list[str] | None) -> dict[str, str]:
    """{dest: flag as typed on the command line} for the options actually given in `argv`."""
    parser = build_parser()
    flags = {}
    for action in parser._actions:  # argparse has no public API for "was this option given?"
        action.default = argparse.SUPPRESS
        if action.option_strings:
            flags[action.dest] = action.option_strings[0]
    given = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return {dest: flags.get(dest, dest) for dest in vars(given)}


def settings(args: argparse.Namespace) -> tuple[Generation, Runtime, Output]:
    """The three settings objects of a run, checked (UsageError otherwise), before anything heavy."""
    from sd_cli.run.prompts import read_prompt_file

    if args.laion400m:
        raise UsageError("--laion400m is not supported: sd-txt2img runs Stable Diffusion v1.x checkpoints only")
    ckpt, config, demo = choose_model(args.ckpt, args.config)
    runtime = Runtime(ckpt, config, demo, args.device, args.dtype, args.precision, args.threads,
                      args.vae_tiling or "auto")
    out = Output(Path(args.outdir), args.skip_grid, args.skip_save, args.n_rows, args.resume, args.json, args.quiet)
    prompts = read_prompt_file(args.from_file) if args.from_file else [args.prompt]
    gen = Generation.create(
        prompts, demo=demo, sampler=args.sampler, steps=args.steps, ddim_steps=args.ddim_steps, plms=args.plms,
        dpm_solver=args.dpm_solver, eta=args.ddim_eta, scale=args.scale, height=args.H, width=args.W,
        from_file=bool(args.from_file), negative_prompt=args.negative_prompt, seed=args.seed,
        fixed_code=args.fixed_code, latent_channels=args.C, factor=args.f, n_samples=args.n_samples,
        n_iter=args.n_iter, watermark=not args.no_watermark,
    )
    return gen, runtime, out


def replay_settings(args: argparse.Namespace, argv: list[str] | None):
    """(request, runtime) of `--replay`: prompt, seed and every generation setting come from the image."""
    from sd_cli.run.replay import ReplayRequest

    given = given_options(argv)
    bad = sorted(flag for dest, flag in given.items() if dest in GENERATION_DESTS)
    if bad:
        raise UsageError(f"--replay takes prompt, seed and every setting from the image; drop {', '.join(bad)}")
    ckpt, config, demo = choose_model(args.ckpt, args.config)
    runtime = Runtime(ckpt, config, demo, args.device, args.dtype, args.precision, args.threads)
    write_dir = Path(args.outdir) / "samples" if "outdir" in given else None
    return ReplayRequest(Path(args.replay), args.force, write_dir, args.vae_tiling, args.json, args.quiet), runtime


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
    finally:  # under torchrun: leave the process group (sd_cli/run/distributed.py)
        from sd_cli.run.distributed import close

        close()


def _execute(args: argparse.Namespace, argv: list[str] | None, state: RunState) -> int:
    """Build the settings and run the use case: --replay checks an image, otherwise txt2img."""
    if args.replay:
        from sd_cli.run.replay import replay

        request, runtime = replay_settings(args, argv)
        _demo_note(runtime, GUIDANCE)
        return replay(request, runtime, state)
    from sd_cli.run.txt2img import txt2img

    gen, runtime, out = settings(args)
    _demo_note(runtime, gen.scale)
    txt2img(gen, runtime, out, state)
    return 0


def _demo_note(runtime: Runtime, scale: float) -> None:
    if runtime.demo:  # said even with -q: the pictures are not from SD weights
        print(f"note: using the built-in demo model (64x64 shapes, guidance {scale:g}); put real SD v1 weights at "
              f"{DEFAULT_CKPT} or pass --ckpt", file=sys.stderr)


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
        code = _execute(args, argv, state)
    except KeyboardInterrupt:
        with _sigint_ignored():
            summary(state, args.outdir, quiet=args.quiet, as_json=args.json, interrupted=True)
        return EXIT_INTERRUPTED
    except SdCliError as err:
        if args.debug:
            traceback.print_exc()
        message = str(err)
        if state.images and not args.replay:
            message += (f" ({len(state.images)} image(s) written before it are kept; to finish, run the same "
                        "command again with --resume)")
        return fail(state, message, err.exit_code, as_json=args.json)
    except Exception as err:  # not one of ours: out of memory, a driver error, or a bug
        if args.debug:
            traceback.print_exc()
        if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
            return fail(state, "out of memory; try a smaller --H/--W or --n_samples", 1, as_json=args.json)
        first = (str(err).strip().splitlines() or [""])[0]
        return fail(state, f"unexpected {type(err).__name__}: {first} (run again with --debug for the traceback)", 1,
                    as_json=args.json)
    if not args.replay:
        summary(state, args.outdir, quiet=args.quiet, as_json=args.json)
    return code


if __name__ == "__main__":
    sys.exit(main())
