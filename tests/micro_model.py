"""A micro SD v1.x model for the reliability tests: the real key layout (so detection, key matching and
loading run their real code), far fewer tensors and bytes than the `tiny_files` model (2 UNet levels,
1 CLIP layer), so a checkpoint loads in ~0.1 s and can be mutated hundreds of times.

`micro_checkpoints(dir)` writes the model as `.safetensors` and as a Lightning-style `.ckpt` plus its
YAML config; VAE downscale 8 (the CLI defaults `--f 8 --C 4` fit), 64x64 images in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import TINY_YAML, load_config_from_text, save_lightning_ckpt

MICRO_YAML = (
    TINY_YAML.replace("attention_resolutions: [4, 2, 1]", "attention_resolutions: [1]")
    .replace("channel_mult: [1, 2, 4, 4]", "channel_mult: [1, 1]")
    .replace("num_res_blocks: 2\n    num_heads", "num_res_blocks: 1\n    num_heads")
    .replace("ch_mult: [1, 2, 4, 4]\n    num_res_blocks: 2", "ch_mult: [1, 1, 1, 1]\n    num_res_blocks: 1")
    .replace("num_hidden_layers: 12", "num_hidden_layers: 1")
)
assert MICRO_YAML.count("[1, 1") == 2 and "num_hidden_layers: 1\n" in MICRO_YAML


def micro_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from sd_cli.model.ldm import LatentDiffusion

    cfg = load_config_from_text(MICRO_YAML)
    torch.manual_seed(seed)
    model = LatentDiffusion(cfg.model)
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def micro_checkpoints(directory: Path) -> dict[str, Path]:
    """{'config', 'safetensors', 'ckpt'} in `directory` (the ckpt without position_ids, like sd-v1-4)."""
    from safetensors.torch import save_file

    files = {"config": directory / "micro.yaml", "safetensors": directory / "micro.safetensors",
             "ckpt": directory / "micro.ckpt"}
    if all(p.exists() for p in files.values()):  # made already by another test module this session
        return files
    directory.mkdir(parents=True, exist_ok=True)
    sd = micro_state_dict()
    save_file(sd, str(directory / "micro.safetensors"))
    save_lightning_ckpt({k: v for k, v in sd.items() if not k.endswith("position_ids")}, directory / "micro.ckpt")
    (directory / "micro.yaml").write_text(MICRO_YAML)  # last: marks the set complete
    return files


def micro_argv(files: dict[str, Path], outdir: Path, *extra: str, fmt: str = "safetensors") -> list[str]:
    """sd-txt2img arguments for a quick run of the micro model: one 64x64 image, 2 DDIM steps, quiet, one
    CPU thread (much faster than several on a small shared machine)."""
    return ["--ckpt", str(files[fmt]), "--config", str(files["config"]), "--outdir", str(outdir),
            "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
            "--no-watermark", "-q", "--threads", "1", *extra]
