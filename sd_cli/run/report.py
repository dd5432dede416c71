"""What a run tells its user: info and warning lines, the running record, the summary and the --json report.

Info lines go to stderr unless quiet; warnings always do. Under torchrun rank 0 speaks for the job: the
other ranks print warnings only, naming their rank. The summary and the JSON come from `RunState`,
which holds what has been written so far, so they are right even after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from sd_cli.errors import StdoutClosedByReader, StdoutError


def path_text(path) -> str:
    """A path as text that can go into a PNG or JSON: bytes that are not UTF-8 become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")



def one_line(text: str) -> str:
    """`text` with line breaks, other control characters and undecodable bytes escaped (\\n, \\udcff):
    an error message stays one line whatever the user typed or a file name holds."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


@dataclass(frozen=True)
class Log:
    """Where a run's messages go: `info` (not when quiet, and only on rank 0) and `warn` (always)."""

    quiet: bool = False
    rank: int = 0

    def info(self, msg: str) -> None:
        if not self.quiet and self.rank == 0:
            print(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        rank = f"[rank {self.rank}] " if self.rank else ""
        line = f"warning: {rank}{msg}"
        if "tqdm" in sys.modules:  # a progress bar may be on screen: print above it, not into its line
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    @property
    def bars(self) -> bool:
        """Progress bars shown: not quiet, and only on rank 0 (it shows its share of the job)."""
        return not self.quiet and self.rank == 0


@dataclass
class RunState:
    """What has been written so far; printed as the summary even after Ctrl-C."""

    images: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # --resume: images found already done
    grid: str | None = None
    grid_kept: bool = False  # --resume: an equal grid already existed
    rank: int = 0  # under torchrun: only rank 0 prints the summary and --json
    steps: int = 0  # sampler steps run, counted by the run (not by a progress bar, which -q disables)
    sampling_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    prog: str = "sd-txt2img"  # the command, for error lines


def _stdout_to_devnull() -> None:
    """After stdout failed: point its descriptor at /dev/null, so the interpreter's last flush of what is
    still buffered cannot fail again (a second error, or Python's "Exception ignored" lines)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def write_stdout(text: str) -> None:
    """One line on stdout, flushed. A reader that went away (EPIPE) and a closed or full stdout raise
    StdoutError subclasses instead of a traceback."""
    out = sys.stdout
    if out is None:  # started with stdout closed (`>&-`)
        raise StdoutError("standard output is closed; the report was not written")
    try:
        out.write(text + "\n")
        out.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        raise StdoutClosedByReader("standard output was closed by its reader") from None
    except (OSError, ValueError) as err:  # ENOSPC, EIO, a closed file object
        _stdout_to_devnull()
        reason = getattr(err, "strerror", None) or str(err)
        raise StdoutError(f"cannot write the report to standard output ({reason})") from None


def print_json(obj: dict) -> None:
    """One JSON line on stdout; non-ASCII kept where stdout can take it, escaped where it cannot."""
    try:
        text = json.dumps(obj, ensure_ascii=False)
        if sys.stdout is not None and sys.stdout.encoding:
            text.encode(sys.stdout.encoding)
    except UnicodeEncodeError:  # e.g. an ASCII-only stdout, or undecodable bytes in a path
        text = json.dumps(obj, ensure_ascii=True)
    write_stdout(text)


def summary(state: RunState, outdir: str, *, quiet: bool, as_json: bool, interrupted: bool = False) -> None:
    """The closing line on stderr ("wrote 6 images + grid in ..."), and the --json report on stdout."""
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
    if not quiet or interrupted:
        print(f"{rank}{head} {what} in {one_line(outdir)} ({elapsed:.1f} s, {per_step:.2f} s/step){tail}",
              file=sys.stderr)
    if as_json and not state.rank:
        print_json({
            "ok": not interrupted,
            "interrupted": interrupted,
            "outdir": outdir,
            "images": state.images,
            "skipped": state.skipped,
            "grid": state.grid,
            "seconds": round(elapsed, 3),
            "seconds_per_step": round(per_step, 4),
        })


def fail(state: RunState, message: str, code: int, *, as_json: bool) -> int:
    """One line on stderr; with --json also the JSON report (with whatever was written before)."""
    rank = f"[rank {state.rank}] " if state.rank else ""  # torchrun: every rank's own error, rank 0's JSON
    print(f"{state.prog}: error: {rank}{one_line(message)}", file=sys.stderr)
    if as_json and not state.rank:
        print_json({"ok": False, "error": message, "images": state.images, "grid": state.grid})
    return code
