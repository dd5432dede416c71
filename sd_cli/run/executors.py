"""Executors: which work items this process makes, and how their results are collected.

* local: every item, in order; images go to the sink as they are made, pixels to the grid list.
* torchrun: round robin (sd_cli.run.distributed); rank 0 numbers the files first, each rank writes its
  own images under those exact names, and the final gather brings entries and grid pixels to rank 0.

Both take `make(item) -> images`, the render path, and skip what --resume finds already done: a batch
whose images all exist is not made; a batch partly done is made again (its images share one noise
draw) and only its missing images are written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sd_cli.run.resume import ResumePlan, read_pixels
from sd_cli.run.sink import Sink
from sd_cli.run.work import WorkItem

Make = Callable[[WorkItem], list[np.ndarray]]


def run_local(items: Sequence[WorkItem], plan: ResumePlan | None, make: Make, sink: Sink,
              done_one: Callable[[], None]) -> list[np.ndarray]:
    """Make every item in order; returns every image's pixels (for the grid) in that order."""
    state, grid = sink.state, []
    for item in items:
        done = plan.take_batch(list(item.metas)) if plan else [None] * len(item.metas)
        if all(done):  # --resume: every image of this batch exists; its pixels still go into the grid
            state.skipped.extend({"path": str(path), **meta} for path, meta in zip(done, item.metas))
            if not sink.out.skip_grid:
                grid.extend(read_pixels(path) for path in done)
        else:
            for i, img in enumerate(make(item)):
                if done[i] is not None:  # --resume, batch partly done: keep the existing file as it is
                    kept = read_pixels(done[i])
                    plan.check_same(done[i], img, kept)
                    state.skipped.append({"path": str(done[i]), **item.metas[i]})
                    grid.append(kept)
                else:
                    grid.append(img)
                    sink.save(item, i, img)
        done_one()
    return grid


def run_torchrun(ddp, items: Sequence[WorkItem], plan: ResumePlan | None, make: Make, sink: Sink,
                 done_one: Callable[[], None]) -> list[np.ndarray] | None:
    """This rank's share of the items; on rank 0 returns the whole job's grid pixels, elsewhere None."""
    from sd_cli.output import png
    from sd_cli.run.distributed import Share, grid_pixels, merge

    state, out = sink.state, sink.out
    share = Share(ddp.rank)
    item_metas = [list(item.metas) for item in items]
    free = None if out.skip_save else (lambda: png.next_free_index(out.sample_dir, png.SAMPLE_PATTERN))
    slots = ddp.plan_files(item_metas, plan, free)

    def work(j: int) -> None:
        item, slot = items[j], slots[j]
        done = [Path(p) if p else None for p in slot.done]
        if all(done):  # (rank 0 lists and reads them at the end)
            return
        for i, img in enumerate(make(item)):
            if done[i] is not None:
                if done[i].is_file():  # rank 0 lists it; compare where the file can be seen
                    plan.check_same(done[i], img, read_pixels(done[i]))
                continue
            if not out.skip_grid:
                share.pixels[(j, i)] = img
            sink.save(item, i, img, number=slot.numbers[i], exact=True,
                      record=lambda entry, j=j, i=i: share.images.append((j, i, entry)))

    ddp.run_share(len(items), work, done_one)
    share.steps, share.seconds = state.steps, state.sampling_seconds
    shares = ddp.finish(share)
    if shares is not None and slots is not None:  # rank 0: the whole job's files, in one-process order
        state.images, state.skipped = merge(shares, item_metas, slots)
        state.steps = sum(s.steps for s in shares)
        state.sampling_seconds = sum(s.seconds for s in shares)
    ddp.raise_failure(shares)
    if not ddp.is_main:
        return None
    return grid_pixels(shares, slots, read_pixels) if not out.skip_grid else []
