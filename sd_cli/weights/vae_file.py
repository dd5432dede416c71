"""A replacement VAE file (`--vae`, e.g. vae-ft-mse-840000-ema-pruned): its tensors as the model's
`first_stage_model.*` keys, checked strictly against the model.

Accepted layouts: a bare VAE state dict (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`) or
the same under `first_stage_model.`, in `.safetensors` or `.ckpt`/`.pt` (restricted unpickler; a Lightning
`state_dict` is unwrapped). `model_ema.*` and `loss.*` keys (training leftovers) are dropped; any other
key, a missing key or a shape that differs is one error naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_cli.errors import CheckpointError

PREFIX = "first_stage_model."
IGNORED = ("model_ema.", "loss.")


def vae_tensors(path: str | Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """{first_stage_model.* key: tensor} of the VAE file at `path`; `expected`: the model's VAE key shapes."""
    from sd_cli.weights.checkpoint import read_state_dict

    path = Path(path)
    raw = read_state_dict(path)
    if any(k.startswith("model.diffusion_model.") for k in raw):
        raise CheckpointError(f"--vae {path}: this is a full checkpoint, not a VAE file (pass it as --ckpt)")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in raw):
        raise CheckpointError(f"--vae {path}: a diffusers-format VAE (encoder.down_blocks.*); this tool reads the "
                              "original format (encoder.down.*), as in vae-ft-mse-840000-ema-pruned")
    tensors = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.startswith(IGNORED):
            continue
        tensors[PREFIX + name] = value
    _check(path, tensors, expected)
    return tensors


def _check(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    from sd_cli.weights.keys import key_differences

    differences = key_differences(expected, tensors, name=lambda k: k.removeprefix(PREFIX), limit=2)
    if differences:
        raise CheckpointError(f"--vae {path}: not an SD v1 VAE for this model: keys {differences}")
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"--vae {path}: {key[len(PREFIX):]} has shape {tuple(t.shape)}, this model's VAE "
                                  f"needs {tuple(shape)} (a VAE for another model, e.g. SDXL?)")
