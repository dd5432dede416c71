"""`--resume`: skip the work whose images already exist, so a killed batch continues where it stopped.

A work item is one image of one batch. Its identity is the part of its `sd_cli` PNG metadata that
decides its pixels (`KEY_FIELDS`): prompt, negative prompt, seed, position in the batch (batch_index,
batch_size, n_samples: the rows of start noise drawn), steps, sampler, scale, eta, size, model hash,
compute dtype, how the VAE decoded (whole, bands or tiles), whether the watermark was applied, and the
LoRA and VAE files (by hash, with their weights), the init image (by hash) with its strength, and the
faster-sampling options (DeepCache, the guidance interval, token merging; absent: off). The device and
the CPU thread count are not part of it: an image made on another machine with the same settings counts
as done (its pixels may differ in the last bit). Nor is the dtype when this run's came from `--dtype auto`
(the default): auto's choice is the machine's, like the device, and it changed for Intel CPUs with
AVX512-BF16 but no AMX (bf16 before, float32 now), so a batch begun there before that change resumes
instead of starting over. An explicit `--dtype` (or `--precision full`) keeps the dtype in the key.

The run asks `ResumePlan.take_batch` for every batch before generating it:

* all images of the batch exist: the batch is skipped; their pixels are read back for the grid;
* some exist: the batch is generated again (the images of a batch share one noise draw) and only the
  missing images are written; for the present ones the file on disk is kept (and a warning given if
  its pixels differ from the new ones, e.g. made on another device);
* none: generated as usual.

Each existing file satisfies one work item, so a `--fixed_code` run (equal items in every iteration)
resumes correctly too. Files are never renamed or rewritten: new images take the next free numbers, so
an interrupted run followed by `--resume` ends with the same files (names and bytes) as one
uninterrupted run into an empty folder. A grid equal (metadata and pixels) to an existing one is not
written twice.

`deferred_interrupt` holds Ctrl-C back while an image is being saved and recorded, so the summary of an
interrupted run lists exactly the files on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sd_cli.output.png import GRID_PATTERN, SAMPLE_PATTERN

log = logging.getLogger(__name__)

KEY_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "batch_index",
    "batch_size",
    "n_samples",
    "steps",
    "sampler",
    "scale",
    "eta",
    "width",
    "height",
    "model_hash",
    "dtype",
    "vae_decode",
    "watermark",
    "prompt_syntax",
    "clip_skip",
    "embeddings",
    "scheduler",
    "s_noise",
    "seed_rule",
    "loras",
    "vae",
    "init_image",
    "strength",
    "encode",
    "subseed",
    "subseed_strength",
    "hires",
    "mask",
    "prompt_editing",
    "deepcache",
    "deepcache_branch",
    "cfg_interval",
    "tome",
)
# Fields newer than some images: their value when a file does not have them (what made those images).
KEY_DEFAULTS = {"prompt_syntax": "plain", "clip_skip": 1, "embeddings": {}, "scheduler": None, "s_noise": 1.0, "seed_rule": "batch",
                "loras": [], "vae": None, "init_image": None, "strength": None, "encode": None,
                "subseed": None, "subseed_strength": 0.0, "hires": None,
                "mask": None, "prompt_editing": False, "deepcache": 1, "deepcache_branch": 0, "cfg_interval": None,
                "tome": 0.0}
_FLOAT_FIELDS = ("scale", "eta", "tome")
_MAX_WARNINGS = 5


def work_key(meta: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """The identity of one image's work item, or None if `meta` lacks a field (never matches); the fields in
    `ignore` are left out (a run whose dtype was `--dtype auto`'s choice ignores "dtype")."""
    values = []
    for name in KEY_FIELDS:
        if name in ignore:
            continue
        if name not in meta and name not in KEY_DEFAULTS:
            return None
        value = meta.get(name, KEY_DEFAULTS.get(name))
        if name in _FLOAT_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        values.append(value)
    try:
        return json.dumps(values, sort_keys=True, ensure_ascii=True)
    except (TypeError, ValueError):
        return None


def _numbered(directory: Path, pattern: str) -> list[tuple[int, Path]]:
    """(number, path) of the files in `directory` named exactly `pattern.format(number)`, by number."""
    prefix, _, suffix = pattern.partition("{")
    suffix = suffix.partition("}")[2]
    rx = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    found = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        m = rx.fullmatch(name)
        if m and pattern.format(int(m.group(1))) == name:
            found.append((int(m.group(1)), directory / name))
    return sorted(found)


def read_sd_cli_metadata(path: Path) -> dict | None:
    """The `sd_cli` JSON of a PNG, after checking the file is a complete PNG; None if not readable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return None
            raw = im.info.get("sd_cli")
            im.verify()  # every chunk present with a good CRC: not truncated, not damaged
        meta = json.loads(raw) if isinstance(raw, str) else None
    except Exception:  # PIL raises many types for damaged files
        return None
    return meta if isinstance(meta, dict) else None


def read_pixels(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class ResumePlan:
    """The existing images of an output folder, indexed by work item."""

    def __init__(self, sample_dir: Path, warn: Callable[[str], None] | None = None, ignore: tuple[str, ...] = ()):
        self.sample_dir = Path(sample_dir)
        self.ignore = ignore  # KEY_FIELDS this run does not match on (see work_key)
        self.warn = warn or (lambda msg: log.warning(msg))
        self._index: dict[str, list[Path]] = defaultdict(list)
        self.scanned = 0
        self.unreadable: list[Path] = []
        self.matched = 0
        self._mismatch_warned = False

    @classmethod
    def scan(cls, sample_dir: Path, warn: Callable[[str], None] | None = None,
             ignore: tuple[str, ...] = ()) -> "ResumePlan":
        plan = cls(sample_dir, warn, ignore)
        for _, path in _numbered(plan.sample_dir, SAMPLE_PATTERN):
            plan.scanned += 1
            meta = read_sd_cli_metadata(path)
            key = work_key(meta, ignore) if meta is not None else None
            if meta is None:
                plan.unreadable.append(path)
            if key is not None:
                plan._index[key].append(path)
        shown = ", ".join(p.name for p in plan.unreadable[:_MAX_WARNINGS])
        if plan.unreadable:
            more = f" (+{len(plan.unreadable) - _MAX_WARNINGS} more)" if len(plan.unreadable) > _MAX_WARNINGS else ""
            plan.warn(f"--resume: {len(plan.unreadable)} file(s) in {plan.sample_dir} are damaged or carry no "
                      f"sd_cli metadata and do not count as done: {shown}{more}")
        return plan

    def take_batch(self, metas: list[dict]) -> list[Path | None]:
        """For each image of a batch, an existing file that already holds it (used up), or None."""
        out: list[Path | None] = []
        for meta in metas:
            key = work_key(meta, self.ignore)
            paths = self._index.get(key) if key is not None else None
            out.append(paths.pop(0) if paths else None)
        self.matched += sum(p is not None for p in out)
        return out

    def check_same(self, path: Path, regenerated: np.ndarray, on_disk: np.ndarray) -> None:
        """Warn (once per run) when a kept file's pixels differ from what this run computes."""
        if self._mismatch_warned or np.array_equal(regenerated, on_disk):
            return
        self._mismatch_warned = True
        self.warn(f"--resume: {path} differs from what this run computes for the same settings (made on another "
                  "device, dtype, thread count or torch build?); it is kept as it is")


def find_equal_grid(outdir: Path, metadata: dict, pixels: np.ndarray) -> Path | None:
    """An existing grid in `outdir` with the same metadata and pixels, or None."""
    want = json.loads(json.dumps(metadata, sort_keys=True))
    for _, path in reversed(_numbered(Path(outdir), GRID_PATTERN)):
        if read_sd_cli_metadata(path) != want:
            continue
        try:
            if np.array_equal(read_pixels(path), pixels):
                return path
        except Exception:
            continue
    return None


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back inside the block; deliver the first one that came at its end.

    Used around "save an image, record it", so an interrupted run's summary lists exactly the images on
    disk. A signal whose handler is SIG_IGN stays ignored. Outside the main thread (where signal handlers
    cannot be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) not in (signal.SIG_IGN, None)]
    previous = {s: signal.getsignal(s) for s in held}
    pending: list[int] = []
    for s in held:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        if previous[pending[0]] is signal.default_int_handler:
            raise KeyboardInterrupt
        signal.raise_signal(pending[0])  # the handler that was there decides (the CLI's raises)
