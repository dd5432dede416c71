"""Slow: the full-size SD v1.x model, with random weights in a real-format file, through the CLI.

Run with `python -m pytest -m slow`. Writes a ~2 GB fp16 .safetensors into a temporary folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from sd_cli.cli import main

pytestmark = pytest.mark.slow


def test_full_size_random_checkpoint_through_the_cli(tmp_path, capsys):
    from safetensors.torch import save_file

    from sd_cli.weights.config import load_config
    from sd_cli.model.ldm import LatentDiffusion

    cfg = load_config(REPO / "configs/stable-diffusion/v1-inference-cpu.yaml")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LatentDiffusion(cfg.model)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    del model
    ckpt = tmp_path / "random-sd1.safetensors"
    save_file(sd, str(ckpt))
    del sd
    code = main([
        "--ckpt", str(ckpt), "--config", str(REPO / "configs/stable-diffusion/v1-inference-cpu.yaml"),
        "--outdir", str(tmp_path / "out"), "--H", "256", "--W", "256", "--n_samples", "1", "--n_iter", "1",
        "--ddim_steps", "2", "--json", "-q",
    ])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["images"]) == 1
    assert report["images"][0]["width"] == 256 and report["images"][0]["model_name"] == "random-sd1"
