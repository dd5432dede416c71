"""sd_cli.detect: model family from key names and shapes (fake shapes and meta tensors, no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd_cli.weights.detect import detect_model, require_sd1
from sd_cli.errors import UnsupportedModelError

REPO = Path(__file__).resolve().parent.parent
KEYS_CANDIDATES = (REPO / "shared" / "sd1_keys.json", REPO.parent / "shared" / "sd1_keys.json")
UNET = "model.diffusion_model."
IN_CONV = UNET + "input_blocks.0.0.weight"
CLIP = "cond_stage_model.transformer."


@pytest.fixture(scope="module")
def sd1() -> dict[str, tuple[int, ...]]:
    """Every key of a real SD v1.x checkpoint with its shape (no data)."""
    path = next((p for p in KEYS_CANDIDATES if p.exists()), None)
    if path is None:
        pytest.skip("shared/sd1_keys.json not found")
    return {name: tuple(shape) for name, shape, _ in json.loads(path.read_text())}


def with_context(sd: dict, width: int) -> dict:
    """Copy with every cross-attention key/value projection reading a `width`-wide context."""
    return {k: (v[0], width) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v for k, v in sd.items()}


def sdxl_from(sd1: dict, context: int = 2048) -> dict:
    sd = {k: v for k, v in with_context(sd1, context).items() if not k.startswith("cond_stage_model.")}
    sd[UNET + "label_emb.0.0.weight"] = (1280, 2816)
    sd[UNET + "label_emb.0.0.bias"] = (1280,)
    sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = (768,)
    sd["conditioner.embedders.1.model.ln_final.weight"] = (1280,)
    return sd


def sd2_from(sd1: dict) -> dict:
    sd = {k: v for k, v in with_context(sd1, 1024).items() if not k.startswith(CLIP)}
    sd["cond_stage_model.model.ln_final.weight"] = (1024,)
    sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = (3072, 1024)
    return sd


def tiny_from(sd1: dict) -> dict:
    """Same key layout as SD v1 with every width shrunk (what the project's tiny test model looks like)."""
    shrink = {320: 32, 640: 64, 1280: 128, 768: 48, 2560: 256, 5120: 512, 10240: 1024, 3072: 192, 49408: 1000}
    return {k: tuple(shrink.get(n, n) for n in shape) for k, shape in sd1.items()}


def test_full_sd1_keys(sd1):
    found = detect_model(sd1)
    assert (found.family, found.description) == ("sd1", "Stable Diffusion 1.x")
    assert (found.in_channels, found.context_dim, found.missing) == (4, 768, ())
    require_sd1(sd1, "model.ckpt")


def test_meta_tensors_work_like_shapes(sd1):
    meta = {k: torch.empty(shape, device="meta") for k, shape in sd1.items()}
    assert detect_model(meta).family == "sd1"
    require_sd1(meta, "model.safetensors")


def test_tiny_model_with_sd1_layout_is_sd1(sd1):
    found = detect_model(tiny_from(sd1))
    assert (found.family, found.context_dim, found.in_channels) == ("sd1", 48, 4)


def test_context_width_must_match_the_text_encoder(sd1):
    found = detect_model(with_context(tiny_from(sd1), 40))  # UNet reads 40 wide, CLIP gives 48
    assert found.family == "unknown"
    assert "context=40" in found.description


@pytest.mark.parametrize(
    "make,family,words",
    [
        (lambda sd: sdxl_from(sd), "sdxl", "looks like SDXL)"),
        (lambda sd: sdxl_from(sd, context=1280), "sdxl-refiner", "looks like SDXL refiner"),
        (lambda sd: {**sdxl_from(sd), IN_CONV: (320, 9, 3, 3)}, "sdxl-inpaint", "looks like SDXL inpainting"),
        (lambda sd: sd2_from(sd), "sd2", "looks like Stable Diffusion 2.x"),
        (lambda sd: {**sd2_from(sd), IN_CONV: (320, 9, 3, 3)}, "sd2-inpaint", "Stable Diffusion 2.x inpainting"),
        (lambda sd: {**sd, IN_CONV: (320, 8, 3, 3)}, "sd1-pix2pix", "InstructPix2Pix"),
        (lambda sd: {**sd, IN_CONV: (320, 7, 3, 3)}, "unknown", "unrecognised Stable Diffusion variant"),
    ],
)
def test_other_families_are_refused(sd1, make, family, words):
    sd = make(dict(sd1))
    assert detect_model(sd).family == family
    with pytest.raises(UnsupportedModelError) as info:
        require_sd1(sd, "/models/other.safetensors")
    message = str(info.value)
    assert message.startswith("/models/other.safetensors: unsupported model (")
    assert words in message and message.endswith("sd-txt2img runs Stable Diffusion 1.x checkpoints")


def test_sd1_inpainting_needs_its_config(sd1):
    inpaint = {**sd1, IN_CONV: (320, 9, 3, 3)}
    assert detect_model(inpaint).family == "sd1-inpaint"
    with pytest.raises(UnsupportedModelError, match=r"is Stable Diffusion 1\.x inpainting but the config is for "
                                                    r"the other kind; pass --config configs/stable-diffusion/"
                                                    r"v1-inpainting-inference\.yaml"):
        require_sd1(inpaint, "x.safetensors")
    require_sd1(inpaint, "x.safetensors", inpainting=True)
    with pytest.raises(UnsupportedModelError, match=r"v1-inference\.yaml"):
        require_sd1(sd1, "x.safetensors", inpainting=True)


def test_sdxl_error_text(sd1):
    with pytest.raises(UnsupportedModelError, match=r"looks like SDXL\); sd-txt2img runs Stable Diffusion 1\.x"):
        require_sd1(sdxl_from(sd1), "x.safetensors")


@pytest.mark.parametrize(
    "sd,family,words",
    [
        ({UNET + "joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536)}, "sd3", "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "img_in.weight": (3072, 64)}, "flux", "FLUX"),
        ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
         "diffusers", "diffusers layout"),
        ({"unet.conv_in.weight": (320, 4, 3, 3), "vae.decoder.conv_out.weight": (3, 128, 3, 3)},
         "diffusers", "diffusers layout"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "lora", "a LoRA"),
        ({"string_to_param.*": (2, 768)}, "embedding", "textual-inversion embedding"),
        ({"text_model.final_layer_norm.weight": (768,)}, "text-encoder", "a CLIP text encoder"),
        ({"foo.weight": (3, 3), "bar": (1,)}, "unknown", "unrecognised model"),
        ({}, "unknown", "unrecognised model"),
    ],
)
def test_non_sd_files(sd, family, words):
    found = detect_model(sd)
    assert found.family == family
    with pytest.raises(UnsupportedModelError, match=words):
        require_sd1(sd, "f.ckpt")


def test_vae_only_files(sd1):
    vae = {k: v for k, v in sd1.items() if k.startswith("first_stage_model.")}
    bare = {k.removeprefix("first_stage_model."): v for k, v in vae.items()}
    for sd in (vae, bare):
        assert detect_model(sd).family == "vae"
        with pytest.raises(UnsupportedModelError, match=r"looks like a VAE, not a full model"):
            require_sd1(sd, "vae.pt")


@pytest.mark.parametrize(
    "drop,part",
    [
        ("first_stage_model.", "VAE (first_stage_model.*)"),
        ("cond_stage_model.", "text encoder (cond_stage_model.*)"),
        (UNET, "UNet (model.diffusion_model.*)"),
    ],
)
def test_incomplete_sd1_names_the_missing_part(sd1, drop, part):
    sd = {k: v for k, v in sd1.items() if not k.startswith(drop)}
    found = detect_model(sd)
    assert found.family == "sd1" and len(found.missing) == 1
    with pytest.raises(UnsupportedModelError) as info:
        require_sd1(sd, "/m/partial.ckpt")
    message = str(info.value)
    assert message.startswith("/m/partial.ckpt: incomplete Stable Diffusion 1.x checkpoint")
    assert part in message and "\n" not in message


def test_text_encoder_only_in_compvis_layout_is_incomplete(sd1):
    sd = {k: v for k, v in sd1.items() if k.startswith(CLIP)}
    with pytest.raises(UnsupportedModelError, match=r"UNet .* and VAE .* weights are missing"):
        require_sd1(sd, "clip.ckpt")
