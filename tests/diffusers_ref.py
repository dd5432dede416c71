"""An independent SD v1.x implementation to compare against: diffusers (UNet, VAE, schedulers) and a
fresh transformers CLIPTextModel, built from the SAME LDM-format state dict with diffusers' OWN
single-file conversion code (`diffusers.loaders.single_file_utils`).

Nothing here imports `sd_cli`: the configs are derived from the raw YAML numbers (parsed with PyYAML,
laid out as CompVis' `v1-inference.yaml`) by diffusers' `create_*_diffusers_config_from_ldm`, and the
weights are renamed by diffusers' `convert_ldm_*_checkpoint`. Attention runs on diffusers' classic
`AttnProcessor` (explicit baddbmm + softmax) and CLIP on transformers' "eager" attention, so even the
attention kernels differ from ours (we use SDPA everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import yaml


def compvis_original_config(yaml_text: str) -> dict[str, Any]:
    """Our YAML's numbers in CompVis' v1-inference.yaml layout (what diffusers' converters read)."""
    m = yaml.safe_load(yaml_text)["model"]
    u, v, s = m["unet"], m["vae"], m["schedule"]
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": s["linear_start"],
                "linear_end": s["linear_end"],
                "timesteps": s["timesteps"],
                "scale_factor": m["scale_factor"],
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "image_size": 32,
                        "in_channels": u["in_channels"],
                        "out_channels": u["out_channels"],
                        "model_channels": u["model_channels"],
                        "attention_resolutions": list(u["attention_resolutions"]),
                        "num_res_blocks": u["num_res_blocks"],
                        "channel_mult": list(u["channel_mult"]),
                        "num_heads": u["num_heads"],
                        "use_spatial_transformer": True,
                        "transformer_depth": u["transformer_depth"],
                        "context_dim": u["context_dim"],
                        "legacy": False,
                    },
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": v["embed_dim"],
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": v["z_channels"],
                            "resolution": v["resolution"],
                            "in_channels": v["in_channels"],
                            "out_ch": v["out_ch"],
                            "ch": v["ch"],
                            "ch_mult": list(v["ch_mult"]),
                            "num_res_blocks": v["num_res_blocks"],
                            "attn_resolutions": list(v["attn_resolutions"]),
                            "dropout": 0.0,
                        },
                    },
                },
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
            },
        }
    }


@dataclass
class Reference:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel (eager attention)
    unet_config: dict
    vae_config: dict
    clip_keys_dropped: list[str]  # converted keys the fresh CLIP model does not hold (position_ids)
    schedule: dict  # linear_start, linear_end, timesteps


def build_reference(state_dict: dict[str, torch.Tensor], yaml_text: str) -> Reference:
    """diffusers/transformers models holding `state_dict`'s weights; every load is strict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextConfig, CLIPTextModel

    original = compvis_original_config(yaml_text)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items()}

    unet_cfg = create_unet_diffusers_config_from_ldm(original, sd)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True)
    unet.set_attn_processor(AttnProcessor())

    vae_cfg = create_vae_diffusers_config_from_ldm(original, sd)
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae_cfg), strict=True)
    vae.set_attn_processor(AttnProcessor())

    t = yaml.safe_load(yaml_text)["model"]["text_encoder"]
    clip_cfg = CLIPTextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        max_position_embeddings=t["max_position_embeddings"],
        hidden_act=t["hidden_act"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    clip_cfg._attn_implementation = "eager"
    clip = CLIPTextModel(clip_cfg)
    clip_sd = convert_ldm_clip_checkpoint(sd)
    if not hasattr(clip, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (as diffusers handles it)
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    own = set(clip.state_dict())
    dropped = sorted(k for k in clip_sd if k not in own)
    clip.load_state_dict({k: v for k, v in clip_sd.items() if k in own}, strict=True)

    for mod in (unet, vae, clip):
        mod.eval().requires_grad_(False)
    return Reference(
        unet=unet,
        vae=vae,
        text_encoder=clip,
        unet_config=unet_cfg,
        vae_config=vae_cfg,
        clip_keys_dropped=dropped,
        schedule=dict(yaml.safe_load(yaml_text)["model"]["schedule"]),
    )


def diffusers_uint8(image: torch.Tensor) -> np.ndarray:
    """Decoded images (B, 3, H, W) in about [-1, 1] -> uint8 (B, H, W, 3) the way diffusers does it:
    VaeImageProcessor.postprocess(output_type="np") then numpy_to_pil's `(x * 255).round()`."""
    from diffusers.image_processor import VaeImageProcessor

    arr = VaeImageProcessor(vae_scale_factor=8).postprocess(image, output_type="np")  # (B, H, W, 3) in [0, 1]
    return (arr * 255).round().astype(np.uint8)
