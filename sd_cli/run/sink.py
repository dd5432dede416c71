"""The output sink: writes a run's images and its grid, and records each file as it lands.

Every image is saved and recorded inside `deferred_interrupt`, so an interrupted run's summary lists
exactly the files on disk. Numbers are the folder's next free ones (or, under torchrun, the exact number
rank 0 gave the image). With --resume an equal grid that already exists is kept, not written twice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sd_cli.output import png
from sd_cli.output.a1111 import a1111_text
from sd_cli.run.report import RunState
from sd_cli.run.resume import deferred_interrupt, find_equal_grid
from sd_cli.run.settings import Generation, Output
from sd_cli.run.work import WorkItem, grid_metadata


def prepare_folders(out: Output) -> None:
    """Create the output folders (before anything heavy, so a bad --outdir costs nothing)."""
    png.ensure_writable_dir(out.outdir)
    if not out.skip_save:
        png.ensure_writable_dir(out.sample_dir)


class Sink:
    """Where the images of one run go."""

    def __init__(self, out: Output, gen: Generation, base: dict, state: RunState):
        from sd_cli.sampling.samplers import get_sampler

        self.out, self.gen, self.base, self.state = out, gen, base, state
        self.schedule = get_sampler(gen.sampler).schedule

    def save(self, item: WorkItem, i: int, img: np.ndarray, number: int = 0, exact: bool = False,
             record: Callable[[dict], None] | None = None) -> None:
        """Save image i of `item` (unless --skip_save) and record it: in the run state, and in `record`."""
        if self.out.skip_save:
            return
        meta = item.metas[i]
        with deferred_interrupt():  # Ctrl-C waits until the file is saved and recorded
            path = png.save_png(self.out.sample_dir, png.SAMPLE_PATTERN, img, parameters=a1111_text(meta, self.schedule),
                                metadata=meta, start_index=number, exact=exact)
            entry = {"path": str(path), **meta}
            self.state.images.append(entry)
            if record is not None:
                record(entry)

    def write_grid(self, pixels: list[np.ndarray], resumed: bool) -> None:
        """The grid of every image of the run, as CompVis: n_rows images per row, watermarked on its own."""
        from sd_cli.output.pixels import make_grid
        from sd_cli.output.watermark import WatermarkSkipped, apply_watermark

        grid = make_grid(np.stack(pixels), self.out.n_rows or self.gen.n_samples)
        marked = False
        if self.gen.watermark:
            try:
                grid, marked = apply_watermark(grid), True
            except WatermarkSkipped:
                pass  # already said for the single images
        meta = grid_metadata(self.gen, self.base, marked)
        params = a1111_text({**meta, "prompt": self.gen.prompts[0]}, self.schedule)
        existing = find_equal_grid(self.out.outdir, meta, grid) if resumed else None
        if existing is not None:  # --resume of a finished run: that grid is already there
            self.state.grid, self.state.grid_kept = str(existing), True
            return
        with deferred_interrupt():
            self.state.grid = str(png.save_png(self.out.outdir, png.GRID_PATTERN, grid, parameters=params, metadata=meta))
