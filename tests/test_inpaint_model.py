"""RunwayML-style inpainting checkpoints (a 9-channel UNet input): detection, their config, the UNet input
in the channel order [latents, mask, masked-image latents], text to image with such a model, and the
error for the wrong config. A random micro model in the real key layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_config_from_text
from micro_model import MICRO_YAML
from sd_cli.cli import main

UNET_IN = "    in_channels: 4\n    out_channels: 4"
assert UNET_IN in MICRO_YAML
INPAINT_YAML = MICRO_YAML.replace(UNET_IN, "    in_channels: 9\n    out_channels: 4")


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    from safetensors.torch import save_file

    from sd_cli.model.ldm import LatentDiffusion

    d = tmp_path_factory.mktemp("inpaint_model")
    cfg = load_config_from_text(INPAINT_YAML)
    torch.manual_seed(0)
    sd = {k: v.detach().contiguous().clone() for k, v in LatentDiffusion(cfg.model).state_dict().items()}
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    save_file(sd, str(d / "inpaint.safetensors"))
    (d / "inpaint.yaml").write_text(INPAINT_YAML)
    (d / "plain.yaml").write_text(MICRO_YAML)
    return d


def test_detected_as_inpainting(inpaint_model):
    from sd_cli.weights.checkpoint import read_state_dict
    from sd_cli.weights.detect import detect_model, unet_in_channels

    path = inpaint_model / "inpaint.safetensors"
    assert detect_model(read_state_dict(path)).family == "sd1-inpaint"
    assert unet_in_channels(path) == 9
    assert load_config_from_text(INPAINT_YAML).model.inpainting
    assert load_config_from_text(INPAINT_YAML).model.latent_channels == 4


def test_wrong_config_is_one_clear_error(inpaint_model, tmp_path, capsys):
    argv = ["--ckpt", str(inpaint_model / "inpaint.safetensors"), "--config", str(inpaint_model / "plain.yaml"),
            "--outdir", str(tmp_path / "out"), "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1",
            "--n_iter", "1", "-q", "--threads", "1", "--no-watermark"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inpainting" in err[0] and "v1-inpainting-inference.yaml" in err[0], err


def _hooked(pipe):
    seen = []
    conv = pipe.model.model.diffusion_model.input_blocks[0][0]
    handle = conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().float().clone()))
    return seen, handle


def test_img2img_with_a_mask_feeds_latents_mask_and_masked_image(inpaint_model, tmp_path):
    from sd_cli import StableDiffusion
    from sd_cli.output.init_image import InitImage, MaskImage
    from sd_cli.run.settings import Generation

    sd = StableDiffusion.load(inpaint_model / "inpaint.safetensors", config=str(inpaint_model / "inpaint.yaml"),
                              dtype="fp32", threads=1)
    pipe = sd.pipeline()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # repaint the left half
    gen = Generation.create(["a cat"], sampler="ddim", steps=4, height=64, width=64, watermark=False,
                            init=InitImage("i.png", "0" * 64, (64, 64), image), strength=0.75,
                            mask=MaskImage("m.png", "1" * 64, mask), mask_blur=0)
    item = sd.plan(gen)[0]
    seen, handle = _hooked(pipe)
    try:
        out = sd.render(gen, item)[0]
    finally:
        handle.remove()
    assert out.shape == (64, 64, 3) and seen
    x = seen[0]  # (2B, 9, 8, 8): [uncond; cond] rows
    assert x.shape[1] == 9
    want_mask = torch.zeros(1, 1, 8, 8)
    want_mask[..., :4] = 1
    keep = torch.from_numpy((mask < 128).astype(np.float32))[None, None]
    masked = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    with torch.no_grad():
        vae = pipe.model.first_stage_model
        want_latents = vae.quant_conv(vae.encoder(masked * keep)).chunk(2, dim=1)[0] * pipe.model.cfg.scale_factor
    for row in x:
        torch.testing.assert_close(row[4:5], want_mask[0], rtol=0, atol=0)  # channel 4: the mask
        torch.testing.assert_close(row[5:9], want_latents[0], rtol=1e-5, atol=1e-5)  # 5-8: masked image


def test_txt2img_with_an_inpainting_model(inpaint_model, tmp_path):
    """Everything repainted: mask all ones, the masked image grey (0 in [-1, 1]), as A1111 and diffusers."""
    from sd_cli import StableDiffusion

    sd = StableDiffusion.load(inpaint_model / "inpaint.safetensors", config=str(inpaint_model / "inpaint.yaml"),
                              dtype="fp32", threads=1)
    pipe = sd.pipeline()
    seen, handle = _hooked(pipe)
    try:
        images = sd.txt2img("a dog", seed=3, steps=2, sampler="euler", height=64, width=64, watermark=False)
    finally:
        handle.remove()
    assert np.asarray(images[0]).shape == (64, 64, 3)
    x = seen[0]
    assert (x[:, 4] == 1).all()
    grey = pipe.encode_pixels(torch.zeros(1, 3, 64, 64))[0]
    torch.testing.assert_close(x[0, 5:9], grey, rtol=1e-5, atol=1e-5)


def test_the_default_config_turns_into_the_inpainting_one(inpaint_model, micro):
    from sd_cli.run.api import _config_for
    from sd_cli.run.settings import Runtime
    from sd_cli.weights.config import DEFAULT_CONFIG, INPAINTING_CONFIG, load_config

    assert _config_for(Runtime(inpaint_model / "inpaint.safetensors", DEFAULT_CONFIG)) == INPAINTING_CONFIG
    assert _config_for(Runtime(micro["safetensors"], DEFAULT_CONFIG)) == DEFAULT_CONFIG  # 4 channels: as is
    given = str(inpaint_model / "inpaint.yaml")
    assert _config_for(Runtime(inpaint_model / "inpaint.safetensors", given)) == given  # an explicit one wins
    full = load_config(INPAINTING_CONFIG).model
    assert full.inpainting and full.unet.in_channels == 9 and full.unet.model_channels == 320
