"""Many processes (issue 6): two CPU ranks with gloo on the micro model (tests/micro_model.py) make the same
files, bytes included, as one process; file numbers come from the work item; rank 0 reports the whole job;
a failed job is finished with --resume, numbered as one process would number it.

The ranks are real processes: once through torchrun itself, otherwise started with the variables torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which gives each rank's
own exit code and output."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from micro_model import micro_argv, micro_checkpoints
from sd_cli.cli import main
from sd_cli.run.distributed import Dist, Slot, from_env, merge, number_images, shard
from sd_cli.errors import OutputError, UsageError
from sd_cli.output.png import SAMPLE_PATTERN, save_png

REPO = Path(__file__).resolve().parent.parent
PROMPTS = "a red cube\na blue ball\na green cone\na yellow ring\na white star\n"
# 5 prompts in batches of 2 (the last one short), 2 iterations: 6 work items, 10 images.
EXTRA = ["--n_samples", "2", "--n_iter", "2", "--json"]
RANK0_ITEMS = (0, 2, 4)  # round robin over 2 ranks: 2 + 1 + 2 images, numbers 0 1, 4, 7 8
TIMEOUT = 300


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_checkpoints(tmp_path_factory.getbasetemp() / "micro_model")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = str(tmp_path_factory.getbasetemp() / "hash-cache")
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {**clean, "XDG_CACHE_HOME": cache, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def job(micro, tmp_path_factory, env):
    """(argv of the job without --outdir's folder, reference folder, reference JSON): one process, in-process."""
    d = tmp_path_factory.mktemp("dist")
    prompts = d / "prompts.txt"
    prompts.write_text(PROMPTS)

    def argv(outdir: Path, *more: str) -> list[str]:
        return micro_argv(micro, outdir, "--from-file", str(prompts), *EXTRA, *more)

    ref = d / "one_process"
    rc, report = run_here(argv(ref), env)
    assert rc == 0 and len(report["images"]) == 10
    return argv, ref, report


def run_here(argv: list[str], env: dict) -> tuple[int, dict]:
    """The CLI in this process (one process), with the subprocesses' hash cache; (exit code, JSON)."""
    out = io.StringIO()
    before, torch_threads = os.environ.get("XDG_CACHE_HOME"), torch.get_num_threads()
    os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
    try:
        with contextlib.redirect_stdout(out):
            rc = main(argv)
    finally:
        torch.set_num_threads(torch_threads)
        if before is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = before
    return rc, json.loads(out.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argvs: list[list[str]], env: dict) -> list[tuple[int, str, str]]:
    """One rank per argv list (a whole python command line after `python`), as torchrun would start them on
    one host; (exit code, stdout, stderr) of each."""
    world, port = len(argvs), str(free_port())
    procs = []
    for rank, argv in enumerate(argvs):
        rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def files_of(outdir: Path) -> dict[str, bytes]:
    """{relative name: bytes} of every file under outdir."""
    return {str(p.relative_to(outdir)): p.read_bytes() for p in sorted(outdir.rglob("*")) if p.is_file()}


def relative(report: dict, outdir: Path) -> list[dict]:
    """The JSON image entries with paths relative to outdir (runs into different folders compare equal)."""
    return [{**e, "path": str(Path(e["path"]).relative_to(outdir))} for e in report["images"]]


# --------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("n_items", [0, 1, 5, 6, 17])
def test_shard_gives_every_item_to_exactly_one_rank(n_items, world):
    shares = [list(shard(n_items, rank, world)) for rank in range(world)]
    assert sorted(j for s in shares for j in s) == list(range(n_items))  # every item once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced within one item
    assert shares == [list(shard(n_items, rank, world)) for rank in range(world)]  # deterministic
    assert shares[0][:2] == list(range(0, n_items, world))[:2]  # round robin: j goes to j % world
    with pytest.raises(ValueError):
        shard(n_items, world, world)


def test_from_env():
    assert from_env({}) is None  # one process
    assert from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}) == Dist(3, 8, 1, 4)
    assert from_env({"RANK": "0", "WORLD_SIZE": "1"}) == Dist(0, 1, 0, 1)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "0"},
                {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}):
        with pytest.raises(UsageError):
            from_env(bad)
    assert Dist(0, 4, 0, 4).threads(16) == 4 and Dist(0, 4, 0, 4).threads(2) == 1


class _Plan:
    """A ResumePlan stand-in: the images whose prompt is in `present` are done."""

    def __init__(self, present: set[str]):
        self.present = present

    def take_batch(self, metas):
        return [f"/old/{m['prompt']}.png" if m["prompt"] in self.present else None for m in metas]


def test_numbers_are_those_one_process_gives():
    items = [[{"prompt": p} for p in batch] for batch in (["a", "b"], ["c"], ["d", "e"], ["f", "g"])]
    slots = number_images(items, None, 7)  # fresh run into a folder whose next free number is 7
    assert [s.numbers for s in slots] == [[7, 8], [9], [10, 11], [12, 13]]
    assert all(s.done == [None] * len(s.numbers) for s in slots)
    # --resume: one process writes the missing images at the next free numbers, in order.
    slots = number_images(items, _Plan({"a", "b", "d", "g"}), 20)
    assert [s.numbers for s in slots] == [[None, None], [20], [None, 21], [22, None]]
    assert slots[0].done == ["/old/a.png", "/old/b.png"] and slots[3].done == [None, "/old/g.png"]
    assert [s.numbers for s in number_images(items, None, None)] == [[None, None], [None], [None, None], [None, None]]


def test_merge_lists_the_job_in_one_process_order():
    from sd_cli.run.distributed import Share

    items = [[{"prompt": "a"}, {"prompt": "b"}], [{"prompt": "c"}], [{"prompt": "d"}]]
    slots = [Slot(["/x/0.png", None], [None, 5]), Slot([None], [6]), Slot(["/x/1.png"], [None])]
    shares = [Share(0, images=[(0, 1, {"path": "5"})]), Share(1, images=[(1, 0, {"path": "6"})])]
    images, skipped = merge(shares[::-1], items, slots)
    assert images == [{"path": "5"}, {"path": "6"}]
    assert skipped == [{"path": "/x/0.png", "prompt": "a"}, {"path": "/x/1.png", "prompt": "d"}]


def test_save_png_exact_number_never_overwrites(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    assert save_png(tmp_path, SAMPLE_PATTERN, img, parameters="p", metadata={}, start_index=4, exact=True).name \
        == "00004.png"
    before = (tmp_path / "00004.png").read_bytes()
    with pytest.raises(OutputError, match="00004.png: that file already exists"):
        save_png(tmp_path, SAMPLE_PATTERN, img + 1, parameters="q", metadata={}, start_index=4, exact=True)
    assert (tmp_path / "00004.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00004.png"]  # no temp file left


# --------------------------------------------------------------------------------------------------
# Two ranks, end to end
# --------------------------------------------------------------------------------------------------


def test_torchrun_two_ranks_make_the_files_of_one_process(job, env, tmp_path):
    argv, ref, ref_report = job
    out = tmp_path / "two_ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "sd_cli", *argv(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert files_of(out) == files_of(ref)  # same names, same bytes: 10 samples and the grid
    lines = proc.stdout.splitlines()
    assert len(lines) == 1  # only rank 0 prints, one JSON object for the whole job
    report = json.loads(lines[0])
    assert report["ok"] and relative(report, out) == relative(ref_report, ref)
    assert report["grid"] == str(out / "grid-0000.png")


def test_resume_finishes_a_killed_one_process_run(job, env, tmp_path):
    argv, ref, _ = job
    out = tmp_path / "killed"
    (out / "samples").mkdir(parents=True)
    for i in range(3):  # what a run killed after 3 images leaves (test_resume_replay checks that)
        shutil.copy(ref / "samples" / f"{i:05}.png", out / "samples")
    cmd = ["-m", "sd_cli", *argv(out, "--resume")]
    (rc0, out0, err0), (rc1, out1, err1) = launch([cmd, cmd], env)
    assert (rc0, rc1) == (0, 0), err0 + err1
    assert files_of(out) == files_of(ref)
    assert out1 == "" and err1 == ""  # rank 1 is quiet (-q); rank 0 speaks for the job
    report = json.loads(out0)
    assert [Path(e["path"]).name for e in report["skipped"]] == ["00000.png", "00001.png", "00002.png"]
    assert [Path(e["path"]).name for e in report["images"]] == [f"{i:05}.png" for i in range(3, 10)]


FAIL_ON_RANK_1 = """\
import sys
import sd_cli.pipeline.generate

def boom(self, *args, **kwargs):
    raise RuntimeError("boom")

sd_cli.pipeline.generate.Pipeline.latents = boom
from sd_cli.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_failed_rank_then_resume_ends_as_one_process_resume(job, env, tmp_path):
    argv, ref, _ = job
    out = tmp_path / "failed"
    (rc0, out0, err0), (rc1, out1, err1) = launch([["-m", "sd_cli", *argv(out)],
                                                   ["-c", FAIL_ON_RANK_1, *argv(out)]], env)
    # Each failed process says so in one line; rank 0 names the failed rank and lists what was written.
    assert (rc0, rc1) == (1, 1), err0 + err1
    assert err1.splitlines() == ["sd-txt2img: error: [rank 1] unexpected RuntimeError: boom "
                                 "(run again with --debug for the traceback)"] and out1 == ""
    assert err0.splitlines() == ["sd-txt2img: error: rank 1 failed: unexpected RuntimeError: boom (5 image(s) "
                                 "written before it are kept; to finish, run the same command again with --resume)"]
    report = json.loads(out0)
    assert not report["ok"] and report["grid"] is None
    written = ["00000.png", "00001.png", "00004.png", "00007.png", "00008.png"]  # items 0, 2, 4: exact numbers
    assert [Path(e["path"]).name for e in report["images"]] == written
    assert sorted(files_of(out)) == [f"samples/{name}" for name in written]
    for name in written:
        assert (out / "samples" / name).read_bytes() == (ref / "samples" / name).read_bytes()

    # --resume with two ranks numbers the missing images exactly as one process does (after the highest).
    single = tmp_path / "single_resume"
    shutil.copytree(out, single)
    rc, _ = run_here(argv(single, "--resume"), env)
    assert rc == 0
    cmd = ["-m", "sd_cli", *argv(out, "--resume")]
    (rc0, out0, err0), (rc1, _, err1) = launch([cmd, cmd], env)
    assert (rc0, rc1) == (0, 0), err0 + err1
    assert files_of(out) == files_of(single)
    # ... and the job is complete: every image of the uninterrupted run once, bytes equal, and its grid.
    samples = lambda d: sorted(v for k, v in files_of(d).items() if k.startswith("samples/"))  # noqa: E731
    assert samples(out) == samples(ref)
    assert (out / "grid-0000.png").read_bytes() == (ref / "grid-0000.png").read_bytes()
    report = json.loads(out0)
    assert len(report["skipped"]) == 5 and len(report["images"]) == 5


@pytest.mark.slow  # two more processes (~13 s on 2 busy cores); the check itself is a few lines
def test_ranks_running_different_jobs_are_refused(job, env, tmp_path):
    argv, _, _ = job
    out = tmp_path / "mismatch"
    (rc0, out0, err0), (rc1, _, err1) = launch([["-m", "sd_cli", *argv(out)],
                                                ["-m", "sd_cli", *argv(out, "--seed", "7")]], env)
    assert (rc0, rc1) == (1, 1)
    why = ("would make other images than rank 0 (a different checkpoint, prompt file, config or flags on its "
           "host?); every rank needs the same command and files")
    assert err1.splitlines() == [f"sd-txt2img: error: [rank 1] this rank {why}"]
    assert err0.splitlines() == [f"sd-txt2img: error: rank 1 {why}"]
    assert json.loads(out0)["images"] == []
    assert not any((out / "samples").iterdir())  # checked before anything is made
