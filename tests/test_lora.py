"""LoRA / LyCORIS / VAE files (issue 15, commit 516205d), tested against the published algorithms.

Every expected weight here is computed by this file from the factors with plain torch ops written out
below (never with sd_cli's delta functions), and every expected layer name is written out by hand
(tests/lora_files.py), so the key table, the delta formulas, the merge, the prompt tags, the batching,
the metadata and the error paths are each checked from outside. Micro model (tests/micro_model.py).

The bugs this file found (LoHa/LoKr conv layout, LoKr Tucker kron, rank-0 factors, the checkpoint stamp,
the seed limit under LoRA batching) are fixed; their tests stay as regressions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_YAML, load_config_from_text, save_lightning_ckpt
from lora_files import LAYERS, LDM_SPELLED, Rand, T, U, evil_payloads, evil_pt, kohya, save, strong_lora
from micro_model import micro_argv
from sd_cli.cli import main
from sd_cli.errors import CheckpointError, UsageError
from sd_cli.output.png import read_png_metadata

pytestmark = pytest.mark.usefixtures("private_hash_cache", "one_torch_thread")  # (tests/conftest.py)

W = lambda key: LAYERS[key][1] + ".weight"  # noqa: E731  the LDM weight key of a named layer
B = lambda key: LAYERS[key][1] + ".bias"  # noqa: E731
N = lambda key: LAYERS[key][0]  # noqa: E731  its kohya name
SHAPE = lambda key: LAYERS[key][2]  # noqa: E731


@pytest.fixture(scope="module")
def base(micro):
    """The micro checkpoint's own tensors (float32): what every untouched weight must equal bit for bit."""
    return load_file(str(micro["safetensors"]))


@pytest.fixture(scope="module")
def layout(micro):
    from sd_cli.weights.config import load_config
    from sd_cli.weights.lora import model_layout

    return model_layout(load_config(micro["config"]).model)


def load_sd(micro, loras=(), **kw):
    from sd_cli.run.api import StableDiffusion

    return StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32", threads=1,
                                loras=list(loras), **kw)


def render(sd, prompt="a cat", seed=0, steps=1):
    """One image (the LoRA set is merged when an image is made); its pixels."""
    return np.asarray(sd.txt2img(prompt, seed=seed, steps=steps, height=64, width=64, watermark=False)[0])


def weights(sd) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.pipeline().model.state_dict().items()}


def merged_state(micro, loras, prompt="a cat", **kw) -> dict[str, torch.Tensor]:
    sd = load_sd(micro, loras, **kw)
    render(sd, prompt)
    return weights(sd)


def assert_merged(state, base, expected: dict[str, torch.Tensor], w: float = 1.0, te: float | None = None):
    """Targeted keys: base + w * dW (float32, tight); every other tensor bit-identical to the checkpoint."""
    for key, dw in expected.items():
        wk = te if te is not None and key.startswith(T) else w
        want = base[key] + wk * dw.reshape(base[key].shape)
        torch.testing.assert_close(state[key], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        if wk != 0:
            assert (state[key] - base[key]).abs().max() > 1e-3, f"{key} did not change"
    for key in base:
        if key not in expected:
            assert torch.equal(state[key], base[key]), f"{key} changed but no LoRA targets it"


# --------------------------------------------------------------------------------------------------
# The published algorithms, written out independently
# --------------------------------------------------------------------------------------------------


def ref_lora(up, down, alpha=None):
    """kohya LoRA / LoCon: dW[o, i(, y, x)] = sum_r up[o, r] down[r, i(, y, x)] * alpha / rank."""
    rank = down.shape[0]
    u = up.reshape(up.shape[0], rank)
    dw = torch.einsum("or,rihw->oihw", u, down) if down.dim() == 4 else u @ down
    return dw * (alpha / rank if alpha is not None else 1.0)


def ref_tucker_locon(mid, up, down, alpha=None):
    """dW[i, j, k, l] = sum_{n,m} mid[n, m, k, l] up[i, n] down[m, j]."""
    rank = down.shape[0]
    u, d = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
    out = torch.zeros(u.shape[0], d.shape[1], *mid.shape[2:])
    for n in range(mid.shape[0]):
        for m in range(mid.shape[1]):
            out += u[:, n, None, None, None] * d[m][None, :, None, None] * mid[n, m][None, None]
    return out * (alpha / rank if alpha is not None else 1.0)


def ref_tucker_factor(t, a, b):
    """A LyCORIS Tucker factor: a (r, out) on t's first index, b (r, in) on its second -> (out, in, kh, kw)."""
    return torch.einsum("abhw,ao,bi->oihw", t, a, b)


def kron(w1, w2):
    """Kronecker product by broadcasting (out = o1*o2, in = i1*i2; a 4-D w2 keeps its kernel)."""
    o1, i1 = w1.shape
    o2, i2 = w2.shape[:2]
    if w2.dim() == 2:
        return (w1[:, None, :, None] * w2[None, :, None, :]).reshape(o1 * o2, i1 * i2)
    k = w2.shape[2:]
    return (w1[:, None, :, None, None, None] * w2[None, :, None, :, :, :]).reshape(o1 * o2, i1 * i2, *k)


# --------------------------------------------------------------------------------------------------
# 1. Every format: merged weight == checkpoint + w * dW, everything else untouched
# --------------------------------------------------------------------------------------------------


def case_kohya(r):
    t, e = {}, {}
    for key, rank, alpha in (("ff", 4, 2.0), ("emb", 3, None), ("time2", 4, 8.0), ("te_fc1", 4, 4.0),
                             ("te_q", 2, 1.0)):  # linear
        out, inp = SHAPE(key)
        down, up = r(rank, inp), r(out, rank)
        t |= kohya(N(key), down, up, alpha)
        e[W(key)] = ref_lora(up, down, alpha)
    for key, alpha in (("conv", 1.0), ("upsample", None), ("downsample", 3.0), ("conv_in", 2.0)):  # 3x3 LoCon
        out, inp = SHAPE(key)[:2]
        down, up = r(4, inp, 3, 3), r(out, 4, 1, 1)
        t |= kohya(N(key), down, up, alpha)
        e[W(key)] = ref_lora(up, down, alpha)
    for key, alpha in (("skip", None), ("proj_in", 2.0)):  # 1x1 convs, 4-D factors
        out, inp = SHAPE(key)[:2]
        down, up = r(4, inp, 1, 1), r(out, 4, 1, 1)
        t |= kohya(N(key), down, up, alpha)
        e[W(key)] = ref_lora(up, down, alpha).reshape(SHAPE(key))
    down, up = r(2, 32), r(32, 2)  # a 1x1 conv (proj_out) with linear-shaped factors, as SD2-style files have
    t |= kohya(N("proj_out"), down, up, 1.0)
    e[W("proj_out")] = ref_lora(up, down, 1.0)
    return t, e


def case_kohya_ldm_spelling(r):
    t, e = {}, {}
    for name, (target, shape) in LDM_SPELLED.items():
        if len(shape) == 4:
            down, up = r(4, shape[1], *shape[2:]), r(shape[0], 4, 1, 1)
        else:
            down, up = r(4, shape[1]), r(shape[0], 4)
        t |= kohya(name, down, up, 2.0)
        e[target + ".weight"] = ref_lora(up, down, 2.0).reshape(shape)
    return t, e


def case_locon_tucker(r):
    t, e = {}, {}
    for key, rank, alpha in (("conv", 4, 2.0), ("mid_res", 3, None)):
        out, inp = SHAPE(key)[:2]
        mid, down, up = r(rank, rank, 3, 3), r(rank, inp, 1, 1), r(out, rank, 1, 1)
        t |= kohya(N(key), down, up, alpha, mid=mid)
        e[W(key)] = ref_tucker_locon(mid, up, down, alpha)
    return t, e


def _loha(name, w1a, w1b, w2a, w2b, alpha=None, t1=None, t2=None):
    t = {f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a, f"{name}.hada_w2_b": w2b}
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(float(alpha))
    if t1 is not None:
        t[f"{name}.hada_t1"], t[f"{name}.hada_t2"] = t1, t2
    return t


def case_loha(r):
    t, e = {}, {}
    for key, rank, alpha in (("ff", 4, 2.0), ("te_fc1", 2, None), ("ff2", 3, 6.0)):
        out, inp = SHAPE(key)
        w1a, w1b, w2a, w2b = r(out, rank), r(rank, inp), r(out, rank), r(rank, inp)
        t |= _loha(N(key), w1a, w1b, w2a, w2b, alpha)
        e[W(key)] = (w1a @ w1b) * (w2a @ w2b) * (alpha / rank if alpha else 1.0)
    return t, e


def case_loha_conv(r):
    """LyCORIS LoHa on a 3x3 conv without Tucker (its default): hada_w1_b is (rank, in * kh * kw)."""
    out, inp, kh, kw = SHAPE("conv")
    w1a, w1b, w2a, w2b = r(out, 4), r(4, inp * kh * kw), r(out, 4), r(4, inp * kh * kw)
    t = _loha(N("conv"), w1a, w1b, w2a, w2b, 2.0)
    return t, {W("conv"): ((w1a @ w1b) * (w2a @ w2b) * 0.5).reshape(out, inp, kh, kw)}


def case_loha_tucker(r):
    t, e = {}, {}
    for key, rank, alpha in (("conv", 4, 2.0), ("upsample", 2, None)):
        out, inp = SHAPE(key)[:2]
        t1, w1a, w1b = r(rank, rank, 3, 3), r(rank, out), r(rank, inp)
        t2, w2a, w2b = r(rank, rank, 3, 3), r(rank, out), r(rank, inp)
        t |= _loha(N(key), w1a, w1b, w2a, w2b, alpha, t1, t2)
        dw = ref_tucker_factor(t1, w1a, w1b) * ref_tucker_factor(t2, w2a, w2b)
        e[W(key)] = dw * (alpha / rank if alpha else 1.0)
    return t, e


def case_lokr(r):
    t, e = {}, {}
    name = N("ff")  # (256, 32): w1 full (16, 4), w2 split (16, 2) @ (2, 8), alpha 1: scale 1/2
    w1, w2a, w2b = r(16, 4), r(16, 2), r(2, 8)
    t |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(1.0)}
    e[W("ff")] = kron(w1, w2a @ w2b) * 0.5
    name = N("q")  # (32, 32): both full, alpha given but no factor split: scale 1
    w1, w2 = r(4, 4), r(8, 8)
    t |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(8.0)}
    e[W("q")] = kron(w1, w2)
    name = N("te_fc1")  # (64, 32): w1 split (8, 2) @ (2, 4), w2 full (8, 8), alpha 3: scale 3 / 2
    w1a, w1b, w2 = r(8, 2), r(2, 4), r(8, 8)
    t |= {f"{name}.lokr_w1_a": w1a, f"{name}.lokr_w1_b": w1b, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(3.0)}
    e[W("te_fc1")] = kron(w1a @ w1b, w2) * 1.5
    name = N("emb")  # (32, 128): both split, no alpha: scale 1
    w1a, w1b, w2a, w2b = r(4, 1), r(1, 8), r(8, 2), r(2, 16)
    t |= {f"{name}.lokr_w1_a": w1a, f"{name}.lokr_w1_b": w1b, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b}
    e[W("emb")] = kron(w1a @ w1b, w2a @ w2b)
    name = N("time2")  # (128, 128): both split, alpha 4, dim from w2_b (2): scale 2
    w1a, w1b, w2a, w2b = r(8, 3), r(3, 8), r(16, 2), r(2, 16)
    t |= {f"{name}.lokr_w1_a": w1a, f"{name}.lokr_w1_b": w1b, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b,
          f"{name}.alpha": torch.tensor(4.0)}
    e[W("time2")] = kron(w1a @ w1b, w2a @ w2b) * 2.0
    name = N("conv")  # (32, 64, 3, 3): conv kron, w2 a full 4-D kernel
    w1, w2 = r(4, 8), r(8, 8, 3, 3)
    t |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(5.0)}
    e[W("conv")] = kron(w1, w2)
    return t, e


def case_lokr_conv_split(r):
    """LyCORIS LoKr on a 3x3 conv, w2 factored without Tucker: lokr_w2_b is (rank, in_m * kh * kw)."""
    name = N("conv")
    w1, w2a, w2b = r(4, 8), r(8, 2), r(2, 8 * 9)
    t = {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(1.0)}
    return t, {W("conv"): (kron(w1, w2a @ w2b) * 0.5).reshape(SHAPE("conv"))}


def case_lokr_tucker(r):
    name = N("conv")  # w2 = Tucker(t2, w2_a (r, 8), w2_b (r, 8)), kron with w1 (4, 8)
    w1, t2, w2a, w2b = r(4, 8), r(2, 2, 3, 3), r(2, 8), r(2, 8)
    t = {f"{name}.lokr_w1": w1, f"{name}.lokr_t2": t2, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b,
         f"{name}.alpha": torch.tensor(1.0)}
    return t, {W("conv"): kron(w1, ref_tucker_factor(t2, w2a, w2b)) * 0.5}


def case_full(r):
    t, e = {}, {}
    for key, bias in (("q", False), ("ff", True), ("conv", True), ("te_fc1", True)):
        d = r(*SHAPE(key))
        t[f"{N(key)}.diff"] = d
        e[W(key)] = d
        if bias:
            db = r(SHAPE(key)[0])
            t[f"{N(key)}.diff_b"] = db
            e[B(key)] = db
    for key in ("norm_out", "te_norm"):  # LyCORIS norm-layer deltas
        wn, bn = r(32), r(32)
        t |= {f"{N(key)}.w_norm": wn, f"{N(key)}.b_norm": bn}
        e[W(key)], e[B(key)] = wn, bn
    return t, e


def _peft_like(r, pairs, down_name, up_name):
    t, e = {}, {}
    for name, target, shape in pairs:
        if len(shape) == 4:
            down, up = r(4, shape[1], *shape[2:]), r(shape[0], 4, 1, 1)
        else:
            down, up = r(4, shape[1]), r(shape[0], 4)
        t |= {f"{name}.{down_name}": down, f"{name}.{up_name}": up}
        e[target + ".weight"] = ref_lora(up, down).reshape(shape)
    return t, e


def case_peft(r):
    pairs = [
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
         U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k", (32, 32)),
        ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
         U + "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0", (32, 32)),
        ("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
         U + "middle_block.1.transformer_blocks.0.ff.net.2", (32, 128)),
        ("unet.down_blocks.0.resnets.1.conv2", U + "input_blocks.2.0.out_layers.3", (32, 32, 3, 3)),
        ("unet.up_blocks.0.resnets.2.conv_shortcut", U + "output_blocks.2.0.skip_connection", (32, 64, 1, 1)),
        ("text_encoder.text_model.encoder.layers.0.self_attn.v_proj", LAYERS["te_v"][1], (32, 32)),
        ("text_encoder.text_model.encoder.layers.0.mlp.fc2", LAYERS["te_fc2"][1], (32, 64)),
    ]
    return _peft_like(r, pairs, "lora_A.weight", "lora_B.weight")


def case_diffusers_processor(r):
    t, e = _peft_like(r, [
        ("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_q_lora",
         U + "input_blocks.2.1.transformer_blocks.0.attn1.to_q", (32, 32)),
        ("unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora",
         U + "output_blocks.4.1.transformer_blocks.0.attn2.to_out.0", (32, 32)),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora",
         U + "middle_block.1.transformer_blocks.0.attn2.to_v", (32, 32)),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer", LAYERS["te_q"][1], (32, 32)),
        ("text_encoder.text_model.encoder.layers.0.self_attn.out_proj.lora_linear_layer", LAYERS["te_out"][1],
         (32, 32)),
    ], "down.weight", "up.weight")
    return t, e


def case_text_encoder(r):
    t, e = {}, {}
    for key in ("te_q", "te_k", "te_v", "te_out", "te_fc1", "te_fc2"):
        out, inp = SHAPE(key)
        down, up = r(4, inp), r(out, 4)
        t |= kohya(N(key), down, up, 2.0)
        e[W(key)] = ref_lora(up, down, 2.0)
    return t, e



FORMATS = [
    pytest.param(case_kohya, ".safetensors", 0.7, id="kohya-linear-conv3x3-1x1"),
    pytest.param(case_kohya, ".pt", -1.0, id="kohya-pt"),
    pytest.param(case_kohya_ldm_spelling, ".safetensors", 1.0, id="kohya-ldm-spelling"),
    pytest.param(case_locon_tucker, ".safetensors", 0.8, id="locon-tucker"),
    pytest.param(case_loha, ".safetensors", 0.6, id="loha"),
    pytest.param(case_loha_conv, ".safetensors", 1.0, id="loha-conv"),
    pytest.param(case_loha_tucker, ".safetensors", 0.9, id="loha-tucker"),
    pytest.param(case_lokr, ".safetensors", 0.75, id="lokr"),
    pytest.param(case_lokr_conv_split, ".safetensors", 1.0, id="lokr-conv-split"),
    pytest.param(case_lokr_tucker, ".safetensors", 1.0, id="lokr-tucker"),
    pytest.param(case_full, ".safetensors", 0.5, id="full-diff-bias-norm"),
    pytest.param(case_peft, ".safetensors", 1.2, id="diffusers-peft"),
    pytest.param(case_diffusers_processor, ".safetensors", 0.9, id="diffusers-processor"),
    pytest.param(case_text_encoder, ".safetensors", 1.0, id="text-encoder"),
]


@pytest.mark.parametrize("build, suffix, w", FORMATS)
def test_format_merges_as_the_published_formula(micro, base, tmp_path, build, suffix, w):
    tensors, expected = build(Rand(sum(map(ord, build.__name__))))
    path = save(tensors, tmp_path / f"lora{suffix}")
    assert_merged(merged_state(micro, [(path, w)]), base, expected, w)


def test_lora_on_a_ckpt_checkpoint_merges_from_its_own_tensors(micro, base, tmp_path):
    """The merge re-reads the checkpoint it was loaded from: a Lightning .ckpt gives the same weights."""
    from sd_cli.run.api import StableDiffusion

    tensors, expected = case_kohya(Rand(3))
    path = save(tensors, tmp_path / "l.safetensors")
    sd = StableDiffusion.load(micro["ckpt"], config=str(micro["config"]), dtype="fp32", threads=1, loras=[(path, 0.7)])
    render(sd)
    state = weights(sd)
    assert_merged(state, base, expected, 0.7)


def test_key_table_spellings(layout):
    """Hand-written mappings (the naming rules) for the micro model, and the tiny model's 4-level UNet
    whose upsamplers sit after an attention block (output_blocks.{3i+2}.2.conv)."""
    from sd_cli.weights.lora import model_layout

    table = layout.table
    for name, target, _ in LAYERS.values():
        assert table[name] == target, name
    for name, (target, _) in LDM_SPELLED.items():
        assert table[name] == target, name
    assert table["unet.up_blocks.0.upsamplers.0.conv"] == U + "output_blocks.2.1.conv"
    assert table["unet.mid_block.resnets.0.time_emb_proj"] == U + "middle_block.0.emb_layers.1"
    assert table["text_encoder.text_model.encoder.layers.0.mlp.fc1"] == T + "text_model.encoder.layers.0.mlp.fc1"
    assert "lora_unet_up_blocks_1_upsamplers_0_conv" not in table  # the last level has no upsampler
    assert "lora_unet_up_blocks_0_attentions_0_proj_in" not in table  # level 1 of the micro UNet has no attention
    for value in table.values():  # every spelling ends at a module with a weight
        assert value + ".weight" in layout.shapes, value

    tiny = model_layout(load_config_from_text(TINY_YAML).model).table
    for name, target in {
        "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",  # i=0, no attention at ds 8
        "lora_unet_up_blocks_1_upsamplers_0_conv": "output_blocks.5.2.conv",
        "lora_unet_up_blocks_2_upsamplers_0_conv": "output_blocks.8.2.conv",
        "lora_unet_down_blocks_2_downsamplers_0_conv": "input_blocks.9.0.op",
        "lora_unet_down_blocks_3_resnets_1_conv2": "input_blocks.11.0.out_layers.3",
        "lora_unet_down_blocks_1_attentions_1_proj_out": "input_blocks.5.1.proj_out",
        "lora_unet_mid_block_resnets_1_conv1": "middle_block.2.in_layers.2",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v":
            "output_blocks.11.1.transformer_blocks.0.attn2.to_v",
        "lora_unet_up_blocks_2_resnets_0_conv_shortcut": "output_blocks.6.0.skip_connection",
        "lora_unet_time_embedding_linear_2": "time_embed.2",
        "lora_unet_conv_norm_out": "out.0",
        "lora_unet_output_blocks_8_2_conv": "output_blocks.8.2.conv",
    }.items():
        assert tiny[name] == U + target, name
    assert tiny["lora_te_text_model_encoder_layers_11_self_attn_q_proj"] == \
        T + "text_model.encoder.layers.11.self_attn.q_proj"
    assert "lora_unet_up_blocks_0_attentions_0_proj_in" not in tiny
    assert "lora_unet_up_blocks_3_upsamplers_0_conv" not in tiny


# --------------------------------------------------------------------------------------------------
# Helpers of the run-level tests
# --------------------------------------------------------------------------------------------------

TARGET_OF = {name: target for name, target, _ in LAYERS.values()}


def expected_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dW per LDM weight key of a kohya file whose layers are all in LAYERS."""
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            alpha = tensors.get(f"{name}.alpha")
            dw = ref_lora(tensors[f"{name}.lora_up.weight"], tensors[key], None if alpha is None else float(alpha))
            out[TARGET_OF[name] + ".weight"] = dw
    return out


def cli(micro, outdir: Path, *extra: str) -> int:
    return main(micro_argv(micro, outdir, *extra))


def sample(outdir: Path, n: int = 0) -> np.ndarray:
    with Image.open(outdir / "samples" / f"{n:05d}.png") as im:
        return np.asarray(im.convert("RGB")).copy()


def cli_pixels(micro, outdir: Path, *extra: str) -> np.ndarray:
    assert cli(micro, outdir, *extra) == 0
    return sample(outdir)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sd-txt2img: error: ") and "Traceback" not in err, err
    assert not lines[0].startswith("sd-txt2img: error: unexpected "), err  # (the CLI's words for a crash)
    return lines[0]


def nothing_written(outdir: Path) -> bool:
    return not any(outdir.rglob("*.png")) if outdir.exists() else True


def differs(a: np.ndarray, b: np.ndarray, by: float = 2.0) -> bool:
    """Clearly different images (mean absolute difference over `by` levels), not last-bit noise."""
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean()) > by


def addnet_hash(path: Path) -> str:
    """kohya's / A1111's LoRA hash, written out: sha256 of the bytes after the 8-byte length and the header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA folder: styleA, styleB (UNet + text encoder), both (one TE and one UNet layer), and
    sub/deeper/deep (UNet only), plus the tensors of each."""
    d = tmp_path_factory.mktemp("Lora")
    r = Rand(11)
    both = kohya(N("te_q"), r(4, 32), r(32, 4), 2.0) | kohya(N("ff"), r(4, 32), r(256, 4), 2.0)
    files = {"styleA": strong_lora(1), "styleB": strong_lora(2), "both": both, "deep": strong_lora(3, te=False)}
    paths = {"styleA": d / "styleA.safetensors", "styleB": d / "styleB.safetensors", "both": d / "both.safetensors",
             "deep": d / "sub" / "deeper" / "deep.safetensors"}
    for name, tensors in files.items():
        save(tensors, paths[name])
    (d / "notes.txt").write_text("not a LoRA")
    return {"dir": d, "paths": paths, "tensors": files}


# --------------------------------------------------------------------------------------------------
# 2. Images: a LoRA changes them, weight 0 is the base bit for bit, order does not matter, tags
# --------------------------------------------------------------------------------------------------


def test_cli_lora_changes_the_image_weight_zero_is_base_and_order_is_free(micro, lora_dir, tmp_path):
    a, b = (str(lora_dir["paths"][n]) for n in ("styleA", "styleB"))
    runs = {"base": [], "zero": ["--lora", f"{a}:0"], "a": ["--lora", a], "b": ["--lora", f"{b}:0.5"],
            "ab": ["--lora", a, "--lora", f"{b}:0.5"], "ba": ["--lora", f"{b}:0.5", "--lora", a]}
    px = {name: cli_pixels(micro, tmp_path / name, *extra) for name, extra in runs.items()}
    assert np.array_equal(px["zero"], px["base"])
    assert differs(px["a"], px["base"]) and differs(px["b"], px["base"]) and differs(px["ab"], px["a"])
    assert np.array_equal(px["ab"], px["ba"])


def test_two_loras_in_either_order_give_bit_identical_weights(micro, lora_dir, base):
    a, b = lora_dir["paths"]["styleA"], lora_dir["paths"]["styleB"]
    ab = merged_state(micro, [(a, 0.9), (b, -0.7)])
    ba = merged_state(micro, [(b, -0.7), (a, 0.9)])
    for key in base:
        assert torch.equal(ab[key], ba[key]), key
    ea, eb = expected_kohya(lora_dir["tensors"]["styleA"]), expected_kohya(lora_dir["tensors"]["styleB"])
    assert set(ea) == set(eb)
    for key in ea:
        want = base[key] + 0.9 * ea[key].reshape(base[key].shape) - 0.7 * eb[key].reshape(base[key].shape)
        torch.testing.assert_close(ab[key], want, rtol=1e-5, atol=2e-6)


def test_prompt_tag_in_lora_dir_equals_the_lora_flag(micro, lora_dir, tmp_path):
    d, a = str(lora_dir["dir"]), str(lora_dir["paths"]["styleA"])
    flag = cli_pixels(micro, tmp_path / "flag", "--prompt", "a cat", "--lora", f"{a}:0.8")
    tag = cli_pixels(micro, tmp_path / "tag", "--prompt", "a cat <lora:styleA:0.8>", "--lora-dir", d)
    lyco = cli_pixels(micro, tmp_path / "lyco", "--prompt", "a cat <lyco:styleA:0.8>", "--lora-dir", d)
    plain = cli_pixels(micro, tmp_path / "plain", "--prompt", "a cat")
    assert np.array_equal(tag, flag) and np.array_equal(lyco, flag)
    assert differs(tag, plain)


@pytest.mark.parametrize("tag, te, unet", [
    ("<lora:both:0.5:1.0>", 0.5, 1.0),
    ("<lora:both:te=0.25:unet=-0.5>", 0.25, -0.5),
    ("<lyco:both:unet=0.25>", 1.0, 0.25),
    ("<lora:both:0.3>", 0.3, 0.3),
    ("<lora:both>", 1.0, 1.0),
    ("<lora:both:0:1>", 0.0, 1.0),
])
def test_tag_weights_for_text_encoder_and_unet(micro, lora_dir, base, tag, te, unet):
    expected = expected_kohya(lora_dir["tensors"]["both"])
    assert {k.startswith(T) for k in expected} == {True, False}
    state = merged_state(micro, [], prompt=f"a house {tag}", lora_dir=lora_dir["dir"])
    assert_merged(state, base, expected, w=unet, te=te)


def test_tags_resolve_in_subfolders_and_an_unknown_name_lists_the_folder(micro, lora_dir, base, tmp_path, capsys):
    state = merged_state(micro, [], prompt="a <lora:deep:0.4>", lora_dir=lora_dir["dir"])
    assert_merged(state, base, expected_kohya(lora_dir["tensors"]["deep"]), 0.4)

    out = tmp_path / "out"
    rc = cli(micro, out, "--prompt", "a cat <lora:nope:1>", "--lora-dir", str(lora_dir["dir"]))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "no LoRA named 'nope'" in line and str(lora_dir["dir"]) in line, line
    assert "both, deep, styleA, styleB" in line and "notes" not in line, line
    assert nothing_written(out)


# --------------------------------------------------------------------------------------------------
# 3. set_loras: exact unmerge, only the touched layers change
# --------------------------------------------------------------------------------------------------


def test_set_loras_reaches_the_weights_and_pixels_of_fresh_loads(micro, lora_dir, base, tmp_path):
    a, b, both = (lora_dir["paths"][n] for n in ("styleA", "styleB", "both"))
    targets = set(expected_kohya(lora_dir["tensors"]["styleA"])) | set(expected_kohya(lora_dir["tensors"]["both"]))

    sd = load_sd(micro, [(a, 0.8, 1.1)])
    px_a = render(sd, steps=2)
    state_a = weights(sd)
    assert_merged(state_a, base, expected_kohya(lora_dir["tensors"]["styleA"]), w=1.1, te=0.8)

    sd.set_loras([(both, -0.6)])
    px_both = render(sd, steps=2)
    state_both = weights(sd)
    changed = {k for k in base if not torch.equal(state_a[k], state_both[k])}
    assert changed and changed <= targets, changed - targets  # only the touched layers were rewritten

    sd.set_loras([])
    px_none = render(sd, steps=2)
    state_none = weights(sd)

    fresh_both = load_sd(micro, [(both, -0.6)])
    fresh_none = load_sd(micro)
    assert np.array_equal(px_both, render(fresh_both, steps=2))
    assert np.array_equal(px_none, render(fresh_none, steps=2))
    fresh_state = weights(fresh_both)
    for key in base:
        assert torch.equal(state_both[key], fresh_state[key]), key
        assert torch.equal(state_none[key], base[key]), key
    assert differs(px_a, px_none) and not np.array_equal(px_both, px_none)

    # A file rewritten in place is read again (its new tensors, not the cached ones).
    mine = shutil.copy(b, tmp_path / "mine.safetensors")
    sd.set_loras([(mine, 1.0)])
    render(sd)
    new = strong_lora(7)
    save(new, mine)
    st_ = os.stat(mine)
    os.utime(mine, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    sd.set_loras([(mine, 1.0)])
    render(sd)
    assert_merged(weights(sd), base, expected_kohya(new), 1.0)


def test_api_refuses_a_bad_lora_at_load_and_at_set_loras(micro, base, tmp_path):
    content, _ = _bad_lora("shape", Rand(4), micro, base)
    bad = save(content, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="gives a change of shape"):
        load_sd(micro, [(bad, 1.0)])
    sd = load_sd(micro)
    with pytest.raises(CheckpointError, match="gives a change of shape"):
        sd.set_loras([(bad, 1.0)])
    render(sd)
    state = weights(sd)
    assert all(torch.equal(state[k], base[k]) for k in base)  # the refused set left the model as it was




def test_checkpoint_replaced_after_loading_is_refused_before_merging(micro, lora_dir, tmp_path):
    from micro_model import micro_state_dict
    from safetensors.torch import save_file

    ckpt = tmp_path / "copy.safetensors"
    shutil.copy(micro["safetensors"], ckpt)
    from sd_cli.run.api import StableDiffusion

    sd = StableDiffusion.load(ckpt, config=str(micro["config"]), dtype="fp32", threads=1)
    render(sd)
    save_file(micro_state_dict(seed=1), str(ckpt))  # another model at the same path, a later mtime
    st_ = os.stat(ckpt)
    os.utime(ckpt, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="changed on disk"):
        sd.set_loras([(lora_dir["paths"]["styleA"], 1.0)])
        render(sd)


# --------------------------------------------------------------------------------------------------
# 4. --from-file: batches never mix LoRA sets; each image is its prompt's own run
# --------------------------------------------------------------------------------------------------


def _gen(prompts, n, syntax="a1111", **kw):
    from sd_cli.run.settings import Generation

    return Generation(tuple(prompts), from_file=True, n_samples=n, prompt_syntax=syntax, **kw)


def _tags(prompt: str) -> tuple:
    """A prompt's LoRA set, read here with a regex of our own: sorted (name, weights text)."""
    import re

    return tuple(sorted(m.groups() for m in re.finditer(r"<(?:lora|lyco):([^:>]+)((?::[^>]*)?)>", prompt)))


@pytest.mark.parametrize("prompts, n, want", [
    (["a <lora:x:0.8>", "b <lora:x:0.8>", "c <lora:y>", "d", "e", "f"], 2, [("a", "b"), ("c",), ("d", "e"), ("f",)]),
    (["a <lora:x>", "b", "c <lora:x>"], 4, [("a",), ("b",), ("c",)]),
    (["a <lora:x:0.5>", "b <lora:x:0.6>", "c <lora:x:0.6>"], 3, [("a",), ("b", "c")]),
    (["a <lora:x:0.5:1>", "b <lora:x:0.5>"], 2, [("a",), ("b",)]),
    (["a", "b", "c"], 2, [("a", "b"), ("c",)]),
])
def test_batches_split_where_the_lora_tags_change(prompts, n, want):
    from sd_cli.run.work import batches

    got = batches(_gen(prompts, n))
    assert [tuple(p.split(" ")[0] for p in b) for b in got] == want


def test_plain_syntax_tags_are_words_and_do_not_split():
    from sd_cli.run.work import batches

    assert batches(_gen(["a <lora:x>", "b", "c <lora:y>"], 2, "plain")) == [("a <lora:x>", "b"), ("c <lora:y>",)]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["p", "p <lora:x>", "p <lora:x:0.5>", "p <lora:y>", "p <lora:x><lora:y>",
                                 "p <lyco:x:1:0.5>"]), min_size=1, max_size=12), st.integers(1, 4))
def test_batches_property_never_mix_and_keep_the_order(prompts, n):
    from sd_cli.run.work import batches

    prompts = [f"{p} {i}" for i, p in enumerate(prompts)]
    got = batches(_gen(prompts, n))
    assert [p for b in got for p in b] == prompts
    for b in got:
        assert 1 <= len(b) <= n and len({_tags(p) for p in b}) == 1, b
    for prev, nxt in zip(got, got[1:]):  # a batch ends early only where the set changes
        if len(prev) < n:
            assert _tags(prev[-1]) != _tags(nxt[0]), (prev, nxt)


FROM_FILE = ["a cat <lora:styleA:0.8>", "a dog <lora:styleA:0.8>", "a cow <lora:styleB>", "a hen",
             "a pig <lora:styleA:0.8>"]


def test_from_file_images_are_their_prompts_alone(micro, lora_dir, tmp_path):
    d = str(lora_dir["dir"])
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(FROM_FILE) + "\n")
    singles = [cli_pixels(micro, tmp_path / f"single{m}", "--prompt", p, "--seed", str(100 + m), "--lora-dir", d)
               for m, p in enumerate(FROM_FILE)]
    for n in (1, 2):
        out = tmp_path / f"file{n}"
        assert cli(micro, out, "--from-file", str(pf), "--n_samples", str(n), "--seed", "100", "--lora-dir", d) == 0
        metas = [read_png_metadata(out / "samples" / f"{m:05d}.png")[1] for m in range(len(FROM_FILE))]
        assert [m["prompt"] for m in metas] == FROM_FILE
        assert [m["seed"] for m in metas] == [100, 101, 102, 103, 104]
        assert [[(r["name"], r["unet_weight"]) for r in m.get("loras", [])] for m in metas] == \
            [[("styleA", 0.8)], [("styleA", 0.8)], [("styleB", 1.0)], [], [("styleA", 0.8)]]
        sizes = [m["batch_size"] for m in metas]
        assert sizes == ([1] * 5 if n == 1 else [2, 2, 1, 1, 1])
        starts = [i for i, m in enumerate(metas) if m["batch_index"] == 0]
        for s in starts:  # every batch (consecutive images of one batch) has one LoRA set
            group = metas[s: s + metas[s]["batch_size"]]
            assert len({json.dumps(m.get("loras", []), sort_keys=True) for m in group}) == 1
        for m, single in enumerate(singles):
            px = sample(out, m)
            if sizes[m] == 1:
                assert np.array_equal(px, single), (n, m)
            else:  # a batch of 2 runs one batched UNet call: the CPU kernels may differ in the last bit
                assert np.abs(px.astype(int) - single).max() <= 2, (n, m)
    assert differs(singles[0], singles[3]) and differs(singles[2], singles[3])




def test_seed_limit_counts_the_batches_lora_tags_add():
    from sd_cli.run.settings import SEED_LIMIT
    from sd_cli.run.work import batches

    prompts = ["a <lora:x>", "b", "c <lora:x>", "d"]
    try:
        gen = _gen(prompts, 2, seed=SEED_LIMIT - 2, seed_rule="batch")
    except UsageError:
        return  # refused up front: fine
    assert gen.seed + len(batches(gen)) - 1 < SEED_LIMIT


# --------------------------------------------------------------------------------------------------
# 5. Metadata: Lora hashes (A1111's addnet hash), the sd_cli record, the prompt keeps its tag, VAE
# --------------------------------------------------------------------------------------------------


def test_metadata_records_loras_and_vae(micro, lora_dir, base, tmp_path, capsys):
    from sd_cli.output.a1111 import parse_a1111_parameters

    apt = save(strong_lora(5), tmp_path / "apt.pt")
    vae = save({k[len("first_stage_model."):]: v for k, v in base.items() if k.startswith("first_stage_model.")},
               tmp_path / "my-vae.safetensors")
    styleb = lora_dir["paths"]["styleB"]
    prompt = "a castle <lora:styleB:0.4>, at night"
    out = tmp_path / "out"
    assert cli(micro, out, "--prompt", prompt, "--lora", f"{apt}:0.7", "--lora-dir", str(lora_dir["dir"]),
               "--vae", str(vae)) == 0
    text, meta = read_png_metadata(out / "samples" / "00000.png")
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731

    assert text.splitlines()[0] == prompt and meta["prompt"] == prompt
    fields = parse_a1111_parameters(text)
    assert 'Lora hashes: "' in text
    hashes = dict(item.split(": ") for item in fields["Lora hashes"].split(", "))
    assert hashes == {"apt": sha(apt)[:12], "styleB": addnet_hash(styleb)}
    assert addnet_hash(styleb) != sha(styleb)[:12]
    assert fields["VAE hash"] == sha(vae)[:10] and fields["VAE"] == "my-vae.safetensors"
    got = {(r["name"], r["sha256"], r["te_weight"], r["unet_weight"], r["source"], Path(r["file"]).name)
           for r in meta["loras"]}
    assert got == {("apt", sha(apt), 0.7, 0.7, "--lora", "apt.pt"),
                   ("styleB", sha(styleb), 0.4, 0.4, "prompt", "styleB.safetensors")}
    assert {r["a1111_hash"] for r in meta["loras"]} == set(hashes.values())
    assert meta["vae"]["sha256"] == sha(vae) and meta["vae"]["name"] == "my-vae.safetensors"

    capsys.readouterr()  # --replay finds the --lora file from the image and the tag in --lora-dir again
    assert main(["--replay", str(out / "samples" / "00000.png"), "--ckpt", str(micro["safetensors"]), "--config",
                 str(micro["config"]), "--lora-dir", str(lora_dir["dir"]), "--vae", str(vae), "-q"]) == 0
    assert capsys.readouterr().out.startswith("identical")


def test_a1111_hash_skips_the_safetensors_header(lora_dir, tmp_path):
    """Two files with the same tensors and different header metadata: one A1111 hash, two file hashes."""
    from sd_cli.run.loras import a1111_hash

    tensors = lora_dir["tensors"]["styleA"]
    one = save(tensors, tmp_path / "one.safetensors")
    two = save(tensors, tmp_path / "two.safetensors", metadata={"ss_network_dim": "4", "ss_output_name": "x" * 300})
    assert one.read_bytes() != two.read_bytes()
    assert a1111_hash(one) == a1111_hash(two) == addnet_hash(one) == addnet_hash(two)


# --------------------------------------------------------------------------------------------------
# 6. --vae
# --------------------------------------------------------------------------------------------------


def _bare_vae(base):
    return {k[len("first_stage_model."):]: v.clone() for k, v in base.items() if k.startswith("first_stage_model.")}


def test_vae_files_equal_to_the_checkpoints_give_identical_pixels(micro, base, tmp_path):
    vae = _bare_vae(base)
    prefixed = {f"first_stage_model.{k}": v for k, v in vae.items()}
    extras = {"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(3),
              "loss.logvar": torch.zeros(()), "first_stage_model.loss.discriminator.main.0.weight": torch.ones(2, 2)}
    files = {"bare": save(vae, tmp_path / "bare.safetensors"),
             "prefixed": save(prefixed | extras, tmp_path / "prefixed.safetensors"),
             "pt": save(vae, tmp_path / "vae.pt")}
    save_lightning_ckpt(vae, tmp_path / "vae.ckpt")  # a Lightning state_dict, with model_ema.* keys
    files["ckpt"] = tmp_path / "vae.ckpt"
    changed = dict(vae)
    changed["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"] + 0.3
    files["changed"] = save(changed, tmp_path / "changed.safetensors")

    own = cli_pixels(micro, tmp_path / "own")
    for name, path in files.items():
        px = cli_pixels(micro, tmp_path / name, "--vae", str(path))
        if name == "changed":  # control: the file really is the decoder used
            assert differs(px, own), name
        else:
            assert np.array_equal(px, own), name


@pytest.mark.parametrize("what", ["wrong-shape", "lora", "full-checkpoint", "missing-key", "diffusers", "missing-file"])
def test_bad_vae_files_are_one_line_and_nothing_is_written(micro, base, lora_dir, tmp_path, capsys, what):
    vae = _bare_vae(base)
    if what == "wrong-shape":
        vae["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
        path, words, code = save(vae, tmp_path / "v.safetensors"), ["decoder.conv_out.weight", "(3, 32, 1, 1)"], 1
    elif what == "lora":
        path, words, code = lora_dir["paths"]["styleA"], ["not an SD v1 VAE", "lora_"], 1
    elif what == "full-checkpoint":
        path, words, code = micro["safetensors"], ["full checkpoint"], 1
    elif what == "missing-key":
        del vae["post_quant_conv.weight"]
        path, words, code = save(vae, tmp_path / "v.safetensors"), ["missing", "post_quant_conv.weight"], 1
    elif what == "diffusers":
        vae["encoder.down_blocks.0.resnets.0.conv1.weight"] = vae.pop("encoder.down.0.block.0.conv1.weight")
        path, words, code = save(vae, tmp_path / "v.safetensors"), ["diffusers-format VAE"], 1
    else:
        path, words, code = tmp_path / "nope.safetensors", ["no such file"], 2
    out = tmp_path / "out"
    rc = cli(micro, out, "--vae", str(path))
    line = one_error_line(capsys.readouterr().err)
    assert rc == code and all(w in line for w in words) and str(path) in line, line
    assert nothing_written(out)


# --------------------------------------------------------------------------------------------------
# 7. Errors: one line, non-zero exit, nothing written
# --------------------------------------------------------------------------------------------------


def _bad_lora(what: str, r: Rand, micro, base) -> tuple[dict | Path, list[str]]:
    q = N("q")
    good = kohya(q, r(4, 32), r(32, 4))
    if what == "no-layer":
        name = "lora_unet_down_blocks_7_attentions_0_proj_in"
        return good | kohya(name, r(4, 32), r(32, 4)), [f"{name}.lora_down.weight", "names no layer"]
    if what == "shape":
        return kohya(q, r(4, 48), r(32, 4)), [q, "(32, 48)", "(32, 32)"]
    if what == "not-a-lora":
        return {"foo.bar": r(2), "baz": r(2)}, ["not a LoRA this tool understands (looks like keys baz, foo.bar)"]
    if what == "full-checkpoint":
        return micro["safetensors"], ["not a LoRA this tool understands", "full checkpoint"]
    if what == "vae":
        return _bare_vae(base), ["not a LoRA this tool understands", "a VAE"]
    if what == "embedding":
        return {"emb_params": r(2, 32)}, ["textual-inversion embedding"]
    if what == "sdxl":
        name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        return kohya(name, r(4, 32), r(32, 4)), [name, "SDXL"]
    if what == "dora":
        return good | {f"{q}.dora_scale": r(32, 1)}, [f"{q}.dora_scale", "DoRA"]
    if what == "nan":
        down = r(4, 32)
        down[1, 3] = float("nan")
        return kohya(q, down, r(32, 4)), [q, "not finite"]
    if what == "inf-alpha":
        return good | {f"{q}.alpha": torch.tensor(float("inf"))}, [f"{q}.alpha", "inf"]
    if what == "half-adapter":
        return {f"{q}.lora_down.weight": r(4, 32)}, [q, "do not form one adapter"]
    if what == "int-factor":
        return kohya(q, torch.ones(4, 32, dtype=torch.int32), r(32, 4)), [q, "floating-point"]
    if what == "unknown-suffix":
        return good | {f"{q}.lora_gate.weight": r(4, 32)}, [f"{q}.lora_gate.weight", "not a LoRA/LyCORIS factor"]
    raise AssertionError(what)


BAD_LORAS = ["no-layer", "shape", "not-a-lora", "full-checkpoint", "vae", "embedding", "sdxl", "dora", "nan",
             "inf-alpha", "half-adapter", "int-factor", "unknown-suffix"]


@pytest.mark.parametrize("what", BAD_LORAS)
def test_bad_lora_files_are_one_line_exit_1(micro, base, tmp_path, capsys, what):
    content, words = _bad_lora(what, Rand(4), micro, base)
    path = content if isinstance(content, Path) else save(content, tmp_path / "bad.safetensors")
    out = tmp_path / "out"
    rc = cli(micro, out, "--lora", f"{path}:0.5")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and all(w in line for w in words) and str(path) in line, line
    assert nothing_written(out)


def test_a_bad_lora_in_a_later_prompt_of_a_file_stops_before_any_image(micro, lora_dir, tmp_path, capsys):
    d = tmp_path / "Lora"
    shutil.copytree(lora_dir["dir"], d)
    content, words = _bad_lora("shape", Rand(4), micro, None)
    save(content, d / "broken.safetensors")
    pf = tmp_path / "p.txt"
    pf.write_text("a cat <lora:styleA>\na dog\na cow <lora:broken:0.5>\n")
    out = tmp_path / "out"
    rc = cli(micro, out, "--from-file", str(pf), "--lora-dir", str(d))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and all(w in line for w in words), line
    assert nothing_written(out)


@pytest.mark.parametrize("prompt, negative, words", [
    ("a cat <lora:styleA:abc>", "", ["<lora:styleA:abc>", "'abc' is not a LoRA weight"]),
    ("a cat <lora:styleA:nan>", "", ["'nan' is not a LoRA weight"]),
    ("a cat <hypernet:x:1>", "", ["<hypernet:x:1>", "'hypernet' networks"]),
    ("a cat <lora:styleA:1:2:3>", "", ["write <lora:NAME>"]),
    ("a cat <lora:styleA:gate=1>", "", ["gate= is not a LoRA setting"]),
    ("a cat <lora::1>", "", ["write <lora:NAME>"]),
    ("a cat", "blurry <lora:styleA:1>", ["the negative prompt has <lora:styleA:1>"]),
])
def test_bad_tags_are_usage_errors(micro, lora_dir, tmp_path, capsys, prompt, negative, words):
    out = tmp_path / "out"
    rc = cli(micro, out, "--prompt", prompt, "--negative-prompt", negative, "--lora-dir", str(lora_dir["dir"]))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and all(w in line for w in words), line
    assert nothing_written(out)


def test_missing_lora_file_and_bad_flags(micro, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "gone.safetensors"
    assert cli(micro, out, "--lora", f"{missing}:0.5") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--lora {missing}: no such file" in line, line
    assert cli(micro, out, "--lora", "x.safetensors:inf") == 2
    assert "finite" in one_error_line(capsys.readouterr().err)
    assert cli(micro, out, "--lora-dir", str(tmp_path / "nodir"), "--prompt", "a <lora:x>") == 2
    assert "not a folder" in one_error_line(capsys.readouterr().err)
    assert nothing_written(out)


@pytest.mark.parametrize("text, path, weight", [
    ("l.safetensors:0.8", "l.safetensors", 0.8),
    ("dir/l.safetensors:-1", "dir/l.safetensors", -1.0),
    ("l.safetensors", "l.safetensors", 1.0),
    ("l.safetensors:1e-3", "l.safetensors", 0.001),
    ("a:b.safetensors", "a:b.safetensors", 1.0),  # a colon in the path, no weight: the path stays whole
    ("a:b.safetensors:0.25", "a:b.safetensors", 0.25),
    ("C:\\loras\\x.safetensors", "C:\\loras\\x.safetensors", 1.0),
    ("l.safetensors:", "l.safetensors:", 1.0),
])
def test_lora_flag_parsing(text, path, weight):
    from sd_cli.run.loras import parse_lora_flag

    req = parse_lora_flag(text)
    assert (str(req.path), req.te, req.unet, req.source) == (path, weight, weight, "--lora")
    assert req.name == Path(path).stem


@pytest.mark.parametrize("text", ["l.safetensors:nan", "l.safetensors:inf", "l.safetensors:-inf"])
def test_lora_flag_weight_must_be_finite(text):
    from sd_cli.run.loras import parse_lora_flag

    with pytest.raises(UsageError):
        parse_lora_flag(text)




def test_rank_zero_factor_is_a_clear_error(micro, tmp_path, capsys):
    q = N("q")
    path = save(kohya(q, torch.zeros(0, 32), torch.zeros(32, 0), alpha=4.0), tmp_path / "rank0.safetensors")
    out = tmp_path / "out"
    rc = cli(micro, out, "--lora", str(path))
    err = capsys.readouterr().err
    assert rc in (0, 1)
    if rc == 1:
        assert q in one_error_line(err)
        assert nothing_written(out)


# --------------------------------------------------------------------------------------------------
# 8. Security: a .pt LoRA or embedding that would run code is refused, and the code never runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["os.system", "exec"])
def test_malicious_pt_lora_and_embedding_never_run(micro, tmp_path, capsys, payload):
    from sd_cli.errors import UnsafeCheckpointError
    from sd_cli.weights.config import load_config
    from sd_cli.weights.lora import model_layout, read_lora

    marker = tmp_path / "pwned"
    evil = evil_payloads(marker)[payload]
    lora = evil_pt(tmp_path / "Lora" / "evil.pt", kohya(N("q"), torch.ones(4, 32), torch.ones(32, 4)) | {"x": evil})
    emb = evil_pt(tmp_path / "emb" / "evilstyle.pt",
                  {"string_to_token": {"*": 265}, "string_to_param": {"*": evil}, "name": "evilstyle"})
    runs = {"flag": ["--lora", str(lora)], "tag": ["--prompt", "a <lora:evil:1>", "--lora-dir", str(lora.parent)],
            "embedding": ["--prompt", "a cat, evilstyle", "--embeddings", str(emb.parent)],
            "vae": ["--vae", str(lora)]}
    for name, extra in runs.items():
        out = tmp_path / f"out-{name}"
        rc = cli(micro, out, *extra)
        line = one_error_line(capsys.readouterr().err)
        assert rc == 1 and ("exec" in line or "system" in line), (name, line)
        assert nothing_written(out) and not marker.exists(), name
    with pytest.raises(UnsafeCheckpointError):
        read_lora(lora, model_layout(load_config(micro["config"]).model))
    assert not marker.exists()

    torch.load(lora, weights_only=False)  # positive control: these bytes do run the payload under plain pickle
    assert marker.exists()


# --------------------------------------------------------------------------------------------------
# 9. Fuzz: the reader loads or raises CheckpointError, nothing else; what it accepts merges
# --------------------------------------------------------------------------------------------------


def _check_accepted(lora, layout):
    """A file the reader accepted: every delta computes, finite, in its layer's shape."""
    for a in lora.adapters:
        d = a.delta()
        assert tuple(d.shape) == layout.shapes[a.target] and bool(torch.isfinite(d).all()), a.key


@pytest.fixture(scope="module")
def valid_lora_bytes(tmp_path_factory):
    t, _ = case_kohya(Rand(9))
    t |= case_full(Rand(10))[0]
    path = save(t, tmp_path_factory.mktemp("fz") / "valid.safetensors", metadata={"ss_network_dim": "4"})
    return path.read_bytes()


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.tuples(st.just("truncate"), st.integers(0, 10**6)),
                 st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                     min_size=1, max_size=8))))
def test_fuzz_corrupted_files(valid_lora_bytes, layout, tmp_path_factory, corruption):
    from sd_cli.weights.lora import read_lora

    data = bytearray(valid_lora_bytes)
    kind, arg = corruption
    if kind == "truncate":
        data = data[: arg % len(data)]
    else:
        for pos, xor in arg:
            data[pos % len(data)] ^= xor
    path = tmp_path_factory.mktemp("fz") / "x.safetensors"
    path.write_bytes(bytes(data))
    try:
        lora = read_lora(path, layout)
    except CheckpointError:
        return
    _check_accepted(lora, layout)


_FUZZ_MODULES = [N("q"), N("conv"), N("ff"), N("norm_out"), N("skip"), N("te_fc1"), "lora_unet_bogus_layer",
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora"]
_FUZZ_SUFFIXES = ["lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "lora_A.weight",
                  "lora_B.weight", "down.weight", "up.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                  "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                  "lokr_t2", "diff", "diff_b", "w_norm", "b_norm", "dora_scale", "weight", "scale"]
_DIMS = st.sampled_from([0, 1, 2, 3, 4, 8, 9, 16, 32, 64, 256])


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_FUZZ_MODULES[:3]), st.sampled_from(_FUZZ_SUFFIXES),
                          st.lists(_DIMS, max_size=4), st.sampled_from(["f32", "f16", "i32", "bool", "nan"])),
                min_size=1, max_size=6),
       st.sampled_from(_FUZZ_MODULES))
def test_fuzz_random_factor_shapes_and_keys(layout, tmp_path_factory, entries, extra_module):
    from sd_cli.weights.lora import read_lora

    tensors = {}
    for i, (module, suffix, shape, dtype) in enumerate(entries):
        module = extra_module if i == len(entries) - 1 else module
        assume(int(np.prod(shape)) <= 70_000)
        t = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        t = {"f32": t, "f16": t.half(), "i32": t.to(torch.int32), "bool": t > 0,
             "nan": t.masked_fill(torch.ones_like(t, dtype=torch.bool), float("nan"))}[dtype]
        tensors[f"{module}.{suffix}"] = t
    path = save(tensors, tmp_path_factory.mktemp("fz") / "r.safetensors")
    try:
        lora = read_lora(path, layout)
    except CheckpointError:
        return
    _check_accepted(lora, layout)
