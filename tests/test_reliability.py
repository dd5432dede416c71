"""Reliability through the command line: bad checkpoints, NaN guard, Ctrl-C, disk full, parallel runs,
prompt files. Uses the micro model (tests/micro_model.py) so every run is quick."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO, save_lightning_ckpt
from micro_model import micro_argv
from sd_cli.output import png as images
from sd_cli.cli import main
from sd_cli.errors import PromptFileError
from sd_cli.output.png import read_png_metadata
from sd_cli.run.prompts import parse_prompts, read_prompt_file
from sd_cli.run.resume import deferred_interrupt


pytestmark = pytest.mark.usefixtures("private_hash_cache", "one_torch_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def micro_sd(micro):
    from safetensors.torch import load_file

    return load_file(str(micro["safetensors"]))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sd-txt2img: error: ") and "Traceback" not in err, err
    return lines[0]


def pngs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.png")) if directory.exists() else []


def no_temp_files(*dirs: Path) -> bool:
    return not any(p.name.startswith(".sd_cli-") for d in dirs if d.exists() for p in d.iterdir())


def assert_complete_png(path: Path) -> dict:
    with Image.open(path) as im:
        im.verify()  # all chunks present, CRCs good
    with Image.open(path) as im:
        im.load()  # the pixel data decodes to the end
        assert im.size == (64, 64)
    return read_png_metadata(path)[1]


# --------------------------------------------------------------------------------------------------
# Bad checkpoints: one line naming the problem, exit 1, nothing written
# --------------------------------------------------------------------------------------------------


class Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


UNET_OUT = "model.diffusion_model.out.2.weight"  # (4, 32, 3, 3)
VAE_OUT = "first_stage_model.decoder.conv_out.weight"  # (3, 32, 3, 3)


def _with(sd: dict, key: str, value: torch.Tensor) -> dict:
    return {**sd, key: value}


def _nan_at(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[5] = value
    return t


def _lying_header(data: bytes) -> bytes:
    """The tensor stored last claims 1000 more rows than the file holds (offsets and shape agree)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    entry = header[name]
    row = (entry["data_offsets"][1] - entry["data_offsets"][0]) // entry["shape"][0]
    entry["shape"][0] += 1000
    entry["data_offsets"][1] += 1000 * row
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _make_bad(case: str, micro: dict, sd: dict, d: Path) -> tuple[Path, str]:
    """(file, words the error must contain) for one kind of bad checkpoint."""
    from safetensors.torch import save_file

    st_bytes, ckpt_bytes = micro["safetensors"].read_bytes(), micro["ckpt"].read_bytes()
    path = d / (case + (".ckpt" if "ckpt" in case or case in ("code-execution", "inf-weight") else ".safetensors"))
    if case == "zero-bytes":
        path.write_bytes(b"")
        return path, "0 bytes"
    if case == "truncated-safetensors":
        path.write_bytes(st_bytes[: len(st_bytes) // 2])
        return path, "not a valid safetensors file"
    if case == "truncated-ckpt":
        path.write_bytes(ckpt_bytes[: len(ckpt_bytes) * 2 // 3])
        return path, "truncated"
    if case == "wrong-magic-ckpt":
        # Fixed bytes: random ones made byte 8 a "{" (the safetensors header's start) 1 time in 256.
        path.write_bytes(b"GIF89a" + bytes(range(256)) * 16)
        return path, "unrecognised content"
    if case == "lying-header":
        path.write_bytes(_lying_header(st_bytes))
        return path, "not a valid safetensors file"
    if case == "code-execution":
        marker = d / "pwned"
        save_lightning_ckpt({**sd, "evil": Reduce(os.system, f"touch {marker}")}, path)
        return path, "unsafe"
    if case == "wrong-shape":
        save_file(_with(sd, VAE_OUT, sd[VAE_OUT].reshape(3, 32, 9).contiguous()), str(path))
        return path, f"{VAE_OUT}: file (3, 32, 9) vs config (3, 32, 3, 3)"
    if case == "wrong-dtype":
        save_file(_with(sd, UNET_OUT, sd[UNET_OUT].to(torch.int32)), str(path))
        return path, f"tensor {UNET_OUT} has dtype torch.int32, expected floating point"
    if case == "nan-weight":
        save_file(_with(sd, UNET_OUT, _nan_at(sd[UNET_OUT], float("nan"))), str(path))
        return path, f"tensor {UNET_OUT} holds 1 NaN value(s)"
    if case == "inf-weight":
        save_lightning_ckpt(_with(sd, VAE_OUT, _nan_at(sd[VAE_OUT], float("-inf"))), path)
        return path, f"tensor {VAE_OUT} holds 1 inf value(s)"
    if case == "missing-key":
        save_file({k: v for k, v in sd.items() if k != UNET_OUT}, str(path))
        return path, f"1 missing ({UNET_OUT})"
    raise AssertionError(case)


BAD_CASES = ["zero-bytes", "truncated-safetensors", "truncated-ckpt", "wrong-magic-ckpt", "lying-header",
             "code-execution", "wrong-shape", "wrong-dtype", "nan-weight", "inf-weight", "missing-key"]


def test_bad_checkpoints_are_one_line_exit_1(micro, micro_sd, tmp_path, capsys):
    for case in BAD_CASES:
        d = tmp_path / case
        d.mkdir()
        path, words = _make_bad(case, micro, micro_sd, d)
        argv = micro_argv(micro, d / "out")
        argv[argv.index("--ckpt") + 1] = str(path)
        rc = main(argv)
        line = one_error_line(capsys.readouterr().err)
        assert rc == 1, (case, line)
        assert words in line and str(path) in line, (case, line)
        assert pngs(d / "out" / "samples") == [] and pngs(d / "out") == [], case
        assert not (d / "pwned").exists()  # the os.system payload never ran


def test_half_precision_overflow_is_named(micro, micro_sd, tmp_path):
    """A float32 weight too large for float16 would load as inf: refused, with the way out."""
    from safetensors.torch import save_file

    from sd_cli.weights.config import load_config
    from sd_cli.errors import CheckpointError
    from sd_cli.weights.loading import load_model

    path = tmp_path / "big.safetensors"
    save_file(_with(micro_sd, UNET_OUT, _nan_at(micro_sd[UNET_OUT], 1e6)), str(path))
    cfg = load_config(micro["config"])
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(UNET_OUT)} has values up to 1e\+06, too large "
                                              r"for float16; use --precision full"):
        load_model(cfg.model, path, dtype=torch.float16)
    load_model(cfg.model, path, dtype=torch.float32)  # fine in float32


# --------------------------------------------------------------------------------------------------
# NaN guard: never a black image written silently
# --------------------------------------------------------------------------------------------------


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize(
    "stage, target, replacement, words",
    [
        ("unet", "sd_cli.model.ldm.LatentDiffusion.unet", lambda self, x, t, c: _nan_like(x),
         "sampling (ddim) produced non-finite latents (NaN/inf) at step 1 of"),
        ("vae", "sd_cli.model.vae.AutoencoderKL.decode",
         lambda self, z: torch.full((z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8), float("nan")),
         "the VAE decode produced non-finite pixels (NaN/inf)"),
        ("text", "sd_cli.model.ldm.LatentDiffusion.encode_text",
         lambda self, ids: torch.full((ids.shape[0], 77, 32), float("nan")),
         "the text encoder produced non-finite values (NaN/inf)"),
    ],
)
def test_nan_guard_stops_naming_the_stage(micro, tmp_path, capsys, monkeypatch, stage, target, replacement, words):
    monkeypatch.setattr(target, replacement)
    rc = main(micro_argv(micro, tmp_path / "out", "--n_iter", "2", "--json"))
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert rc == 1 and words in line, line
    assert "float32" in line  # the hint fits the precision that ran
    assert pngs(tmp_path / "out" / "samples") == [] and pngs(tmp_path / "out") == []  # no black image
    assert json.loads(captured.out)["ok"] is False


def test_nan_guard_gpu_path_names_the_first_bad_step(micro, tmp_path, capsys, monkeypatch):
    """The path used on GPUs (flags kept on the device, read once after the loop), run on the CPU."""
    from sd_cli.model.ldm import LatentDiffusion
    from sd_cli.pipeline.generate import Pipeline

    real_unet, calls = LatentDiffusion.unet, []

    def unet(self, x, t, c):  # good first step, NaN from the second on
        calls.append(1)
        return real_unet(self, x, t, c) if len(calls) < 2 else _nan_like(x)

    monkeypatch.setattr(Pipeline, "eager_nan_check", False)
    monkeypatch.setattr(LatentDiffusion, "unet", unet)
    rc = main(micro_argv(micro, tmp_path / "out", "--ddim_steps", "4"))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "sampling (ddim) produced non-finite latents (NaN/inf) at step 2 of" in line
    assert len(calls) >= 4  # no early stop on this path: the loop ran to its end, then the error
    assert pngs(tmp_path / "out" / "samples") == [] and pngs(tmp_path / "out") == []


def test_nan_in_a_later_batch_keeps_the_earlier_images(micro, tmp_path, capsys, monkeypatch):
    from sd_cli.model.ldm import LatentDiffusion
    from sd_cli.pipeline.generate import Pipeline

    real_latents, real_unet = Pipeline.latents, LatentDiffusion.unet
    batches = []

    def counting_latents(self, *args, **kwargs):  # one call per batch (the render path's sampling)
        batches.append(1)
        return real_latents(self, *args, **kwargs)

    def unet(self, x, t, c):  # fine for the first batch, NaN from the second on
        return real_unet(self, x, t, c) if len(batches) < 2 else _nan_like(x)

    monkeypatch.setattr(Pipeline, "latents", counting_latents)
    monkeypatch.setattr(LatentDiffusion, "unet", unet)
    rc = main(micro_argv(micro, tmp_path / "out", "--n_iter", "3"))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "at step 1 of" in line
    assert "1 image(s) written before it are kept" in line and "--resume" in line
    assert pngs(tmp_path / "out" / "samples") == ["00000.png"]
    assert_complete_png(tmp_path / "out" / "samples" / "00000.png")


# --------------------------------------------------------------------------------------------------
# Nothing lost: Ctrl-C, disk full, two runs into one folder
# --------------------------------------------------------------------------------------------------


def _env(tmp_path_factory) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.getbasetemp() / "hash-cache"),
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default. A test run started in the background
    (`cmd &` in a script, nohup) inherits SIGINT ignored, and Python then rightly never turns it into
    KeyboardInterrupt, so the tool would never see the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_handled():
    """This process turns SIGINT into KeyboardInterrupt during the test, even if it was started with SIGINT
    ignored (see _sigint_default)."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_keeps_finished_images_and_exits_130(micro, tmp_path, tmp_path_factory):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sd_cli", *micro_argv(micro, out, "--n_iter", "500")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path_factory), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 240
        while not pngs(out / "samples"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no image after 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    written = pngs(out / "samples")
    m = re.fullmatch(r"interrupted: kept (\d+) images? in (.+) \(.*\); to finish, run the same command again "
                     r"with --resume", stderr.strip().splitlines()[-1])
    assert m, stderr
    assert int(m.group(1)) == len(written) and 1 <= len(written) < 500  # the summary counts what is on disk
    assert written == [f"{i:05}.png" for i in range(len(written))]
    for i, name in enumerate(written):
        meta = assert_complete_png(out / "samples" / name)
        assert meta["iteration"] == i and meta["seed"] == 42 + i
    assert no_temp_files(out, out / "samples")
    assert pngs(out) == []  # no grid of an unfinished run


def test_disk_full_is_one_line_and_keeps_earlier_files(micro, tmp_path, capsys, monkeypatch):
    real_write = images.write_png
    calls = []

    def disk_fills_up(f, img, parameters, metadata):
        calls.append(1)
        if len(calls) > 2:
            f.write(b"\x89PNG partial")  # some bytes reach the temp file before the error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(f, img, parameters, metadata)

    monkeypatch.setattr(images, "write_png", disk_fills_up)
    out = tmp_path / "out"
    argv = micro_argv(micro, out, "--n_iter", "2", "--n_samples", "2", "--json")
    rc = main(argv)
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert rc == 1
    assert f"cannot save image in {out / 'samples'}: No space left on device" in line
    assert "2 image(s) written before it are kept; to finish, run the same command again with --resume" in line
    report = json.loads(captured.out)
    assert report["ok"] is False and [Path(i["path"]).name for i in report["images"]] == ["00000.png", "00001.png"]
    assert pngs(out / "samples") == ["00000.png", "00001.png"] and pngs(out) == []
    assert no_temp_files(out, out / "samples")
    before = {name: (out / "samples" / name).read_bytes() for name in pngs(out / "samples")}
    for name in before:
        assert_complete_png(out / "samples" / name)

    # Space freed: the same command with --resume finishes the run and leaves the earlier files alone.
    monkeypatch.setattr(images, "write_png", real_write)
    assert main([*argv, "--resume"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [Path(i["path"]).name for i in report["skipped"]] == ["00000.png", "00001.png"]
    assert [Path(i["path"]).name for i in report["images"]] == ["00002.png", "00003.png"]
    assert pngs(out / "samples") == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert pngs(out) == ["grid-0000.png"]
    assert {name: (out / "samples" / name).read_bytes() for name in before} == before


def test_two_processes_writing_into_one_folder(micro, tmp_path, tmp_path_factory):
    out = tmp_path / "shared"
    procs = [
        subprocess.Popen([sys.executable, "-m", "sd_cli", *micro_argv(micro, out, "--n_iter", "4", "--json",
                                                                      "--prompt", f"process {p}")],
                         cwd=REPO, env=_env(tmp_path_factory), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for p in range(2)
    ]
    reports = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr
            reports.append(json.loads(stdout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    names = pngs(out / "samples")
    assert names == [f"{i:05}.png" for i in range(8)]  # every index used exactly once
    claimed = [[Path(i["path"]).name for i in r["images"]] for r in reports]
    assert len(claimed[0]) == len(claimed[1]) == 4 and not set(claimed[0]) & set(claimed[1])
    for p, report in enumerate(reports):  # nothing overwritten: each file holds what its writer reported
        for entry in report["images"]:
            meta = assert_complete_png(Path(entry["path"]))
            assert meta["prompt"] == f"process {p}" and meta["seed"] == entry["seed"]
    grids = sorted(Path(r["grid"]).name for r in reports)
    assert grids == ["grid-0000.png", "grid-0001.png"] == pngs(out)
    assert no_temp_files(out, out / "samples")


def test_deferred_interrupt_holds_ctrl_c_until_the_block_ends(sigint_handled):
    before = signal.getsignal(signal.SIGINT)
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal arrives here and is held
            steps.append("saved")
            steps.append("recorded")
    assert steps == ["saved", "recorded"]
    assert signal.getsignal(signal.SIGINT) is before
    with deferred_interrupt():  # no signal: no exception
        steps.append("quiet")


# --------------------------------------------------------------------------------------------------
# --from-file
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, prompts",
    [
        (b"one\ntwo\n", ["one", "two"]),
        (b"\xef\xbb\xbfone\r\ntwo\r\n", ["one", "two"]),  # BOM, CRLF
        (b"one\rtwo\rthree", ["one", "two", "three"]),  # old Mac line ends, no final newline
        (b"\n\n  \t\n# comment\n   # indented comment\none # not a comment\n\n", ["one # not a comment"]),
        ("caf\u00e9 \U0001f431\n\u00fcber\n".encode(), ["caf\u00e9 \U0001f431", "\u00fcber"]),
        (b"form\x0cfeed stays\nnext\x1cline\n", ["form\x0cfeed stays", "next\x1cline"]),
    ],
)
def test_prompt_file_formats(raw, prompts):
    assert parse_prompts(raw) == prompts


@st.composite
def prompt_files(draw):
    """(file bytes, prompts it holds): prompts mixed with blank and comment lines, any line ends, maybe a BOM."""
    text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=30)
    prompts = draw(st.lists(text.map(str.strip).filter(lambda t: t and not t.startswith("#")), max_size=8))
    lines = []
    for prompt in prompts:
        lines += draw(st.lists(st.sampled_from(["", "   ", "\t", "# note", "  #x"]), max_size=2))
        lines.append(draw(st.sampled_from(["", " ", "\t"])) + prompt + draw(st.sampled_from(["", "  "])))
    ends = [draw(st.sampled_from(["\n", "\r\n", "\r"])) for _ in lines]
    raw = "".join(line + end for line, end in zip(lines, ends)).encode()
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    return raw, prompts


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(prompt_files())
def test_prompt_file_round_trip(case):
    raw, prompts = case
    assert parse_prompts(raw) == prompts


@pytest.mark.parametrize(
    "content, words",
    [
        (b"fine\nalso fine\nbad \xff\xfe here\n", "line 3 is not valid UTF-8 (byte 0xff at column 5)"),
        ("one\ntwo\n".encode("utf-16"), "the file is UTF-16; save it as UTF-8"),
        (b"one\nt\x00wo\n", "line 2 contains a NUL byte"),
        (b"\n# only comments\n\n", "no prompts in the file"),
        (b"\xef\xbb\xbf# BOM then nothing\r\n", "no prompts in the file"),
        (None, "is a folder"),
        ("missing", "no such file"),
    ],
)
def test_bad_prompt_files_are_usage_errors(micro, tmp_path, capsys, content, words):
    path = tmp_path / "prompts.txt"
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    rc = main(micro_argv(micro, tmp_path / "out", "--from-file", str(path)))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"--from-file {path}: {words}" in line, line
    assert not (tmp_path / "out" / "samples").exists() or pngs(tmp_path / "out" / "samples") == []


def test_prompt_file_size_is_capped(tmp_path, monkeypatch):
    import sd_cli.run.prompts as prompts_module

    monkeypatch.setattr(prompts_module, "MAX_BYTES", 1024)
    path = tmp_path / "huge.txt"
    path.write_bytes(b"a prompt\n" * 200)
    with pytest.raises(PromptFileError, match="larger than"):
        read_prompt_file(str(path))
    path.write_bytes(b"a prompt\n" * 100)
    assert len(read_prompt_file(str(path))) == 100
