"""The txt2img use case: settings in, files out. The CLI calls `txt2img`; so does torchrun (every rank).

1. The output folders (before anything heavy). 2. The engine: config, device, dtype, threads, hash.
3. The work plan and, with --resume, what is done already. 4. The executor makes the items through
the one render path and the sink writes them. 5. The grid.
"""

from __future__ import annotations

import sys
import time

from sd_cli.run.api import StableDiffusion
from sd_cli.run.executors import run_local, run_torchrun
from sd_cli.run.report import Log, RunState
from sd_cli.run.resume import ResumePlan
from sd_cli.run.settings import Generation, Output, Runtime
from sd_cli.run.sink import Sink, prepare_folders
from sd_cli.run.work import WorkItem


def txt2img(gen: Generation, runtime: Runtime, out: Output, state: RunState) -> None:
    """Make every image of `gen` into `out`; `state` records what was written (also after Ctrl-C)."""
    from sd_cli.run.distributed import from_env

    log = Log(out.quiet)
    ddp = from_env()  # under torchrun: this process's rank; None when run as one process
    new = [d for d in (out.outdir, out.sample_dir) if not d.exists()]
    prepare_folders(out)
    try:
        _run(gen, runtime, out, state, ddp, log)
    except BaseException:
        _remove_if_empty(reversed(new))  # a failed run leaves no empty folders behind
        raise


def _remove_if_empty(folders) -> None:
    for folder in folders:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            pass


def _run(gen: Generation, runtime: Runtime, out: Output, state: RunState, ddp, log: Log) -> None:
    if ddp is not None:
        log = Log(out.quiet, ddp.rank)
    sd = StableDiffusion(runtime, ddp=ddp, log=log, gen=gen)
    state.rank = sd.rank
    check_memory(sd, gen)
    base = sd.base_metadata(gen)
    items, sink = sd.plan(gen), Sink(out, gen, base, state)
    plan = _resume_plan(out, ddp, log, ("dtype",) if sd.dtype_auto else ())
    if not (out.resume and ddp is None):  # (under torchrun every rank loads before the collectives)
        sd.pipeline()
    with _bar(len(items) if ddp is None else len(ddp.share(len(items))), log, ddp) as bar:
        warned: list[bool] = []

        def make(item: WorkItem):
            images = _render_counted(sd, gen, item, state, log)
            if gen.watermark and not gen.watermarked and not warned and not out.quiet:  # once; -q: errors only
                warned.append(True)
                from sd_cli.output.watermark import too_small_message

                log.warn(too_small_message(gen.height, gen.width))
            return images

        run = run_local if ddp is None else (lambda *a: run_torchrun(ddp, *a))
        pixels = run(items, plan, make, sink, lambda: bar.update(1))
    if pixels is not None and not out.skip_grid:
        sink.write_grid(pixels, resumed=plan is not None)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(sd: StableDiffusion, gen: Generation) -> None:
    """Refuse a batch whose untiled VAE decode cannot fit in this machine's free memory, before loading.

    The decode's peak is at full resolution: about four tensors of ch channels per image (a ResnetBlock's
    input, hidden, output and a GroupNorm temporary), which is what grows with --n_samples and --H/--W.
    """
    from sd_cli.pipeline.vae_tiling import decode_method

    available = _available_bytes()
    if sd.device.type != "cpu" or available is None or decode_method(sd.runtime.vae_tiling, gen.height,
                                                                       gen.width) != "whole":
        return
    element = sd.dtype_choice.dtype.itemsize
    need = gen.n_samples * gen.height * gen.width * sd.config.model.vae.ch * element * 4
    if need > available:
        from sd_cli.errors import UsageError

        raise UsageError(f"--n_samples {gen.n_samples} at {gen.width}x{gen.height}: decoding the batch needs about "
                         f"{need / 2**30:.1f} GiB, and {available / 2**30:.1f} GiB of memory is free; use a smaller "
                         "--n_samples (and more --n_iter) or --vae-tiling on")


def _resume_plan(out: Output, ddp, log: Log, ignore: tuple[str, ...]) -> ResumePlan | None:
    """--resume: what is done already (under torchrun rank 0 looks, see sd_cli/run/distributed.py); `ignore`:
    the key fields not matched on (the dtype, when it was --dtype auto's choice)."""
    if not out.resume:
        return None
    if ddp is None or ddp.is_main:
        return ResumePlan.scan(out.sample_dir, warn=log.warn, ignore=ignore)
    return ResumePlan(out.sample_dir, log.warn, ignore)


def _bar(total: int, log: Log, ddp):
    from tqdm import tqdm

    desc = "batches" if ddp is None else f"batches (rank 0 of {ddp.world_size})"
    return tqdm(total=total, desc=desc, unit="batch", disable=not log.bars, file=sys.stderr, position=0)


def _render_counted(sd: StableDiffusion, gen: Generation, item: WorkItem, state: RunState, log: Log):
    """`sd.render` with a step bar; the run counts the steps and the sampling time itself."""
    from tqdm import tqdm

    bar = tqdm(total=gen.steps, desc=f"sampling {gen.sampler}", unit="step", leave=False, disable=not log.bars,
               file=sys.stderr, position=1)

    def on_step(i: int, total: int, x) -> None:
        state.steps += 1  # DDIM/PLMS may run one step more than asked (CompVis' grid)
        bar.total = total
        bar.update(1)

    t0 = time.perf_counter()
    try:
        return sd.render(gen, item, on_step)
    finally:
        state.sampling_seconds += time.perf_counter() - t0
        bar.close()
