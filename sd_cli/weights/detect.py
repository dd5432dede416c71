"""Tell the model family of a state dict from its key names and tensor shapes.

Works on `{name: Tensor}` or `{name: shape}` (tuples, `torch.Size`, meta tensors), so callers can detect
before materialising weights and tests can use fake shapes. Decisions rest on key layout and structure
(which text encoder, class embedding present, UNet input channels, cross-attention width matching the
text encoder), never on absolute model widths alone, so a tiny test model with the SD 1.x layout is SD 1.x.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sd_cli.errors import UnsupportedModelError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
IN_CONV = UNET + "input_blocks.0.0.weight"  # (C_out, C_in, 3, 3): C_in is the latent + conditioning channels
CLIP_HF = "cond_stage_model.transformer."  # SD 1.x: Hugging Face CLIPTextModel keys
OPENCLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H keys
SDXL_CONDITIONER = "conditioner.embedders."
CLIP_HF_WIDTH = CLIP_HF + "text_model.final_layer_norm.weight"  # (hidden,)
SD1_CONTEXT = 768

# The parts a full CompVis-layout checkpoint holds, with the prefix that names each.
PARTS = (("UNet", UNET), ("VAE", VAE), ("text encoder", "cond_stage_model."))


@dataclass(frozen=True)
class Detection:
    family: str  # "sd1", "sd1-inpaint", "sd2", "sdxl", "vae", "diffusers", "unknown", ...
    description: str  # human name: "Stable Diffusion 1.x", "SDXL", "a VAE, not a full model", ...
    missing: tuple[str, ...] = ()  # parts of a full checkpoint that are absent: "UNet", "VAE", "text encoder"
    in_channels: int | None = None  # UNet input channels (4 = txt2img, 9 = inpainting)
    context_dim: int | None = None  # cross-attention context width (768 for SD 1.x)


@dataclass(frozen=True)
class _Rule:
    """One row of the family table; `None` means "any". The first matching row wins."""

    family: str
    description: str
    text_encoders: tuple[str | None, ...] | None = None  # allowed kinds from `_text_encoder_kind`
    label_emb: bool | None = None  # SDXL's class/size embedding in the UNet
    in_channels: tuple[int, ...] | None = None
    context: tuple[int, ...] | str | None = None  # "text": equals the text encoder's width (768 if none)


_SD1_TE = ("clip-hf", None)
_UNET_RULES = (
    _Rule("sdxl-refiner", "SDXL refiner", label_emb=True, context=(1280,)),
    _Rule("sdxl-inpaint", "SDXL inpainting", label_emb=True, in_channels=(9,)),
    _Rule("sdxl", "SDXL", label_emb=True),
    _Rule("sdxl", "SDXL", text_encoders=("sdxl",)),
    _Rule("sd2-inpaint", "Stable Diffusion 2.x inpainting", text_encoders=("openclip",), in_channels=(9,)),
    _Rule("sd2-depth", "Stable Diffusion 2.x depth-to-image", text_encoders=("openclip",), in_channels=(5,)),
    _Rule("sd2", "Stable Diffusion 2.x", text_encoders=("openclip",)),
    _Rule("sd2", "Stable Diffusion 2.x", text_encoders=(None,), context=(1024,)),
    _Rule("sd1-inpaint", "Stable Diffusion 1.x inpainting", _SD1_TE, False, (9,), "text"),
    _Rule("sd1-pix2pix", "Stable Diffusion 1.x InstructPix2Pix", _SD1_TE, False, (8,), "text"),
    _Rule("sd1", "Stable Diffusion 1.x", _SD1_TE, False, (4,), "text"),
)

# Families recognised by a marker key prefix anywhere in the file (with or without the UNet prefix).
_MARKERS = (
    ("sd3", "Stable Diffusion 3", ("joint_blocks.",)),
    ("flux", "FLUX", ("double_blocks.",)),
)

# Files that are one part of a model or another format, checked in order when there is no CompVis-layout
# model in the file: (family, description, how a key matches, needles).
_NOT_A_CHECKPOINT = (
    ("lora", "a LoRA, not a full model", "contains", ("lora_", "lora.")),
    ("embedding", "a textual-inversion embedding, not a full model", "contains",
     ("string_to_param", "emb_params")),
    ("vae", "a VAE, not a full model", "all start with",
     ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE)),
    ("diffusers", "a Diffusers-format model (diffusers layout), not a single-file checkpoint", "starts with",
     ("unet.", "conv_in.", "down_blocks.", "mid_block.", "time_embedding.", "text_encoder.", "vae.")),
    ("text-encoder", "a CLIP text encoder, not a full model", "all start with",
     ("text_model.", "transformer.text_model.")),
)


def _matches(keys: list[str], how: str, needles: tuple[str, ...]) -> bool:
    if how == "contains":
        return any(n in k for k in keys for n in needles)
    if how == "starts with":
        return any(k.startswith(needles) for k in keys)
    return bool(keys) and all(k.startswith(needles) for k in keys)  # "all start with"


def detect_model(state_dict: Mapping[str, Any]) -> Detection:
    """Name the model family of `state_dict` (values: tensors or shapes)."""
    keys = [k for k in state_dict if isinstance(k, str)]

    for family, description, markers in _MARKERS:
        if any(m in k for k in keys for m in markers):
            return Detection(family, description)

    has_unet = any(k.startswith(UNET) for k in keys)
    te_kind = _text_encoder_kind(keys)
    missing = tuple(part for part, prefix in PARTS if not _has_part(keys, prefix))
    if has_unet:
        return _detect_unet(state_dict, keys, te_kind, missing)
    if te_kind is not None:
        # A text encoder (and maybe a VAE) in CompVis layout but no UNet: name the family it came from.
        family, description = {
            "clip-hf": ("sd1", "Stable Diffusion 1.x"),
            "openclip": ("sd2", "Stable Diffusion 2.x"),
            "sdxl": ("sdxl", "SDXL"),
        }[te_kind]
        return Detection(family, description, missing=missing)

    for family, description, how, needles in _NOT_A_CHECKPOINT:
        if _matches(keys, how, needles):
            return Detection(family, description)
    return Detection("unknown", "an unrecognised model (no Stable Diffusion UNet found)")


def require_sd1(state_dict: Mapping[str, Any], path: str | Path, inpainting: bool = False) -> None:
    """Raise `UnsupportedModelError` unless `state_dict` is a complete Stable Diffusion 1.x checkpoint
    (of the inpainting kind when `inpainting`, the config's)."""
    found = detect_model(state_dict)
    if found.family == ("sd1" if inpainting else "sd1-inpaint"):
        want = "v1-inference.yaml" if inpainting else "v1-inpainting-inference.yaml"
        raise UnsupportedModelError(f"{path} is {found.description} but the config is for the other kind; pass "
                                    f"--config configs/stable-diffusion/{want}")
    if found.family != ("sd1-inpaint" if inpainting else "sd1"):
        raise UnsupportedModelError(
            f"{path}: unsupported model (looks like {found.description}); "
            "sd-txt2img runs Stable Diffusion 1.x checkpoints"
        )
    if found.missing:
        parts = " and ".join(f"{part} ({dict(PARTS)[part]}*)" for part in found.missing)
        raise UnsupportedModelError(
            f"{path}: incomplete {found.description} checkpoint, the {parts} weights are missing; "
            "use a full checkpoint"
        )


def unet_in_channels(path: str | Path) -> int | None:
    """The UNet input channels of the checkpoint at `path` (9: inpainting), read from its tensor index
    without loading the weights (memory-mapped); None when it has no CompVis-layout UNet."""
    from sd_cli.weights.checkpoint import read_state_dict

    t = read_state_dict(path).get(IN_CONV)
    return int(t.shape[1]) if t is not None and t.dim() == 4 else None


def _has_part(keys: list[str], prefix: str) -> bool:
    if prefix == "cond_stage_model.":
        return any(k.startswith((prefix, SDXL_CONDITIONER)) for k in keys)
    return any(k.startswith(prefix) for k in keys)


def _text_encoder_kind(keys: list[str]) -> str | None:
    if any(k.startswith(SDXL_CONDITIONER) for k in keys):
        return "sdxl"
    if any(k.startswith(OPENCLIP) for k in keys):
        return "openclip"
    if any(k.startswith(CLIP_HF) for k in keys):
        return "clip-hf"
    return None


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", value)
    try:
        return tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        return None


def _dim(state_dict: Mapping[str, Any], key: str, axis: int) -> int | None:
    shape = _shape(state_dict[key]) if key in state_dict else None
    return shape[axis] if shape is not None and len(shape) > axis else None


def _detect_unet(
    state_dict: Mapping[str, Any], keys: list[str], te_kind: str | None, missing: tuple[str, ...]
) -> Detection:
    in_channels = _dim(state_dict, IN_CONV, 1)
    to_k = next((k for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    context = _dim(state_dict, to_k, 1) if to_k else None
    label_emb = any(k.startswith(UNET + "label_emb.") for k in keys)
    text_width = _dim(state_dict, CLIP_HF_WIDTH, 0) if te_kind == "clip-hf" else SD1_CONTEXT

    for rule in _UNET_RULES:
        if rule.text_encoders is not None and te_kind not in rule.text_encoders:
            continue
        if rule.label_emb is not None and rule.label_emb != label_emb:
            continue
        if rule.in_channels is not None and in_channels not in rule.in_channels:
            continue
        wanted = (text_width,) if rule.context == "text" else rule.context
        if wanted is not None and context not in wanted:
            continue
        return Detection(rule.family, rule.description, missing, in_channels, context)
    return Detection(
        "unknown",
        f"an unrecognised Stable Diffusion variant (UNet in_channels={in_channels}, context={context})",
        missing,
        in_channels,
        context,
    )
