"""Shared fixtures: a tiny random SD v1.x model with the exact checkpoint key layout, saved both as
`.safetensors` and as a PyTorch Lightning-style `.ckpt`, plus the YAML config that describes it."""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

# Same key names as SD v1 (4 levels, 2 res blocks, attention at 4/2/1, 12 CLIP layers), tiny widths.
TINY_YAML = """\
model:
  family: sd1
  scale_factor: 0.18215
  schedule: {linear_start: 0.00085, linear_end: 0.012, timesteps: 1000}
  unet:
    in_channels: 4
    out_channels: 4
    model_channels: 32
    attention_resolutions: [4, 2, 1]
    num_res_blocks: 2
    channel_mult: [1, 2, 4, 4]
    num_heads: 2
    transformer_depth: 1
    context_dim: 32
  vae:
    embed_dim: 4
    z_channels: 4
    in_channels: 3
    out_ch: 3
    ch: 32
    ch_mult: [1, 2, 4, 4]
    num_res_blocks: 2
    attn_resolutions: []
    resolution: 256
  text_encoder:
    vocab_size: 49408
    hidden_size: 32
    intermediate_size: 64
    num_hidden_layers: 12
    num_attention_heads: 2
    max_position_embeddings: 77
    hidden_act: quick_gelu
runtime:
  device: cpu
  precision: full
"""


def make_tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for the tiny config (a new dict; the tensors are shared, don't modify them in place)."""
    return dict(_tiny_state_dict(seed))


@functools.lru_cache(maxsize=2)
def _tiny_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Norms get non-trivial affine params so they are tested too."""
    from sd_cli.weights.config import load_config
    from sd_cli.model.ldm import LatentDiffusion

    cfg = load_config_from_text(TINY_YAML)
    torch.manual_seed(seed)
    model = LatentDiffusion(cfg.model)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and (k.endswith(".weight") or k.endswith(".bias")) and not k.startswith(("betas",)):
            if v.ndim == 1 and k.endswith(".weight"):  # norm scales around 1
                v = 1.0 + 0.1 * torch.randn(v.shape, generator=gen)
            elif v.ndim == 1:  # biases
                v = 0.05 * torch.randn(v.shape, generator=gen)
        sd[k] = v.contiguous().clone()
    return sd


def load_config_from_text(text: str):
    import tempfile

    from sd_cli.weights.config import load_config

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "tiny.yaml"
        p.write_text(text)
        return load_config(p)


class _FakeModelCheckpoint:
    """Stands in for pytorch_lightning's ModelCheckpoint while pickling; not importable at load time."""

    def __init__(self):
        self.monitor = None
        self.best_model_score = np.float64(0.123)
        self.best_model_path = "/data/logs/checkpoints/last.ckpt"
        self.save_top_k = np.int64(1)


def save_lightning_ckpt(sd: dict[str, torch.Tensor], path: Path, with_ema: bool = True) -> None:
    """Write `sd` the way a PyTorch Lightning 1.x training run (sd-v1-4.ckpt) does."""
    mod_name = "pytorch_lightning.callbacks.model_checkpoint"
    created = []
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod_name):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            created.append(name)
    cls = type("ModelCheckpoint", (_FakeModelCheckpoint,), {"__module__": mod_name})
    sys.modules[mod_name].ModelCheckpoint = cls
    try:
        state = dict(sd)
        if with_ema:
            state["model_ema.decay"] = torch.tensor(0.9999)
            state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
            state["model_ema.diffusion_modelout2weight"] = torch.zeros(2, 2)
        obj = {
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {cls: {"best_model_score": np.float64(0.5), "monitor": None}, "ckpt": cls()},
            "state_dict": state,
        }
        torch.save(obj, path)
    finally:
        for name in created:
            del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """{'config', 'safetensors', 'ckpt'}: the tiny model in both formats (ckpt without position_ids)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_model")
    sd = make_tiny_state_dict()
    (d / "tiny.yaml").write_text(TINY_YAML)
    save_file(sd, str(d / "tiny.safetensors"))
    ckpt_sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    save_lightning_ckpt(ckpt_sd, d / "tiny.ckpt")
    return {"config": d / "tiny.yaml", "safetensors": d / "tiny.safetensors", "ckpt": d / "tiny.ckpt"}


# Fixtures of the micro-model test files (test_fuzz, test_reliability, test_resume_replay, ...).


@pytest.fixture
def private_hash_cache(tmp_path_factory, monkeypatch):
    """The checkpoint hash cache in the test session's temp dir, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "hash-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Micro-model runs are far faster on one thread on a small shared machine (no spinning threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """The micro model's checkpoints (tests/micro_model.py), made once per session."""
    from micro_model import micro_checkpoints

    return micro_checkpoints(tmp_path_factory.getbasetemp() / "micro_model")
