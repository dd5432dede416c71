"""End to end through the command line with the tiny model: files, metadata, batches, seeds, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from sd_cli.cli import main
from sd_cli.output.a1111 import parse_a1111_parameters
from sd_cli.output.png import read_png_metadata


def run_cli(tiny_files, outdir, *extra, fmt="safetensors", capsys=None):
    argv = [
        "--ckpt", str(tiny_files[fmt]), "--config", str(tiny_files["config"]), "--outdir", str(outdir),
        "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "2", "--n_iter", "1",
        "--no-watermark", "-q", *extra,
    ]
    return main(argv)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_files_names_and_metadata(tiny_files, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(tiny_files, out, "--prompt", "a red circle, on blue", "--negative-prompt", "green",
                   "--n_iter", "2", "--seed", "7", "--json")
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in out.iterdir()) == ["grid-0000.png", "samples"]
    assert [img["path"] for img in report["images"]] == [str(out / "samples" / n) for n in names]
    assert [img["seed"] for img in report["images"]] == [7, 8, 9, 10]  # image m uses seed + m (A1111)
    assert report["grid"] == str(out / "grid-0000.png")
    text, meta = read_png_metadata(out / "samples" / "00002.png")
    parsed = parse_a1111_parameters(text)
    assert parsed["prompt"] == "a red circle, on blue"
    assert parsed["negative_prompt"] == "green"
    assert text.splitlines()[-1].startswith("Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 9, Size: 64x64, Model hash: ")
    assert meta["seed"] == 9 and meta["batch_index"] == 0 and meta["batch_size"] == 2
    assert meta["prompt"] == "a red circle, on blue" and meta["sampler"] == "ddim" and meta["steps"] == 3
    assert meta["model_name"] == "tiny"
    # Grid: 2 rows of 2 cells of 64 px with 2 px padding (torchvision make_grid layout).
    assert pixels(out / "grid-0000.png").shape == (2 + 2 * 66, 2 + 2 * 66, 3)


def test_rerun_is_byte_identical_and_never_overwrites(tiny_files, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(tiny_files, a) == 0
    assert run_cli(tiny_files, b) == 0
    for name in ("samples/00000.png", "samples/00001.png", "grid-0000.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    first = (a / "samples/00000.png").read_bytes()
    (a / "samples" / "notes.txt").write_text("unrelated")
    assert run_cli(tiny_files, a, "--seed", "1") == 0
    assert sorted(p.name for p in (a / "samples").iterdir()) == [
        "00000.png", "00001.png", "00002.png", "00003.png", "notes.txt"]
    assert sorted(p.name for p in a.glob("grid-*")) == ["grid-0000.png", "grid-0001.png"]
    assert (a / "samples/00000.png").read_bytes() == first
    assert not np.array_equal(pixels(a / "samples/00000.png"), pixels(a / "samples/00002.png"))


def test_ckpt_and_safetensors_give_identical_images(tiny_files, tmp_path):
    assert run_cli(tiny_files, tmp_path / "s", "--skip_grid") == 0
    assert run_cli(tiny_files, tmp_path / "c", "--skip_grid", fmt="ckpt") == 0
    for name in ("00000.png", "00001.png"):
        assert np.array_equal(pixels(tmp_path / "s/samples" / name), pixels(tmp_path / "c/samples" / name))


def test_from_file_partial_last_batch(tiny_files, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffone\r\n\r\n# a comment\r\ntwo\r\nthree\r\nfour\r\nfive\r\n".encode())
    code = run_cli(tiny_files, tmp_path / "out", "--from-file", str(prompts), "--json", "--ddim_steps", "2")
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [i["prompt"] for i in report["images"]] == ["one", "two", "three", "four", "five"]
    assert [i["batch_size"] for i in report["images"]] == [2, 2, 2, 2, 1]
    assert [i["seed"] for i in report["images"]] == [42, 43, 44, 45, 46]  # image m uses seed + m
    assert len(list((tmp_path / "out/samples").iterdir())) == 5


def test_seed_of_second_iteration_reproduces_alone(tiny_files, tmp_path):
    assert run_cli(tiny_files, tmp_path / "a", "--n_iter", "2", "--seed", "5", "--skip_grid") == 0
    # image m of a run has seed + m: the second iteration's first image (m = 2) is seed 7
    assert run_cli(tiny_files, tmp_path / "b", "--n_iter", "1", "--seed", "7", "--skip_grid") == 0
    assert (tmp_path / "a/samples/00002.png").read_bytes() != (tmp_path / "b/samples/00000.png").read_bytes()  # metadata differs (iteration)
    assert np.array_equal(pixels(tmp_path / "a/samples/00002.png"), pixels(tmp_path / "b/samples/00000.png"))


def test_fixed_code_reuses_the_first_noise(tiny_files, tmp_path):
    assert run_cli(tiny_files, tmp_path / "a", "--n_iter", "2", "--fixed_code", "--skip_grid") == 0
    s = tmp_path / "a/samples"
    assert np.array_equal(pixels(s / "00000.png"), pixels(s / "00002.png"))
    assert not np.array_equal(pixels(s / "00000.png"), pixels(s / "00001.png"))


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpmpp_2m", "euler_a"])
def test_every_sampler_runs_and_is_recorded(tiny_files, tmp_path, sampler):
    assert run_cli(tiny_files, tmp_path / sampler, "--sampler", sampler, "--skip_grid", "--n_samples", "1") == 0
    _, meta = read_png_metadata(tmp_path / sampler / "samples/00000.png")
    assert meta["sampler"] == sampler


def test_plms_and_dpm_solver_flags_are_aliases(tiny_files, tmp_path):
    assert run_cli(tiny_files, tmp_path / "a", "--plms", "--skip_grid", "--n_samples", "1") == 0
    assert run_cli(tiny_files, tmp_path / "b", "--dpm_solver", "--skip_grid", "--n_samples", "1") == 0
    assert read_png_metadata(tmp_path / "a/samples/00000.png")[1]["sampler"] == "plms"
    assert read_png_metadata(tmp_path / "b/samples/00000.png")[1]["sampler"] == "dpmpp_2m"


def test_watermark_is_embedded_unless_disabled(tiny_files, tmp_path):
    from sd_cli.output.watermark import read_watermark

    base = ["--H", "512", "--W", "512", "--n_samples", "1", "--skip_grid", "--ddim_steps", "2"]
    assert run_cli(tiny_files, tmp_path / "wm", *base) == 0  # run_cli passes --no-watermark
    plain = pixels(tmp_path / "wm/samples/00000.png")
    argv = ["--ckpt", str(tiny_files["safetensors"]), "--config", str(tiny_files["config"]),
            "--outdir", str(tmp_path / "wm2"), "-q", "--n_iter", "1", *base]
    assert main(argv) == 0
    marked = pixels(tmp_path / "wm2/samples/00000.png")
    # dwtDct decoding is lossy on smooth content (a known upstream limitation), so count bits:
    # an unmarked image agrees with the mark on about half of its 136 bits, a marked one on nearly all.
    def agreement(img):
        got = np.unpackbits(np.frombuffer(read_watermark(img), np.uint8))
        return (got == np.unpackbits(np.frombuffer(b"StableDiffusionV1", np.uint8))).mean()

    assert agreement(marked) > 0.9
    assert agreement(plain) < 0.75
    assert not np.array_equal(plain, marked)


@pytest.mark.parametrize(
    "extra, code, needle",
    [
        (["--H", "60"], 2, "--H 60: must be a positive multiple of 8"),
        (["--ddim_steps", "0"], 2, "--ddim_steps 0"),
        (["--n_samples", "0"], 2, "--n_samples 0"),
        (["--laion400m"], 2, "not supported"),
        (["--C", "3"], 2, "latent channels"),
        (["--plms", "--ddim_eta", "0.5"], 2, "--plms needs --ddim_eta 0"),
        (["--plms", "--sampler", "ddim"], 2, "conflicting samplers"),
        (["--sampler", "nope"], 2, "unknown sampler"),
        (["--bogus"], 2, "unrecognized arguments"),
    ],
)
def test_usage_errors(tiny_files, tmp_path, capsys, extra, code, needle):
    rc = run_cli(tiny_files, tmp_path / "out", *extra)
    err = capsys.readouterr().err
    assert rc == code
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "samples").exists() or not any((tmp_path / "out" / "samples").iterdir())


def test_runtime_errors_are_one_line_exit_1(tiny_files, tmp_path, capsys):
    cases = []
    # Missing checkpoint: says where to put one.
    cases.append((["--ckpt", str(tmp_path / "none.ckpt")], "no checkpoint at"))
    # Corrupt checkpoint.
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04garbage" * 10)
    cases.append((["--ckpt", str(bad)], str(bad)))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cases.append((["--ckpt", str(empty)], str(empty)))
    # Unwritable output folder (a path under a regular file).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases.append((["--outdir", str(blocker / "sub")], "cannot"))
    # Wrong config for the checkpoint.
    cases.append((["--config", str(REPO / "configs/stable-diffusion/v1-inference.yaml")], "config"))
    # A config that isn't YAML.
    junk = tmp_path / "junk.yaml"
    junk.write_text("model: [unclosed")
    cases.append((["--config", str(junk)], "junk.yaml"))
    for extra, needle in cases:
        argv = ["--ckpt", str(tiny_files["safetensors"]), "--config", str(tiny_files["config"]),
                "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--ddim_steps", "2", "-q", *extra]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 1, (extra, err)
        assert needle in err, (extra, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_empty_prompt_file_is_usage_error(tiny_files, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("\n# nothing\n\n")
    assert run_cli(tiny_files, tmp_path / "o", "--from-file", str(f)) == 2
    assert "no prompts" in capsys.readouterr().err
    f.write_bytes(b"ok\n\xff\xfe bad\n")
    assert run_cli(tiny_files, tmp_path / "o", "--from-file", str(f)) == 2
    assert "line 2 is not valid UTF-8" in capsys.readouterr().err


def test_long_prompt_warns_about_dropped_tokens(tiny_files, tmp_path, capsys):
    """Plain text is cut at CLIP's 75 tokens, with a warning; A1111's syntax (the default) reads it all in
    chunks, warns about nothing and records the token count."""
    long_prompt = " ".join(["cat"] * 80)
    assert run_cli(tiny_files, tmp_path / "o", "--prompt", long_prompt, "--skip_grid", "--n_samples", "1",
                   "--prompt-syntax", "plain") == 0
    err = capsys.readouterr().err
    assert "80 tokens" in err and "last 5 were dropped" in err
    assert run_cli(tiny_files, tmp_path / "a", "--prompt", long_prompt, "--skip_grid", "--n_samples", "1") == 0
    assert "dropped" not in capsys.readouterr().err
    assert read_png_metadata(tmp_path / "a/samples/00000.png")[1]["token_count"] == 80


def test_python_m_and_console_entry_behave_the_same(tiny_files, tmp_path):
    cmd = [sys.executable, "-m", "sd_cli", "--ckpt", str(tmp_path / "missing.ckpt"), "--outdir", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1
    assert r.stderr.startswith("sd-txt2img: error: no checkpoint at")
    r = subprocess.run([sys.executable, "-m", "sd_cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--plms" in r.stdout and "dpmpp_2m" in r.stdout and "seed + m" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sd_cli", "--H", "7"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
