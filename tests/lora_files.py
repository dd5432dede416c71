"""Builders of LoRA / LyCORIS / VAE files for tests/test_lora.py, for the micro model (tests/micro_model.py).

The layer names below are written out by hand from the published naming rules (kohya: `lora_unet_` + the
diffusers module path with `_`; `lora_te_` + the CLIP path; diffusers/PEFT: the same paths with dots),
and each is paired with the LDM weight key it must change in this project's model. They are NOT read from
`sd_cli.weights.lora_keys`, so the tests check that table too.

Micro UNet (as built): 2 levels, 2 res blocks per level, attention only at level 0, channels 32, so
down_blocks.0 = input_blocks 1, 2 (+ attention), its downsampler input_blocks.3.0.op, down_blocks.1 =
input_blocks 4, 5; up_blocks.0 = output_blocks 0, 1, 2 (no attention, upsampler output_blocks.2.1.conv),
up_blocks.1 = output_blocks 3, 4, 5 (with attention). Text encoder: 1 CLIP layer, width 32.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

U = "model.diffusion_model."
T = "cond_stage_model.transformer."

# name -> (kohya module name, LDM module path (the key without .weight), weight shape)
LAYERS = {
    "q": ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
          U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q", (32, 32)),
    "ff": ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
           U + "middle_block.1.transformer_blocks.0.ff.net.0.proj", (256, 32)),
    "ff2": ("lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
            U + "output_blocks.4.1.transformer_blocks.0.ff.net.2", (32, 128)),
    "conv": ("lora_unet_up_blocks_0_resnets_0_conv1", U + "output_blocks.0.0.in_layers.2", (32, 64, 3, 3)),
    "conv2": ("lora_unet_down_blocks_0_resnets_1_conv2", U + "input_blocks.2.0.out_layers.3", (32, 32, 3, 3)),
    "skip": ("lora_unet_up_blocks_0_resnets_0_conv_shortcut", U + "output_blocks.0.0.skip_connection", (32, 64, 1, 1)),
    "proj_in": ("lora_unet_down_blocks_0_attentions_0_proj_in", U + "input_blocks.1.1.proj_in", (32, 32, 1, 1)),
    "proj_out": ("lora_unet_up_blocks_1_attentions_2_proj_out", U + "output_blocks.5.1.proj_out", (32, 32, 1, 1)),
    "upsample": ("lora_unet_up_blocks_0_upsamplers_0_conv", U + "output_blocks.2.1.conv", (32, 32, 3, 3)),
    "downsample": ("lora_unet_down_blocks_0_downsamplers_0_conv", U + "input_blocks.3.0.op", (32, 32, 3, 3)),
    "mid_res": ("lora_unet_mid_block_resnets_1_conv2", U + "middle_block.2.out_layers.3", (32, 32, 3, 3)),
    "emb": ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", U + "input_blocks.4.0.emb_layers.1", (32, 128)),
    "time2": ("lora_unet_time_embedding_linear_2", U + "time_embed.2", (128, 128)),
    "conv_in": ("lora_unet_conv_in", U + "input_blocks.0.0", (32, 4, 3, 3)),
    "conv_out": ("lora_unet_conv_out", U + "out.2", (4, 32, 3, 3)),
    "norm_out": ("lora_unet_conv_norm_out", U + "out.0", (32,)),
    "te_q": ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
             T + "text_model.encoder.layers.0.self_attn.q_proj", (32, 32)),
    "te_k": ("lora_te_text_model_encoder_layers_0_self_attn_k_proj",
             T + "text_model.encoder.layers.0.self_attn.k_proj", (32, 32)),
    "te_v": ("lora_te_text_model_encoder_layers_0_self_attn_v_proj",
             T + "text_model.encoder.layers.0.self_attn.v_proj", (32, 32)),
    "te_out": ("lora_te_text_model_encoder_layers_0_self_attn_out_proj",
               T + "text_model.encoder.layers.0.self_attn.out_proj", (32, 32)),
    "te_fc1": ("lora_te_text_model_encoder_layers_0_mlp_fc1", T + "text_model.encoder.layers.0.mlp.fc1", (64, 32)),
    "te_fc2": ("lora_te_text_model_encoder_layers_0_mlp_fc2", T + "text_model.encoder.layers.0.mlp.fc2", (32, 64)),
    "te_norm": ("lora_te_text_model_final_layer_norm", T + "text_model.final_layer_norm", (32,)),
}

# The same layers in the LDM spelling of kohya's names.
LDM_SPELLED = {
    "lora_unet_input_blocks_1_1_proj_in": (U + "input_blocks.1.1.proj_in", (32, 32, 1, 1)),
    "lora_unet_middle_block_2_out_layers_3": (U + "middle_block.2.out_layers.3", (32, 32, 3, 3)),
    "lora_unet_output_blocks_2_1_conv": (U + "output_blocks.2.1.conv", (32, 32, 3, 3)),
    "lora_unet_time_embed_0": (U + "time_embed.0", (128, 32)),
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v": (
        U + "output_blocks.3.1.transformer_blocks.0.attn2.to_v", (32, 32)),
}


class Rand:
    """Seeded random factors, small enough that merged weights stay ordinary floats."""

    def __init__(self, seed: int = 0, scale: float = 0.3):
        self.g, self.scale = torch.Generator().manual_seed(seed), scale

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.g) * self.scale


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """`.safetensors` through the library, anything else through torch.save (a PyTorch zip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


def kohya(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None,
          mid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    out = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    if mid is not None:
        out[f"{name}.lora_mid.weight"] = mid
    return out


def strong_lora(seed: int, te: bool = True) -> dict[str, torch.Tensor]:
    """A kohya LoRA with big enough changes (several UNet layers, optionally the text encoder) that the
    micro model's 64x64 image visibly changes."""
    r = Rand(seed, scale=0.6)
    t = {}
    for key in ("q", "ff", "proj_out", "ff2"):
        name, _, shape = LAYERS[key]
        t |= kohya(name, r(4, shape[1]), r(shape[0], 4))
    name, _, shape = LAYERS["conv_out"]
    t |= kohya(name, r(4, 32, 3, 3), r(4, 4, 1, 1), alpha=4)
    if te:
        for key in ("te_q", "te_fc1"):
            name, _, shape = LAYERS[key]
            t |= kohya(name, r(4, shape[1]), r(shape[0], 4))
    return t


class Reduce:
    """Pickles as `func(*args)`: the shape of every code-execution payload (as in tests/test_checkpoint.py)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def evil_payloads(marker: Path) -> dict[str, Reduce]:
    """Each creates `marker` if it is ever unpickled."""
    return {"os.system": Reduce(os.system, f"touch {marker}"),
            "exec": Reduce(exec, f"open({str(marker)!r}, 'w').close()")}


def evil_pt(path: Path, top: dict) -> Path:
    """torch.save of `top` (which holds a payload) with the plain pickle module: a real .pt file layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(top, path, pickle_module=pickle)
    return path
