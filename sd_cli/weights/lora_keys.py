"""Which model layer a LoRA key names: the module-name table of the add-on formats.

LoRA files name the layers they change in one of four spellings; all end at this project's LDM key
(`model.diffusion_model.input_blocks.1.1.proj_in`, `cond_stage_model.transformer.text_model...q_proj`):

* kohya (sd-scripts, A1111, Civitai): `lora_unet_` + the diffusers module path with `_` for `.`
  (`lora_unet_down_blocks_0_attentions_0_proj_in`), or the LDM path the same way
  (`lora_unet_input_blocks_1_1_proj_in`); `lora_te_` + the CLIP path (`lora_te_text_model_encoder_layers_0_
  self_attn_q_proj`).
* diffusers / PEFT: `unet.` + the diffusers path, `text_encoder.` + the CLIP path, with dots.

The diffusers names of the UNet follow from its construction (the loops of `UNetModel.__init__`):
input block 1 + (r+1) i + j is `down_blocks.i.{resnets,attentions}.j` (r = res blocks per level), the block
after a level is its `downsamplers.0`, output block (r+1) i + j is `up_blocks.i.{resnets,attentions}.j`
with the level's upsampler after its last block, plus the fixed renames of the stem, time embedding, head
and resnet layers (`RESNET`).
"""

from __future__ import annotations

import re

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer."

# ResBlock layer (LDM) -> its diffusers name.
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
FIXED = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
         "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _block_names(num_res_blocks: int, levels: int, output_has_attention) -> dict[str, str]:
    """LDM block prefix -> diffusers block prefix, for every block of the UNet (resnet, attention, sampler)."""
    names = {}
    per = num_res_blocks + 1
    for i in range(levels):
        for j in range(num_res_blocks):
            k = 1 + per * i + j
            names[f"input_blocks.{k}.0"] = f"down_blocks.{i}.resnets.{j}"
            names[f"input_blocks.{k}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            names[f"input_blocks.{per * (i + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    names.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                  "middle_block.2": "mid_block.resnets.1"})
    for i in range(levels):
        for j in range(per):
            k = per * i + j
            names[f"output_blocks.{k}.0"] = f"up_blocks.{i}.resnets.{j}"
            if output_has_attention(k):
                names[f"output_blocks.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
            if i < levels - 1 and j == num_res_blocks:
                up = 2 if output_has_attention(k) else 1
                names[f"output_blocks.{k}.{up}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return names


def diffusers_unet_name(path: str, blocks: dict[str, str]) -> str | None:
    """The diffusers path of UNet module `path` (LDM, without the `model.diffusion_model.` prefix)."""
    if path in FIXED:
        return FIXED[path]
    parts = path.split(".")
    for n in (4, 3, 2):  # the longest block prefix that names a block: "input_blocks.3.0.op", "middle_block.1"
        head = ".".join(parts[:n])
        if head in blocks:
            rest = ".".join(parts[n:])
            if blocks[head].split(".")[-2] == "resnets":
                rest = RESNET.get(rest, rest)
            return blocks[head] + ("." + rest if rest else "")
    return None


def module_table(module_paths: list[str], num_res_blocks: int, levels: int) -> dict[str, str]:
    """Every spelling of every layer -> its LDM module path (the key without `.weight`/`.bias`).

    `module_paths`: the model's modules with weights (full LDM paths). Spellings: kohya `lora_unet_*` in
    the diffusers and in the LDM form, kohya `lora_te_*`, and the dotted `unet.*` / `text_encoder.*`."""
    unet = [p[len(UNET):] for p in module_paths if p.startswith(UNET)]
    has_attention = {p.split(".")[1] for p in unet if p.startswith("output_blocks.") and p.split(".")[2] == "1"
                     and ".proj_in" in p}
    blocks = _block_names(num_res_blocks, levels, lambda k: str(k) in has_attention)
    table: dict[str, str] = {}
    for p in unet:
        full = UNET + p
        table["lora_unet_" + p.replace(".", "_")] = full
        name = diffusers_unet_name(p, blocks)
        if name is not None:
            table["lora_unet_" + name.replace(".", "_")] = full
            table["unet." + name] = full
    for p in module_paths:
        if p.startswith(TEXT):
            q = p[len(TEXT):]
            table["lora_te_" + q.replace(".", "_")] = p
            table["text_encoder." + q] = p
            if q.startswith("text_model."):  # diffusers with transformers 5: the CLIP text model flattened
                table["text_encoder." + q.removeprefix("text_model.")] = p
    return table


# Older diffusers attention-processor LoRA names -> the layer they change.
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_LINEAR_LAYER = re.compile(r"\.lora_linear_layer$")


def canonical_module(prefix: str) -> str:
    """A LoRA key's module part in the table's spelling: the older diffusers forms
    (`attn1.processor.to_q_lora`, `q_proj.lora_linear_layer`) are rewritten; everything else is returned
    as it is."""
    m = _PROCESSOR.search(prefix)
    if m:
        layer = m.group(1)
        prefix = prefix[: m.start()] + "." + ("to_out.0" if layer == "to_out" else layer)
    return _LINEAR_LAYER.sub("", prefix)
