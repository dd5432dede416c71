"""Issue 13, round 2 of hardening, the CLI side: stdout that cannot be written, signals at start-up and
SIGTERM, replay that checks metadata for real, bounded work, the seed range, non-UTF-8 paths, and the
small ones. Each test covers a failure reproduced on the code before the fix (the "before:" notes)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from micro_model import micro_argv
from PIL import Image, PngImagePlugin

from sd_cli.cli import main
from sd_cli.output.png import read_png_metadata

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env(tmp_path_factory) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.getbasetemp() / "hash-cache"),
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _defaults_for_child() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test run in the background inherits SIGINT ignored


def _run(cmd, tmp_path_factory, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(tmp_path_factory), capture_output=kw.pop("capture", True),
                          timeout=300, preexec_fn=_defaults_for_child, **kw)


def _cli(micro, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sd_cli", *micro_argv(micro, out, *extra)]


def _lines(err: bytes | str) -> list[str]:
    text = err.decode("utf-8", "replace") if isinstance(err, bytes) else err
    return [line for line in text.splitlines() if line.strip()]


# --- item 3: --json into a pipe that closed, a closed stdout, a full disk (before: tracebacks) ---------


def test_json_into_a_closed_pipe_exits_quietly_141(micro, tmp_path, tmp_path_factory):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before we write: EPIPE, deterministically
    try:
        r = _run(_cli(micro, tmp_path / "out", "--json"), tmp_path_factory, capture=False, stdout=write_end,
                 stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == b""  # quiet, as `yes | head` is
    assert (tmp_path / "out" / "samples" / "00000.png").is_file()  # the work is kept


def test_json_with_stdout_closed_is_one_line(micro, tmp_path, tmp_path_factory):
    cmd = ["bash", "-c", 'exec "$@" >&-', "sh", *_cli(micro, tmp_path / "out", "--json")]
    r = _run(cmd, tmp_path_factory)
    assert r.returncode == 1 and _lines(r.stderr) == ["sd-txt2img: error: standard output is closed; the report "
                                                       "was not written"], r.stderr


def test_json_onto_a_full_disk_is_one_line(micro, tmp_path, tmp_path_factory):
    with open("/dev/full", "wb") as full:
        r = _run(_cli(micro, tmp_path / "out", "--json"), tmp_path_factory, capture=False, stdout=full,
                 stderr=subprocess.PIPE)
    [line] = _lines(r.stderr)
    assert r.returncode == 1 and "No space left on device" in line and "Traceback" not in line


# --- items 4 and 6: Ctrl-C while loading, SIGTERM (before: "not a valid safetensors file", exit 143 bare) --


def test_ctrl_c_inside_the_checkpoint_reader_is_interrupted_not_corrupt(micro, tmp_path, capsys, monkeypatch):
    """A signal that lands inside a library can surface as that library's error; the run says
    'interrupted' and exits 130 (before: 'not a valid safetensors file ... truncated or corrupt?')."""
    import sd_cli.weights.loading as loading
    from sd_cli.errors import CheckpointError

    def read_interrupted(path):
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.5)  # the handler runs here
        except BaseException:  # noqa: BLE001 - what a C extension does: turn it into its own error
            raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?)") from None

    monkeypatch.setattr(loading, "read_state_dict", read_interrupted)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        monkeypatch.setattr(signal, "getsignal", lambda s, real=signal.getsignal: signal.default_int_handler
                            if s == signal.SIGINT else real(s))
    rc = main(micro_argv(micro, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 130 and "not a valid" not in err and "interrupted" in err, err


def test_close_survives_a_half_imported_torch_distributed(monkeypatch):
    """Ctrl-C during `import torch` left a half-made torch.distributed; close() raised AttributeError."""
    from sd_cli.run import distributed

    monkeypatch.setitem(sys.modules, "torch.distributed", types.ModuleType("torch.distributed"))
    distributed.close()  # no exception


def test_sigterm_keeps_finished_images_prints_the_report_and_exits_143(micro, tmp_path, tmp_path_factory):
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(micro, out, "--n_iter", "500", "--json"), cwd=REPO, env=_env(tmp_path_factory),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_defaults_for_child)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "samples").glob("*.png")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    report = json.loads(stdout)
    assert report["interrupted"] and not report["ok"]
    assert sorted(Path(i["path"]).name for i in report["images"]) == sorted(p.name for p in (out / "samples").glob("*.png"))
    assert not list(out.rglob("*.tmp")) and stderr.strip().splitlines()[-1].startswith("interrupted: kept")


@pytest.mark.slow
def test_signals_at_random_moments_of_start_up(micro, tmp_path, tmp_path_factory):
    """SIGINT or SIGTERM at 20 random moments from the interpreter running our code to the first image:
    always 130 or 143, at most one line on stderr, never a traceback. (A signal in the first few
    milliseconds, before Python has loaded our module, ends the process by the signal's default action,
    which a shell reports as the same 130 or 143, with no output: accepted as such.)"""
    rng = random.Random(13)
    first_image = 6.0
    for k in range(20):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        out = tmp_path / f"out{k}"
        proc = subprocess.Popen(_cli(micro, out, "--n_iter", "50"), cwd=REPO, env=_env(tmp_path_factory),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_defaults_for_child)
        time.sleep(rng.uniform(0.0, first_image))
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        code = {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
        assert "Traceback" not in stderr, (k, stderr)
        assert proc.returncode in (code, -sig, 0), (k, proc.returncode, stderr)  # 0: it had already finished
        if proc.returncode == -sig:
            assert stderr == "", (k, sig, stderr)
        elif proc.returncode == code:
            assert len(_lines(stderr)) <= 1, (k, stderr)


# --- item 5: replay checks the metadata too (before: an edited image replayed "identical", exit 0) -------


def _one_image(micro, out: Path, capsys) -> Path:
    assert main(micro_argv(micro, out)) == 0
    capsys.readouterr()
    return out / "samples" / "00000.png"


def _resave(src: Path, dst: Path, parameters: str, meta: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("sd_cli", json.dumps(meta))
    with Image.open(src) as im:
        im.save(dst, pnginfo=info)
    return dst


def test_replay_of_an_edited_parameters_text_differs(micro, tmp_path, capsys):
    path = _one_image(micro, tmp_path / "out", capsys)
    with Image.open(path) as im:
        text, meta = im.info["parameters"], json.loads(im.info["sd_cli"])
    edited = _resave(path, tmp_path / "edited.png", text.replace("Seed: 42", "Seed: 7"), meta)
    args = ["--ckpt", str(micro["safetensors"]), "--config", str(micro["config"]), "-q"]
    assert main(["--replay", str(path), *args]) == 0
    assert capsys.readouterr().out.startswith("identical")
    assert main(["--replay", str(edited), *args]) == 1
    assert "parameters text is not the one its settings write" in capsys.readouterr().out


def test_forced_replay_with_another_model_file_differs_in_metadata(micro, tmp_path, capsys):
    """The .ckpt holds the same weights as the .safetensors (same pixels) but is another file (another
    hash): with --force the pixels match and the verdict names model_hash."""
    path = _one_image(micro, tmp_path / "out", capsys)
    rc = main(["--replay", str(path), "--ckpt", str(micro["ckpt"]), "--config", str(micro["config"]), "--force",
               "-q", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["identical"] and report["metadata_differs"] == ["model_hash"]


# --- items 7 and 9: bounded work, the seed range (before: 5.3 GB then "--H/--W"; seeds past 2**63-1) ------


@pytest.mark.parametrize("extra, words", [
    (["--n_iter", "1000000000"], "more than 1,000,000"),
    (["--n_samples", "100000"], "at most 256 images per batch"),
    (["--seed", str(2**63 - 1), "--n_iter", "3"], "past 2**63-1"),
])
def test_too_much_work_is_a_usage_error_before_anything_runs(micro, tmp_path, capsys, extra, words):
    t0 = time.monotonic()
    rc = main([*micro_argv(micro, tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and time.monotonic() - t0 < 30, err
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_is_written_and_replays(micro, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*micro_argv(micro, out), "--seed", str(2**63 - 2), "--n_iter", "2"]) == 0
    capsys.readouterr()
    last = sorted((out / "samples").glob("*.png"))[-1]
    assert main(["--replay", str(last), "--ckpt", str(micro["safetensors"]), "--config", str(micro["config"]),
                 "-q"]) == 0
    assert capsys.readouterr().out.startswith("identical")


# --- item 10: non-UTF-8 paths (before: "surrogates not allowed" after the whole run; invalid UTF-8 JSON) ---


def test_ckpt_and_outdir_at_non_utf8_paths(micro, tmp_path, tmp_path_factory):
    odd = os.fsencode(tmp_path) + b"/m\xff"
    os.mkdir(odd)
    ckpt = odd + b"/model\xfe.ckpt"
    with open(micro["ckpt"], "rb") as src, open(ckpt, "wb") as dst:
        dst.write(src.read())
    out = odd + b"/out\xfd"
    argv = [a if a not in (str(micro["ckpt"]), str(tmp_path / "x")) else a for a in micro_argv(micro, tmp_path / "x",
                                                                                               fmt="ckpt")]
    argv = [os.fsencode(a) for a in argv]
    argv[argv.index(os.fsencode(str(micro["ckpt"])))] = ckpt
    argv[argv.index(os.fsencode(str(tmp_path / "x")))] = out
    r = _run([sys.executable, "-m", "sd_cli", *argv, b"--json"], tmp_path_factory)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.decode("utf-8"))  # valid UTF-8, the odd bytes escaped
    assert len(report["images"]) == 1 and os.path.isfile(out + b"/samples/00000.png")


# --- item 12, and issue 12 item 6 (before: silent, or 0.0) --------------------------------------------


@pytest.mark.parametrize("extra, words", [
    (["--outdir", ""], '--outdir ""'),
    (["--force"], "--force only applies to --replay"),
    (["--prompt", "x", "--from-file", "prompts.txt"], "--prompt and --from-file"),
])
def test_ignored_flag_combinations_are_usage_errors(micro, tmp_path, capsys, extra, words):
    (tmp_path / "prompts.txt").write_text("a\n")
    argv = [a if a != "prompts.txt" else str(tmp_path / "prompts.txt") for a in extra]
    rc = main([*micro_argv(micro, tmp_path / "out"), *argv])
    assert rc == 2 and words in capsys.readouterr().err


def test_argparse_usage_errors_print_json_like_the_others(capsys):
    assert main(["--json", "--n_samples", "many"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False and "--n_samples" in report["error"] and len(_lines(captured.err)) == 1


def test_a_failed_run_leaves_no_empty_folders(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--ckpt", str(tmp_path / "missing.safetensors"), "--outdir", str(out), "-q"]) == 1
    assert not out.exists()


def test_quiet_demo_run_prints_nothing_and_counts_steps(tmp_path, capsys, monkeypatch):
    from sd_cli.demo import demo_available

    if not demo_available():
        pytest.skip("no demo model in this checkout")
    monkeypatch.chdir(tmp_path)
    assert main(["--n_iter", "1", "--n_samples", "1", "--steps", "3", "--json", "-q", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # -q: errors only (no demo note, no watermark warning)
    report = json.loads(captured.out)
    assert report["seconds_per_step"] > 0  # counted by the run, not by the disabled progress bar


def test_safetensors_at_a_non_utf8_path_loads(micro, tmp_path, tmp_path_factory):
    """Before: 'not a valid safetensors file (Path ... is not valid UTF-8); truncated or corrupt?'."""
    odd = os.fsencode(tmp_path) + b"/m\xff"
    os.mkdir(odd)
    with open(micro["safetensors"], "rb") as src, open(odd + b"/model\xfe.safetensors", "wb") as dst:
        dst.write(src.read())
    argv = [os.fsencode(a) for a in micro_argv(micro, tmp_path / "out")]
    argv[argv.index(os.fsencode(str(micro["safetensors"])))] = odd + b"/model\xfe.safetensors"
    r = _run([sys.executable, "-m", "sd_cli", *argv], tmp_path_factory)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "samples" / "00000.png").is_file()


def test_a_256px_image_marked_by_an_older_version_still_replays(micro, tmp_path, capsys):
    """Below the new 512x512 threshold nothing is marked now, but files made before it at 256x256 carry
    the mark and `watermark: true`: replay marks its regenerated image the same way."""
    from sd_cli.output.watermark import apply_watermark

    out = tmp_path / "out"
    argv = [a for a in micro_argv(micro, out, "--H", "256", "--W", "256") if a != "--no-watermark"]
    assert main(argv) == 0
    capsys.readouterr()
    path = out / "samples" / "00000.png"
    with Image.open(path) as im:
        meta, text = json.loads(im.info["sd_cli"]), im.info["parameters"]
        pixels = np.asarray(im.convert("RGB"))
    assert meta["watermark"] is False
    old = _resave_pixels(apply_watermark(pixels, force=True), tmp_path / "old.png", text, {**meta, "watermark": True})
    assert main(["--replay", str(old), "--ckpt", str(micro["safetensors"]), "--config", str(micro["config"]),
                 "-q"]) == 0
    assert capsys.readouterr().out.startswith("identical")


def _resave_pixels(pixels, dst: Path, parameters: str, meta: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("sd_cli", json.dumps(meta))
    Image.fromarray(pixels).save(dst, pnginfo=info)
    return dst


def test_warnings_print_above_a_progress_bar(monkeypatch, capsys):
    """Item 12: a warning during sampling goes through tqdm.write, so it never lands inside a bar's line."""
    import tqdm

    from sd_cli.run.report import Log

    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, **k: written.append(s)))
    Log().warn("the VAE decode was redone in float32")
    assert written == ["warning: the VAE decode was redone in float32"] and capsys.readouterr().err == ""


# --- issue 14 part 4: per-image seeds (A1111's rule), old images replay with the batch rule -----------


def test_each_image_has_its_own_seed_and_can_be_made_alone(micro, tmp_path, capsys):
    import torch

    out = tmp_path / "out"
    assert main([*micro_argv(micro, out, "--n_samples", "3", "--n_iter", "2")]) == 0
    metas = [read_png_metadata(out / "samples" / f"{i:05}.png")[1] for i in range(6)]
    assert [m["seed"] for m in metas] == [42 + i for i in range(6)] and {m["seed_rule"] for m in metas} == {"image"}
    alone = tmp_path / "alone"
    assert main([*micro_argv(micro, alone, "--seed", "46")]) == 0
    with Image.open(out / "samples" / "00004.png") as a, Image.open(alone / "samples" / "00000.png") as b:
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1  # batch numerics aside
    # A batch of one: the start noise is torch.randn((1, 4, h, w), generator=Generator("cpu").manual_seed(S)).
    from sd_cli.run.api import StableDiffusion
    from sd_cli.run.settings import Generation

    sd = StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), threads=1)
    seen = []
    real = sd.pipeline().latents  # (the render path: latents, then decode)
    sd.pipeline().latents = lambda prompts, noise, **kw: seen.append(noise.clone()) or real(prompts, noise, **kw)
    gen = Generation.create(["x"], sampler="ddim", steps=2, height=64, width=64, seed=9)
    sd.render(gen, sd.plan(gen)[0])
    assert torch.equal(seen[0], torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(9)))
    capsys.readouterr()


def test_an_image_made_with_the_batch_seed_rule_still_replays(micro, tmp_path, capsys):
    """Images from before the per-image rule have no seed_rule: their batch shared seed + k and one
    generator. Made here with that rule (as the old code did) and stripped of the field, they replay."""
    from sd_cli.output.a1111 import a1111_text
    from sd_cli.run.api import StableDiffusion
    from sd_cli.run.settings import Generation

    sd = StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), threads=1)
    gen = Generation.create(["a cube"], sampler="euler_a", steps=3, height=64, width=64, seed=5, n_samples=2,
                            seed_rule="batch", watermark=False)
    item = sd.plan(gen)[0]
    pixels = sd.render(gen, item)[1]
    meta = {k: v for k, v in item.metas[1].items() if k != "seed_rule"}
    old = _resave_pixels(pixels, tmp_path / "old.png", a1111_text(meta, "karras"), meta)
    assert main(["--replay", str(old), "--ckpt", str(micro["safetensors"]), "--config", str(micro["config"]),
                 "-q"]) == 0
    assert capsys.readouterr().out.startswith("identical")


def test_a_1mb_prompt_line_is_refused_after_a_bounded_look(tmp_path):
    """Item 8 with the prompt language: prompts may be long (chunks of 75) but at most 7500 tokens; the
    tokenizer stops counting just past that, so a 1 MB line is refused in a fraction of a second (0.22 s
    measured on this project's 2-core machine; the bound here is loose on purpose)."""
    import string

    from sd_cli.errors import UsageError
    from sd_cli.run.settings import Generation

    rng = random.Random(8)
    for line in ("".join(rng.choice(string.ascii_lowercase) for _ in range(1 << 20)),
                 " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(1 << 17))):
        t0 = time.perf_counter()
        with pytest.raises(UsageError, match="more than 7500 tokens"):
            Generation.create([line])
        assert time.perf_counter() - t0 < 10
    assert Generation.create([", ".join(["cat"] * 300)]).prompts  # a long real prompt (600 tokens) is fine
