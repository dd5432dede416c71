"""--resume (a killed batch ends with the same files as one uninterrupted run) and --replay (regenerate an
image from its own metadata and compare), with the micro model (tests/micro_model.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from micro_model import micro_argv
from sd_cli.output import png as images
from sd_cli.cli import main
from sd_cli.output.png import read_png_metadata, save_png
from sd_cli.run.resume import KEY_FIELDS, ResumePlan


pytestmark = pytest.mark.usefixtures("private_hash_cache", "one_torch_thread")  # (tests/conftest.py)


def files_of(outdir: Path) -> dict[str, bytes]:
    """{relative name: bytes} of every file under outdir."""
    return {str(p.relative_to(outdir)): p.read_bytes() for p in sorted(outdir.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run_json(argv: list[str], capsys) -> tuple[int, dict]:
    rc = main(argv)
    out = capsys.readouterr().out
    return rc, json.loads(out)


# --------------------------------------------------------------------------------------------------
# --resume
# --------------------------------------------------------------------------------------------------

META = {"prompt": "a cat", "negative_prompt": "", "seed": 42, "batch_index": 0, "batch_size": 2, "n_samples": 2,
        "steps": 20, "sampler": "ddim", "scale": 7.5, "eta": 0.0, "width": 64, "height": 64,
        "model_hash": "0123456789", "dtype": "float32", "vae_decode": "whole", "watermark": False,
        "iteration": 0, "device": "cpu", "threads": 2, "sd_cli_version": "0.1.0", "model_name": "m"}
OTHER = {"prompt": "a dog", "negative_prompt": "blurry", "seed": 43, "batch_index": 1, "batch_size": 3,
         "n_samples": 3, "steps": 21, "sampler": "plms", "scale": 7.0, "eta": 0.5, "width": 72, "height": 56,
         "model_hash": "abcdefabcd", "dtype": "float16", "vae_decode": "tiles", "watermark": True,
         "prompt_syntax": "a1111", "clip_skip": 2, "embeddings": {"style": "0123456789ab"}, "scheduler": "exponential",
         "s_noise": 0.9, "seed_rule": "image",
         "loras": [{"name": "style", "sha256": "ab" * 32, "te_weight": 0.8, "unet_weight": 0.8}],
         "vae": {"name": "vae.safetensors", "sha256": "cd" * 32},
         "init_image": {"sha256": "ef" * 32, "width": 64, "height": 64}, "strength": 0.5, "encode": "mean",
         "subseed": 7, "subseed_strength": 0.3, "hires": {"scale": 2.0, "upscaler": "latent", "steps": 5},
         "mask": {"sha256": "12" * 32, "blur": 4, "fill": "original"}, "prompt_editing": True,
         "deepcache": 2, "deepcache_branch": 1, "cfg_interval": [1.0, None], "tome": 0.5}  # (from prompt_syntax on: absent in META,
#                                                                     which means their defaults)


def _png(directory: Path, meta: dict, value: int = 0) -> Path:
    img = np.full((8, 8, 3), value, np.uint8)
    return save_png(directory, images.SAMPLE_PATTERN, img, parameters="p", metadata=meta)


def test_resume_matches_by_metadata(tmp_path):
    assert set(OTHER) == set(KEY_FIELDS)
    first = _png(tmp_path, META)
    twin = _png(tmp_path, {**META, "iteration": 1, "device": "cuda", "threads": None, "sd_cli_version": "9",
                           "model_name": "x"})
    (tmp_path / "00002.png").write_bytes(first.read_bytes()[:-30])  # damaged: no IEND, bad CRC
    _png(tmp_path, {"unrelated": True})  # a PNG without our fields
    Image.new("RGB", (8, 8)).save(tmp_path / "00009.png")  # no sd_cli metadata at all
    (tmp_path / "notes.txt").write_text("not an image")
    warnings = []
    plan = ResumePlan.scan(tmp_path, warn=warnings.append)
    assert plan.scanned == 5
    assert len(warnings) == 1 and "2 file(s)" in warnings[0] and "00002.png, 00009.png" in warnings[0]

    for name, value in OTHER.items():  # every identity field matters
        assert plan.take_batch([{**META, name: value}]) == [None], name
    partial = {k: v for k, v in META.items() if k != "n_samples"}  # written before a field existed
    assert plan.take_batch([partial]) == [None]
    # iteration, device, threads, version, model name do not; equal work items use one file each (--fixed_code).
    assert plan.take_batch([{**META, "scale": 7.5}, {**META, "device": "mps"}, META]) == [first, twin, None]


def test_resume_needs_saved_images(micro, tmp_path, capsys):
    assert main(micro_argv(micro, tmp_path, "--resume", "--skip_save")) == 2
    assert "--resume finds finished images in OUTDIR/samples" in capsys.readouterr().err


def test_killed_batch_resumes_to_the_same_files(micro, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xef\xbb\xbfa red cube\r\n# skipped\r\n\r\na blue ball\r\na green cone\r\n"
                        b"a yellow ring\r\na white star\r\n")
    one_go, killed = tmp_path / "one_go", tmp_path / "killed"
    extra = ["--from-file", str(prompts), "--n_samples", "2", "--n_iter", "2", "--json"]  # 6 batches, 10 images

    rc, report = run_json(micro_argv(micro, one_go, *extra), capsys)
    assert rc == 0 and len(report["images"]) == 10
    reference = files_of(one_go)
    assert sorted(reference) == ["grid-0000.png", *[f"samples/{i:05}.png" for i in range(10)]]

    # Killed after 3 images: the middle of the second batch (Ctrl-C between two saves).
    real_save, saves = images.save_png, []

    def save_then_die(*args, **kwargs):
        if len(saves) == 3:
            raise KeyboardInterrupt
        saves.append(1)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(images, "save_png", save_then_die)
    rc, report = run_json(micro_argv(micro, killed, *extra), capsys)
    assert rc == 130 and report["interrupted"] and len(report["images"]) == 3
    monkeypatch.setattr(images, "save_png", real_save)

    # --resume: batch 1 is skipped, batch 2 regenerated with only its missing image written, then the rest.
    rc, report = run_json(micro_argv(micro, killed, *extra, "--resume"), capsys)
    assert rc == 0
    assert [Path(i["path"]).name for i in report["skipped"]] == ["00000.png", "00001.png", "00002.png"]
    assert [Path(i["path"]).name for i in report["images"]] == [f"{i:05}.png" for i in range(3, 10)]
    assert files_of(killed) == reference  # same names, same bytes, grid included

    # Again: nothing left to do, nothing written (not even a second grid), and the model is never loaded.
    import sd_cli.weights.loading

    def no_load(*args, **kwargs):
        raise AssertionError("--resume loaded the model although every image exists")

    real_load = sd_cli.weights.loading.load_model
    monkeypatch.setattr(sd_cli.weights.loading, "load_model", no_load)
    rc, report = run_json(micro_argv(micro, killed, *extra, "--resume"), capsys)
    monkeypatch.setattr(sd_cli.weights.loading, "load_model", real_load)
    assert rc == 0 and report["images"] == [] and len(report["skipped"]) == 10
    assert report["grid"] == str(killed / "grid-0000.png")
    assert files_of(killed) == reference

    # One image lost: only it is made again (under the next free number), with the same bytes.
    (killed / "samples" / "00003.png").unlink()
    rc, report = run_json(micro_argv(micro, killed, *extra, "--resume"), capsys)
    assert rc == 0 and [Path(i["path"]).name for i in report["images"]] == ["00010.png"]
    assert (killed / "samples" / "00010.png").read_bytes() == reference["samples/00003.png"]
    assert sorted(files_of(killed)) == sorted(set(reference) - {"samples/00003.png"} | {"samples/00010.png"})

    # Other settings are other work: a different --scale skips nothing.
    rc, report = run_json(micro_argv(micro, killed, *extra, "--resume", "--scale", "5", "--n_iter", "1",
                                     "--skip_grid"), capsys)
    assert rc == 0 and report["skipped"] == [] and len(report["images"]) == 5


# --------------------------------------------------------------------------------------------------
# --replay
# --------------------------------------------------------------------------------------------------


def replay_argv(micro, image: Path, *extra: str, fmt: str = "safetensors") -> list[str]:
    return ["--replay", str(image), "--ckpt", str(micro[fmt]), "--config", str(micro["config"]), "-q", *extra]


@pytest.fixture(scope="module")
def made(micro, tmp_path_factory):
    """Images to replay: a from-file batch with different prompts per row and a smaller last batch,
    512x512 with the watermark; and a plain 64x64 image."""
    d = tmp_path_factory.mktemp("replay")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (d / "prompts.txt").write_text("a red cube\na blue ball\na green cone\n")
        argv = micro_argv(micro, d / "marked", "--from-file", str(d / "prompts.txt"), "--n_samples", "2",
                          "--H", "512", "--W", "512", "--seed", "11")
        argv.remove("--no-watermark")
        assert main(argv) == 0
        assert main(micro_argv(micro, d / "plain", "--skip_grid")) == 0
    finally:
        torch.set_num_threads(before)
    return d


def test_replay_is_identical_and_writes_nothing_by_default(micro, made, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    samples = made / "marked" / "samples"
    before = files_of(made)
    meta = read_png_metadata(samples / "00001.png")[1]
    assert meta["prompt"] == "a blue ball" and meta["batch_index"] == 1 and meta["watermark"] is True
    rc, report = run_json(replay_argv(micro, samples / "00001.png", "--json"), capsys)
    assert rc == 0, report
    assert report["identical"] and report["bytes_identical"] and report["watermark"] is True
    assert report["max_abs_diff"] == 0 and report["written"] is None
    assert os.listdir(tmp_path) == [] and files_of(made) == before  # nothing written anywhere

    # The smaller last batch (1 image drawn from 2 rows of noise), written out because --outdir is given.
    meta = read_png_metadata(samples / "00002.png")[1]
    assert meta["batch_size"] == 1 and meta["n_samples"] == 2
    assert main(replay_argv(micro, samples / "00002.png", "--outdir", "again")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"identical: {samples / '00002.png'} regenerated pixel for pixel (512x512, seed 13")
    assert "the PNG file is byte-identical too" in out and "written to again/samples/00000.png" in out
    assert np.array_equal(pixels(tmp_path / "again/samples/00000.png"), pixels(samples / "00002.png"))
    assert read_png_metadata(tmp_path / "again/samples/00000.png")[1]["replay_of"] == str(samples / "00002.png")


def test_dtype_auto_replays_and_resumes_images_of_another_dtype(micro, tmp_path, capsys):
    """`--dtype auto`'s choice changed on Intel CPUs without AMX (bf16 -> fp32). An image keeps replaying in
    its own dtype, and a --dtype auto --resume counts an image of another dtype as done (as it does one of
    another device); an explicit --dtype still keys on it."""
    out = tmp_path / "out"
    assert main(micro_argv(micro, out, "--dtype", "bf16", "--skip_grid")) == 0
    image = out / "samples" / "00000.png"
    assert read_png_metadata(image)[1]["dtype"] == "bfloat16"
    rc, report = run_json(replay_argv(micro, image, "--json"), capsys)  # no --dtype: the image's bf16
    assert rc == 0 and report["identical"] and report["replayed"]["dtype"] == "bfloat16", report
    rc, report = run_json(replay_argv(micro, image, "--json", "--dtype", "fp32"), capsys)
    assert report["replayed"]["dtype"] == "float32" and report["max_abs_diff"] > 0, report
    before = files_of(out)
    rc, report = run_json(micro_argv(micro, out, "--dtype", "auto", "--resume", "--skip_grid", "--json"), capsys)
    assert rc == 0 and len(report["skipped"]) == 1 and report["images"] == [] and files_of(out) == before
    rc, report = run_json(micro_argv(micro, out, "--dtype", "fp32", "--resume", "--skip_grid", "--json"), capsys)
    assert rc == 0 and report["skipped"] == [] and len(report["images"]) == 1  # explicit: another dtype, new


def _resave(src: Path, dst: Path, pixels_: np.ndarray, meta: dict, level: int = 6) -> None:
    """Write `pixels_` with src's A1111 text and the given sd_cli metadata (as an editor might)."""
    text = read_png_metadata(src)[0]
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    info.add_text("sd_cli", json.dumps(meta, sort_keys=True))
    Image.fromarray(pixels_).save(dst, pnginfo=info, compress_level=level)


def test_replay_reports_pixel_differences(micro, made, tmp_path, capsys):
    src = made / "plain" / "samples" / "00000.png"
    meta = read_png_metadata(src)[1]
    edited = pixels(src).copy()
    edited[10:14, 20:24, 0] = np.where(edited[10:14, 20:24, 0] > 127, edited[10:14, 20:24, 0] - 9,
                                       edited[10:14, 20:24, 0] + 9)
    _resave(src, tmp_path / "edited.png", edited, meta)
    rc, report = run_json(replay_argv(micro, tmp_path / "edited.png", "--json"), capsys)
    assert rc == 1 and report["ok"] is False and report["identical"] is False
    assert report["max_abs_diff"] == 9
    assert report["mean_abs_diff"] == round(16 * 9 / (64 * 64 * 3), 4)
    assert report["differing_pixels"] == round(16 / (64 * 64), 6)
    rc = main(replay_argv(micro, tmp_path / "edited.png"))
    out = capsys.readouterr().out
    assert rc == 1 and out.startswith(f"differs: {tmp_path / 'edited.png'}: mean abs difference 0.0117, max 9 (0-255 "
                                    "scale), 0.39% of pixels differ (64x64, seed 42, ddim 2 steps")

    # Written before the 'watermark' and 'n_samples' fields existed: still replays (both variants tried);
    # re-saved by another program (other zlib level): same pixels, but not the bytes sd-txt2img writes.
    legacy = {k: v for k, v in meta.items() if k not in ("watermark", "n_samples")}
    _resave(src, tmp_path / "legacy.png", pixels(src), legacy, level=1)
    rc = main(replay_argv(micro, tmp_path / "legacy.png"))
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("identical: ") and "the PNG file itself differs" in out
    _resave(src, tmp_path / "legacy6.png", pixels(src), legacy, level=6)
    rc, report = run_json(replay_argv(micro, tmp_path / "legacy6.png", "--json"), capsys)
    assert rc == 0 and report["identical"] and report["bytes_identical"] is True


def test_replay_checks_the_model_hash(micro, made, capsys):
    image = made / "plain" / "samples" / "00000.png"
    recorded = read_png_metadata(image)[1]["model_hash"]
    rc = main(replay_argv(micro, image, fmt="ckpt"))  # same weights, another file: another hash
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert f"was made with model hash {recorded} (micro) but --ckpt {micro['ckpt']} has hash" in err
    assert "add --force to replay anyway" in err
    rc = main(replay_argv(micro, image, "--force", fmt="ckpt"))
    captured = capsys.readouterr()
    # Same pixels, but the file's model hash is not this checkpoint's: a difference (issue 13 item 5).
    assert rc == 1 and captured.out.startswith("differs:") and "model_hash" in captured.out
    assert "warning: " in captured.err and "replaying anyway (--force)" in captured.err


def test_an_image_of_an_earlier_demo_model_says_where_that_model_is(micro, made, tmp_path, capsys):
    """The demo model has been retrained before: its images record the old hash, and the error names the
    commit that holds the old files, a working way to replay them (--ckpt/--config of those files)."""
    from sd_cli.demo import PREVIOUS_DEMOS

    src = made / "plain" / "samples" / "00000.png"
    meta = read_png_metadata(src)[1]
    old = {**meta, "model_hash": "1c0d7b6820"}
    _resave(src, tmp_path / "old.png", pixels(src), old)
    assert main(replay_argv(micro, tmp_path / "old.png")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "git show c7284fb:sd_cli/demo/demo.safetensors > old.safetensors" in err
    assert "--ckpt old.safetensors --config old.yaml" in err
    assert PREVIOUS_DEMOS["1c0d7b6820"] == "c7284fb" and len(PREVIOUS_DEMOS) == 5
    assert main(replay_argv(micro, src, fmt="ckpt")) == 1  # any other model: the plain advice
    assert "pass that model's file as --ckpt" in capsys.readouterr().err


def test_replay_bad_inputs_are_one_line(micro, made, tmp_path, capsys):
    good = made / "plain" / "samples" / "00000.png"
    meta = read_png_metadata(good)[1]
    (tmp_path / "notes.txt").write_text("hello")
    Image.new("RGB", (64, 64)).save(tmp_path / "bare.png")
    _resave(good, tmp_path / "bad_index.png", pixels(good), {**meta, "batch_index": 5})
    _resave(good, tmp_path / "bad_seed.png", pixels(good), {**meta, "seed": "forty-two"})
    _resave(good, tmp_path / "cropped.png", pixels(good)[:32], meta)
    shutil.copy(made / "marked" / "grid-0000.png", tmp_path / "grid.png")
    cases = [
        (["--seed", "5"], good, 2, "--replay takes prompt, seed and every setting from the image; drop --seed"),
        (["--H", "64", "--plms"], good, 2, "drop --H, --plms"),
        ([], tmp_path / "missing.png", 1, "no such file"),
        ([], tmp_path / "notes.txt", 1, "not an image file"),
        ([], tmp_path / "bare.png", 1, "no sd_cli metadata in it"),
        ([], tmp_path / "grid.png", 1, "is a grid; replay one of the single images"),
        ([], tmp_path / "bad_index.png", 1, "batch position 5 of 1 (of 1) out of range"),
        ([], tmp_path / "bad_seed.png", 1, "malformed 'seed'"),
        ([], tmp_path / "cropped.png", 1, "the image is 64x32 but its metadata says 64x64"),
    ]
    for extra, image, code, words in cases:
        rc = main(replay_argv(micro, image, *extra))
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == code and len(lines) == 1 and lines[0].startswith("sd-txt2img: error: "), (image, captured)
        assert words in lines[0], (words, lines[0])
        assert captured.out == ""
