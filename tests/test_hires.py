"""Hires fix (--hr-scale): pass 1 at --W x --H, pass 2 image to image at F times the size from the
upscaled first pass, as A1111's txt2img hires fix; metadata, --replay, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from micro_model import micro_argv
from sd_cli.cli import main
from sd_cli.errors import UsageError


def _argv(micro, out, *extra):
    argv = micro_argv(micro, out, "--skip_grid", *extra)
    i = argv.index("--ddim_steps")
    return argv[:i] + argv[i + 2:]


def test_latent_hires_is_upscale_then_img2img(micro, tmp_path):
    """The CLI's image equals the composition written out with the pipeline's own steps: pass 1, bilinear
    latent upscale (no antialiasing, A1111's "Latent"), fresh noise of the image's seed at 2x, image to
    image running the hires steps (4) as the last 4 of a schedule of int(4 / 0.6) = 6 steps (A1111's
    setup_img2img_steps with steps given: t_enc = 4 - 1, the k-sampler runs t_enc + 1), decode."""
    from sd_cli import StableDiffusion
    from sd_cli.pipeline.generate import initial_noise

    out = tmp_path / "hr"
    assert main(_argv(micro, out, "--sampler", "euler", "--steps", "4", "--seed", "11", "--hr-scale", "2",
                      "--denoising-strength", "0.6")) == 0
    got = np.asarray(Image.open(out / "samples" / "00000.png").convert("RGB"))
    assert got.shape == (128, 128, 3)
    sd = StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32", threads=1)
    pipe = sd.pipeline()
    common = dict(sampler="euler", scale=7.5, prompt_syntax="a1111")
    g = torch.Generator().manual_seed(11)
    first = pipe.latents(["a painting of a virus monster playing guitar"], initial_noise(g, 1, 4, 64, 64, 8),
                         steps=4, generator=g, **common)
    up = F.interpolate(first, size=(16, 16), mode="bilinear", antialias=False)
    g2 = torch.Generator().manual_seed(11)
    second = pipe.latents(["a painting of a virus monster playing guitar"], initial_noise(g2, 1, 4, 128, 128, 8),
                          steps=int(4 / 0.6), generator=g2, init=up, t_enc=4 - 1, **common)
    want = pipe.decode(second)[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_demo_hires_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--prompt", "a red circle on a blue background", "--outdir", str(out), "--n_samples", "1",
                 "--n_iter", "1", "--skip_grid", "-q", "--threads", "1", "--steps", "10", "--hr-scale", "2"]) == 0
    path = out / "samples" / "00000.png"
    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB")).astype(int)
        record, text = json.loads(im.info["sd_cli"]), im.info["parameters"]
    assert img.shape == (128, 128, 3)
    red = (img[..., 0] > 150) & (img[..., 1] < 100) & (img[..., 2] < 100)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    assert red.mean() > 0.05 and blue.mean() > 0.3, (red.mean(), blue.mean())  # the prompt's colours
    assert record["hires"] == {"scale": 2.0, "upscaler": "latent", "steps": 10, "strength": 0.7, "width": 128,
                               "height": 128, "steps_rule": "a1111"}
    assert (record["width"], record["height"]) == (64, 64)  # A1111's Size: the first pass
    assert "Size: 64x64" in text and "Denoising strength: 0.7, Hires upscale: 2.0, Hires steps: 10, " \
        "Hires upscaler: Latent" in text
    assert main(["--replay", str(path), "-q"]) == 0
    assert "identical" in capsys.readouterr().out


def test_hires_steps_rules():
    """A1111 runs "Hires steps" N at strength d as the last N steps of a schedule of int(N / min(d, 0.999));
    images made before that rule (no steps_rule) ran int(d N) of N, and still replay so."""
    from sd_cli.run.settings import Generation

    gen = Generation(("x",), sampler="euler", steps=20, hr_scale=2.0, hr_steps=10, hr_strength=0.7)
    assert gen.hr_plan() == (14, 9)  # 10 steps run: the k-samplers run t_enc + 1
    assert Generation(("x",), steps=20, hr_scale=2.0, hr_strength=1.0).hr_plan() == (20, 19)  # (0.999 cap)
    assert Generation(("x",), steps=20, hr_scale=2.0, hr_strength=0.0).hr_plan() == (20, 0)  # upscale only
    old = Generation(("x",), steps=20, hr_scale=2.0, hr_steps=10, hr_strength=0.7, hr_rule="fraction")
    assert old.hr_plan() == (10, 7)
    with pytest.raises(UsageError, match="more than 1000 steps"):
        Generation(("x",), steps=20, hr_scale=2.0, hr_steps=100, hr_strength=0.05)


def test_hires_runs_its_steps(micro):
    """--hr-steps N runs N sampler steps in the second pass (A1111), counted by the step callback."""
    from sd_cli import StableDiffusion
    from sd_cli.run.settings import Generation

    sd = StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32", threads=1)
    gen = Generation(("a cat",), sampler="euler", steps=3, height=64, width=64, hr_scale=1.5, hr_steps=5,
                     hr_strength=0.45, watermark=False)
    calls = []
    sd.render(gen, sd.plan(gen)[0], on_step=lambda i, n, x: calls.append(x.shape[-1]))
    assert calls.count(8) == 3 and calls.count(12) == 5, calls


@pytest.mark.parametrize("flags, message", [
    (["--hr-scale", "1"], "--hr-scale 1.0: must be more than 1"),
    (["--hr-scale", "0.5"], "must be more than 1"),
    (["--hr-scale", "80"], "at most 8"),
    (["--hr-steps", "5"], "add --hr-scale"),
    (["--denoising-strength", "0.5"], "add --hr-scale"),
    (["--hr-scale", "2", "--denoising-strength", "1.5"], "--denoising-strength 1.5: must be between 0 and 1"),
    (["--hr-scale", "2", "--hr-upscaler", "bicubic"], "invalid choice"),
])
def test_bad_hires_flags(micro, tmp_path, capsys, flags, message):
    assert main(micro_argv(micro, tmp_path / "out", *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_of_hires_images(micro, tmp_path):
    out = tmp_path / "hr"
    argv = _argv(micro, out, "--sampler", "euler", "--steps", "2", "--hr-scale", "1.5", "--n_samples", "2")
    assert main(argv) == 0
    files = sorted((out / "samples").iterdir())
    before = sorted(f.read_bytes() for f in files)
    files[1].unlink()
    assert main([*argv, "--resume"]) == 0
    assert sorted(f.read_bytes() for f in (out / "samples").iterdir()) == before
    assert Image.open(files[0]).size == (96, 96)
