"""The model tree: exact SD v1.x keys and shapes, forward shapes, and strict loading of real-format files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import SHARED, TINY_YAML, load_config_from_text, make_tiny_state_dict, save_lightning_ckpt
from sd_cli.weights.config import load_config
from sd_cli.errors import CheckpointError
from sd_cli.weights.loading import build_meta_model, load_model


def test_full_size_meta_model_has_exactly_the_sd1_tensors():
    spec = {name: (tuple(shape), dtype) for name, shape, dtype in json.loads((SHARED / "sd1_keys.json").read_text())}
    model = build_meta_model(load_config("configs/stable-diffusion/v1-inference.yaml").model)
    ours = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    assert sorted(set(spec) - set(ours)) == []
    assert sorted(set(ours) - set(spec)) == []
    wrong = {k: (ours[k], spec[k]) for k in spec if ours[k] != spec[k]}
    assert wrong == {}
    assert len(ours) == 1143
    n_params = sum(v.numel() for k, v in model.state_dict().items() if v.is_floating_point())
    # UNet 859.5M + VAE 83.7M + CLIP text 123.1M (+ 12 schedule buffers of 1000)
    assert 1_066_000_000 < n_params < 1_067_000_000


def test_tiny_model_has_the_same_key_names_as_sd1():
    spec = {name for name, _, _ in json.loads((SHARED / "sd1_keys.json").read_text())}
    assert set(make_tiny_state_dict()) == spec


def test_compvis_config_reads_the_same_numbers(tmp_path):
    compvis = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    scheduler_config:
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params: {warm_up_steps: [10000], cycle_lengths: [10000000000000], f_start: [1.e-6], f_max: [1.], f_min: [1.]}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""
    p = tmp_path / "v1-inference.yaml"
    p.write_text(compvis)
    ours = load_config("configs/stable-diffusion/v1-inference.yaml")
    theirs = load_config(p)
    assert theirs.model == ours.model
    # A target outside the SD v1 set is refused, never imported.
    p.write_text(compvis.replace("ldm.models.autoencoder.AutoencoderKL", "os.system"))
    with pytest.raises(Exception, match="not a Stable Diffusion v1 component"):
        load_config(p)


@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (72, 56)])
def test_unet_and_vae_shapes(hw):
    cfg = load_config_from_text(TINY_YAML).model
    from sd_cli.model.ldm import LatentDiffusion

    torch.manual_seed(0)
    model = LatentDiffusion(cfg).eval()
    h, w = hw[0] // 8, hw[1] // 8
    x = torch.randn(2, 4, h, w)
    ctx = torch.randn(2, 77, 32)
    with torch.no_grad():
        eps = model.unet(x, torch.tensor([1.0, 981.0]), ctx)
        img = model.decode(x)
        ids = torch.full((2, 77), 49407)
        ids[:, 0] = 49406
        emb = model.encode_text(ids)
    assert eps.shape == (2, 4, h, w)
    assert img.shape == (2, 3, hw[0], hw[1])
    assert emb.shape == (2, 77, 32)
    assert torch.isfinite(eps).all() and torch.isfinite(img).all()


def _run_tiny(model, seed=1):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    ids = torch.full((1, 77), 49407)
    ids[0, :3] = torch.tensor([49406, 320, 1125])
    with torch.no_grad():
        ctx = model.encode_text(ids)
        return model.unet(x, torch.tensor([500.0]), ctx), model.decode(x), ctx


def test_safetensors_and_lightning_ckpt_load_identically(tiny_files):
    cfg = load_config(tiny_files["config"]).model
    a = load_model(cfg, tiny_files["safetensors"])
    b = load_model(cfg, tiny_files["ckpt"])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    sd = make_tiny_state_dict()
    assert torch.equal(a.state_dict()["model.diffusion_model.out.2.weight"], sd["model.diffusion_model.out.2.weight"])
    for ta, tb in zip(_run_tiny(a), _run_tiny(b)):
        assert torch.equal(ta, tb)


def test_fp16_and_bf16_files_load_and_convert(tmp_path):
    cfg = load_config_from_text(TINY_YAML).model
    sd = make_tiny_state_dict()
    for dt in (torch.float16, torch.bfloat16):
        half = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in sd.items()}
        save_file(half, str(tmp_path / "m.safetensors"))
        m = load_model(cfg, tmp_path / "m.safetensors")
        w = m.state_dict()["first_stage_model.decoder.conv_in.weight"]
        assert w.dtype == torch.float32
        assert torch.equal(w, sd["first_stage_model.decoder.conv_in.weight"].to(dt).float())


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    cfg = load_config_from_text(TINY_YAML).model
    sd = make_tiny_state_dict()
    del sd["model.diffusion_model.out.2.weight"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(cfg, tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "1 missing (model.diffusion_model.out.2.weight)" in msg
    assert "1 unexpected (model.diffusion_model.extra.weight)" in msg


def test_wrong_config_for_checkpoint_is_a_clear_error(tiny_files):
    full = load_config("configs/stable-diffusion/v1-inference.yaml").model
    with pytest.raises(CheckpointError, match="does not match the config's model sizes"):
        load_model(full, tiny_files["safetensors"])


def test_schedule_and_position_ids_are_derived_not_trusted(tmp_path):
    cfg = load_config_from_text(TINY_YAML).model
    sd = make_tiny_state_dict()
    good = load_model(cfg, _save(tmp_path / "a.safetensors", sd))
    # A merged checkpoint with float, slightly-off position_ids and no schedule buffers.
    sd2 = {k: v for k, v in sd.items() if not k.startswith(("alphas", "betas", "sqrt", "log_", "posterior"))}
    sd2["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] - 0.0001
    m = load_model(cfg, _save(tmp_path / "b.safetensors", sd2))
    pos = m.state_dict()["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77)[None])
    assert torch.equal(m.alphas_cumprod, good.alphas_cumprod)
    assert abs(float(m.alphas_cumprod[0]) - 0.99915) < 1e-5


def _save(path, sd):
    save_file(sd, str(path))
    return path


def test_lightning_ckpt_with_nested_state_and_no_ema(tmp_path):
    cfg = load_config_from_text(TINY_YAML).model
    sd = make_tiny_state_dict()
    save_lightning_ckpt(sd, tmp_path / "m.ckpt", with_ema=False)
    m = load_model(cfg, tmp_path / "m.ckpt")
    assert torch.equal(m.state_dict()["first_stage_model.quant_conv.weight"], sd["first_stage_model.quant_conv.weight"])
