"""Many processes under torchrun: who does which batch, which file number each image gets, and the gather.

`torchrun --nproc_per_node N -m sd_cli ...` starts N copies of the CLI with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. `from_env` turns those into a `Dist`; without RANK and
WORLD_SIZE the CLI runs as one process and nothing here is used.

A work item is one batch of the single-process loop: item j = iteration * batches per iteration + batch
number, the same k that picks the batch's seed (seed + k), so every rank computes the same noise for an
item as one process would. A batch is never split: its images share one noise draw.

Rank 0 decides the file numbers (`number_images`): image m of the run (in single-process order) that is
still to be made gets number base + (how many images before it are still to be made), where base is the
folder's next free number. That is exactly the number one process would give it, also with --resume
(files already there are matched by `ResumePlan` in the same order). The numbers and the list of done files
are broadcast, each rank writes its images under their exact names (`save_png(..., exact=True)`: a taken
name is an error, never an overwrite), and at the end `finish` gathers the JSON entries (and the pixels
for the grid) on rank 0.

Backends: gloo on CPU; on CUDA "cpu:gloo,cuda:nccl", NCCL for CUDA tensors while the object collectives
used here (pickled lists and images, which live in CPU memory) go through gloo instead of a round trip
through GPU memory.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from sd_cli.errors import SdCliError, UsageError

# How long a rank waits in a collective. At the final gather a rank that finished its share waits for the
# slowest one: about one batch on equal hardware, hours when hosts differ in speed. A rank that dies is
# noticed at once (torchrun stops the job; gloo reports "connection closed"), not through this timeout.
TIMEOUT = datetime.timedelta(days=7)


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UsageError(f"{name} is not set (start many processes with torchrun, which sets it)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} in the environment is not a number (set by torchrun?)") from None


def shard(n_items: int, rank: int, world_size: int) -> range:
    """The work items of `rank`: j = rank, rank + world_size, ... (round robin).

    Round robin rather than contiguous blocks: consecutive items have about the same cost, so every rank
    gets within one item of the same work, and the short last batch of each iteration (a --from-file
    count not divisible by --n_samples) lands on different ranks instead of all on one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return range(rank, n_items, world_size)


@dataclass
class Share:
    """What one rank made, sent to rank 0 at the end."""

    rank: int
    images: list[tuple[int, int, dict]] = field(default_factory=list)  # (item, position in batch, JSON entry)
    pixels: dict[tuple[int, int], object] = field(default_factory=dict)  # (item, pos) -> (H, W, 3) uint8, for the grid
    steps: int = 0
    seconds: float = 0.0
    error: tuple[str, int] | None = None  # (one-line message, exit code) when this rank failed


class PeerFailed(SdCliError):
    """Raised on rank 0 when another rank failed (its own line is printed by that rank too)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Slot:
    """Rank 0's decision for one work item: per image, the existing file (--resume) or the number to write."""

    done: list[str | None]
    numbers: list[int | None]


def number_images(item_metas: list[list[dict]], plan, base: int | None) -> list[Slot]:
    """Per work item (in single-process order): which images exist already (`plan`: a ResumePlan or None)
    and the file number of each missing one, base + count of missing images before it (None: no saving)."""
    slots, next_number = [], base
    for metas in item_metas:
        done = plan.take_batch(metas) if plan is not None else [None] * len(metas)
        numbers: list[int | None] = []
        for path in done:
            new = path is None and next_number is not None
            numbers.append(next_number if new else None)
            if new:
                next_number += 1
        slots.append(Slot([str(p) if p is not None else None for p in done], numbers))
    return slots


def work_digest(item_metas: list[list[dict]]) -> str:
    """A hash of every image's work-item identity: equal on all ranks when they run the same job."""
    from sd_cli.run.resume import work_key

    keys = [work_key(meta) for metas in item_metas for meta in metas]
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()


def describe(err: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) of an exception, as the CLI would report it."""
    if isinstance(err, SdCliError):
        return str(err), err.exit_code
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        return "out of memory; try a smaller --H/--W or --n_samples", 1
    first = (str(err).strip().splitlines() or [""])[0]
    return f"unexpected {type(err).__name__}: {first}", 1


@dataclass
class Dist:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1
    failure: BaseException | None = field(default=None, compare=False)  # this rank's error, raised after the gather
    stopped: bool = field(default=False, compare=False)  # make nothing (the ranks disagree about the job)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n_items: int) -> range:
        return shard(n_items, self.rank, self.world_size)

    def threads(self, cores: int) -> int:
        """Default CPU threads: this host's cores split among its ranks (at least 1 each)."""
        return max(1, cores // self.local_world_size)

    def start(self, device):
        """Rendezvous (MASTER_ADDR/MASTER_PORT) and pick this rank's device: cuda:LOCAL_RANK on CUDA."""
        import torch
        import torch.distributed as dist

        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise SdCliError(f"LOCAL_RANK {self.local_rank}: this host has only {torch.cuda.device_count()} "
                                 "CUDA device(s); start at most that many processes per host (--nproc_per_node)")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, init_method="env://", rank=self.rank, world_size=self.world_size,
                                    timeout=TIMEOUT)
        except Exception as err:  # unreachable MASTER_ADDR, port in use, timeout, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SdCliError(f"rank {self.rank} of {self.world_size} could not join the job "
                             f"(MASTER_ADDR/MASTER_PORT): {first}") from None
        return device

    def _collective(self, op: Callable[[], None]) -> None:
        """Run one collective; a lost peer becomes one clear line instead of gloo's report."""
        try:
            op()
        except RuntimeError as err:  # DistBackendError, "Connection closed by peer", timeouts
            first = (str(err).strip().splitlines() or [""])[0]
            first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # no "[.../pair.cc:553]", one sentence
            raise SdCliError(f"lost contact with the other ranks (one crashed or was stopped?): {first}") from err

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, by rank, on rank 0; None on the others."""
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        self._collective(lambda: dist.gather_object(obj, out, dst=0))
        return out

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, by rank, on every rank."""
        import torch.distributed as dist

        out = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(out, obj))
        return out

    def plan_files(self, item_metas: list[list[dict]], plan, base: Callable[[], int] | None) -> list[Slot]:
        """Rank 0 numbers the images (see `number_images`; `base()` is the folder's next free number, None
        with --skip_save) and sends the result to all ranks. First all ranks check that they run the same
        job: if not, no rank makes anything (rank 0 and the odd ranks fail, the others stop quietly)."""
        digests = self.all_gather(work_digest(item_metas))
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            self.stopped = True
            why = ("would make other images than rank 0 (a different checkpoint, prompt file, config or flags "
                   "on its host?); every rank needs the same command and files")
            if self.rank in odd:
                self.failure = SdCliError(f"this rank {why}")
            elif self.is_main:
                self.failure = SdCliError(f"rank {', '.join(map(str, odd))} {why}")
        return self.broadcast(number_images(item_metas, plan, base() if base else None) if self.is_main and not odd
                              else None)

    def run_share(self, n_items: int, work: Callable[[int], None], done: Callable[[], None]) -> None:
        """`work(j)` for this rank's items; an error stops this rank's share and is kept for `finish`."""
        if self.stopped:
            return
        try:
            for j in self.share(n_items):
                work(j)
                done()
        except Exception as err:  # Ctrl-C (KeyboardInterrupt) is not caught: it ends the run at once
            self.failure = err

    def finish(self, share: Share) -> list[Share] | None:
        """Send `share` (with this rank's error, if any) to rank 0: every rank's share there, None elsewhere."""
        if self.failure is not None:
            share.error = describe(self.failure)
        shares = self.gather(share)
        global _LEAVE_TOGETHER
        _LEAVE_TOGETHER = True  # every rank got through the last collective: `close` may wait for all
        return shares

    def raise_failure(self, shares: list[Share] | None) -> None:
        """After `finish`: a failed rank raises its own error; rank 0 raises `PeerFailed` for the first
        other rank that failed (that rank prints its own line too)."""
        if self.failure is not None:
            raise self.failure
        failed = [s for s in shares or [] if s.error is not None]
        if failed:
            message, code = failed[0].error
            raise PeerFailed(f"rank {failed[0].rank} failed: {message}", code)


def from_env(environ: Mapping[str, str] | None = None) -> Dist | None:
    """The `Dist` of a process started by torchrun (RANK and WORLD_SIZE set), else None."""
    environ = os.environ if environ is None else environ
    if environ.get("RANK") is None and environ.get("WORLD_SIZE") is None:
        return None
    rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    local_rank = _env_int(environ, "LOCAL_RANK", 0)
    local_world = _env_int(environ, "LOCAL_WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} WORLD_SIZE={world}: the rank must be between 0 and WORLD_SIZE - 1")
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise UsageError(f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}: the local rank must be between "
                         "0 and LOCAL_WORLD_SIZE - 1")
    return Dist(rank, world, local_rank, local_world)


def merge(shares: list[Share], item_metas: list[list[dict]], slots: list[Slot]) -> tuple[list[dict], list[dict]]:
    """(images, skipped) JSON entries of the whole job in single-process order."""
    made = sorted((item for s in shares for item in s.images), key=lambda t: t[:2])
    images = [entry for _, _, entry in made]
    skipped = [{"path": path, **meta} for metas, slot in zip(item_metas, slots)
               for meta, path in zip(metas, slot.done) if path is not None]
    return images, skipped


def grid_pixels(shares: list[Share], slots: list[Slot], read_pixels: Callable[[Path], object]) -> list:
    """Every image's (H, W, 3) uint8 pixels in single-process order: made ones from the ranks, existing ones
    (--resume) read back from rank 0's folder."""
    made = {key: px for s in shares for key, px in s.pixels.items()}
    return [made[(j, i)] if path is None else read_pixels(Path(path))
            for j, slot in enumerate(slots) for i, path in enumerate(slot.done)]


# Set by `Dist.finish` once the final gather went through on this rank.
_LEAVE_TOGETHER = False


def close() -> None:
    """Leave the process group, if this process joined one (a no-op when torch was never imported).

    After a completed job the ranks first meet in a barrier, so that none tears down gloo while another
    is still finishing: without it a rank sometimes aborted at exit ("terminate called without an active
    exception", bench/results/NOTES.md). A job that did not get that far (a lost peer, Ctrl-C
    before the gather) skips the barrier: the other ranks may be in another collective, and waiting for
    them there would hang instead of failing.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return
    try:  # an import of torch that Ctrl-C cut short leaves a half-made module behind
        joined = dist.is_available() and dist.is_initialized()
    except Exception:  # noqa: BLE001
        return
    if joined:
        if _LEAVE_TOGETHER:
            try:
                dist.barrier()
            except RuntimeError:  # a peer already gone: leave anyway, the job's result is already out
                pass
        dist.destroy_process_group()
