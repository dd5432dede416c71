"""LoRA files against diffusers: the key table against diffusers' own checkpoint converter, and merged
weights (and one forward pass) against diffusers' `load_lora_weights` + `fuse_lora`.

Independent reference: the LDM -> diffusers names come from diffusers' single-file converter
(`convert_ldm_unet_checkpoint` / `convert_ldm_clip_checkpoint`, which hand back the checkpoint's own
tensor objects, so the mapping is read off `data_ptr`), never from `sd_cli.weights.lora_keys`; diffusers
reads the kohya names with its own `_convert_non_diffusers_lora_to_diffusers` and merges with PEFT.

What diffusers 0.42 can be compared on (found while writing these tests):
* kohya files with ONE alpha per part (UNet, text encoder). With per-module alphas diffusers builds
  PEFT `alpha_pattern` keys from its old attention-processor names (`attn1.processor.to_k_lora.down.
  weight`, `self_attn`), PEFT warns "alpha_pattern keys did not match any targeted module" and those
  layers get the common alpha: a diffusers bug, so per-module alphas are left out of the comparison.
* plain LoRA / LoCon only (diffusers refuses LoHa, LoKr, Tucker `lora_mid`).

Offline: HF_HUB_OFFLINE=1; models are built from configs (tests/diffusers_ref.py), no tokenizer or
scheduler is loaded. Tiny-model tests run by default (a few seconds); the full-size one is `slow`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers / huggingface_hub read it (nothing here downloads)
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import REPO, TINY_YAML, load_config_from_text, make_tiny_state_dict  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]

UNET, TEXT = "model.diffusion_model.", "cond_stage_model.transformer."
FULL_CONFIG = REPO / "configs/stable-diffusion/v1-inference-cpu.yaml"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RESNET = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
RESNET_BLOCKS = ("down_blocks.1.", "mid_block.", "up_blocks.1.")  # the resnets that get LoCon adapters
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
WEIGHT = 0.7  # the user's LoRA weight (diffusers: fuse_lora(lora_scale=...))


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub access, and the checkpoint hash cache in the session's temp dir (not ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "hash-cache"))
        yield


def converters():
    """diffusers' LDM -> diffusers converters (config, UNet, CLIP); skip where this diffusers has none."""
    try:
        from diffusers.loaders.single_file_utils import (
            convert_ldm_clip_checkpoint,
            convert_ldm_unet_checkpoint,
            create_unet_diffusers_config_from_ldm,
        )
    except ImportError:
        pytest.skip("this diffusers has no diffusers.loaders.single_file_utils LDM converter")
    return create_unet_diffusers_config_from_ldm, convert_ldm_unet_checkpoint, convert_ldm_clip_checkpoint


def diffusers_names(sd: dict[str, torch.Tensor], yaml_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """({diffusers UNet key: LDM key}, {CLIP key with `text_model.`: LDM key}) from diffusers' converter:
    it returns the checkpoint's own tensors, so each converted key is traced back by its storage."""
    from diffusers_ref import compvis_original_config

    make_config, convert_unet, convert_clip = converters()
    by_ptr = {(v.data_ptr(), tuple(v.shape)): k for k, v in sd.items() if v.numel()}
    unet = convert_unet(sd, make_config(compvis_original_config(yaml_text), sd))
    clip = convert_clip(sd)
    by_value = None

    def ldm_key(v: torch.Tensor) -> str:
        nonlocal by_value
        key = by_ptr.get((v.data_ptr(), tuple(v.shape)))
        if key is None:  # a converter that copies: find the one LDM tensor with these values
            if by_value is None:
                by_value = {}
                for k, w in sd.items():
                    if w.is_floating_point():
                        by_value.setdefault((tuple(w.shape), w.numpy().tobytes()), []).append(k)
            found = by_value.get((tuple(v.shape), v.numpy().tobytes()), [])
            assert len(found) == 1, f"no single LDM tensor equals a converted one ({found[:3]})"
            key = found[0]
        return key

    trace = lambda conv: {k: ldm_key(v) for k, v in conv.items() if k.endswith((".weight", ".bias"))}  # noqa: E731
    u, c = trace(unet), trace(clip)
    assert len(u) == len(unet) and len(set(u.values())) == len(u) and len(set(c.values())) == len(c)
    return u, c


# --- 1. the key table against diffusers' converter (tiny model, SD1 block structure) --------------------


def test_key_table_equals_diffusers_converter():
    """Every diffusers UNet/CLIP weight and bias key: its `unet.`/`lora_unet_` (and `text_encoder.`/
    `lora_te_`) spellings name the LDM module whose tensor diffusers' converter put there, and the table
    has no other diffusers-form entries (none could send a LoRA key to a wrong layer)."""
    from sd_cli.weights.lora import model_layout

    sd = make_tiny_state_dict()
    table = model_layout(load_config_from_text(TINY_YAML).model).table
    # the tensors are all different, so "equal tensor" below identifies one LDM key
    seen = {}
    for k, v in sd.items():
        if k.startswith((UNET, TEXT)) and v.is_floating_point():
            seen.setdefault((tuple(v.shape), v.numpy().tobytes()), []).append(k)
    assert all(len(ks) == 1 for ks in seen.values()), [ks for ks in seen.values() if len(ks) > 1][:3]

    unet, clip = diffusers_names(sd, TINY_YAML)
    make_config, convert_unet, convert_clip = converters()
    from diffusers_ref import compvis_original_config

    converted_tensors = {**convert_unet(sd, make_config(compvis_original_config(TINY_YAML), sd)), **convert_clip(sd)}
    for spelled, part in ((unet, "unet"), (clip, "te")):
        converted = {}
        for key, ldm in spelled.items():
            path, suffix = key.rsplit(".", 1)
            module = ldm.rsplit(".", 1)[0]
            assert ldm.endswith("." + suffix)
            forms = ["unet." + path, "lora_unet_" + path.replace(".", "_")] if part == "unet" else \
                ["text_encoder." + path, "lora_te_" + path.replace(".", "_")]
            for form in forms:
                assert table.get(form) == module, (form, table.get(form), module)
            assert torch.equal(sd[module + "." + suffix], converted_tensors[key])
            converted.update(dict.fromkeys(forms, module))
        # no extra entries in the diffusers spellings (the LDM-path kohya form and the flattened text-encoder
        # form are the only other ones)
        prefix = ("unet.", "lora_unet_") if part == "unet" else ("text_encoder.", "lora_te_")
        modules = {v.rsplit(".", 1)[0] for v in spelled.values()}
        ldm_form = {"lora_unet_" + m[len(UNET):].replace(".", "_"): m for m in modules}
        flattened = {"text_encoder." + k.removeprefix("text_encoder.text_model."): v for k, v in converted.items()
                     if k.startswith("text_encoder.text_model.")}  # transformers 5's CLIPTextModel names
        extra = {k: v for k, v in table.items() if k.startswith(prefix) and k not in converted
                 and not (part == "unet" and ldm_form.get(k) == v) and not (part == "te" and flattened.get(k) == v)}
        assert not extra, sorted(extra)[:5]
    assert len(unet) == sum(1 for k in sd if k.startswith(UNET))
    assert len(clip) == sum(1 for k in sd if k.startswith(TEXT) and not k.endswith("position_ids"))


def test_kohya_names_read_as_diffusers_reads_them():
    """diffusers' own reading of the kohya name of every linear/conv layer (`lora_unet_<diffusers path>`,
    `lora_te_<clip path>`; conv_in, time_embedding, samplers included) through its private
    `_convert_unet_lora_key` / `_convert_text_encoder_lora_key` is that layer; and the older diffusers
    spelling it produces on the way (`unet.<...>.attn1.processor.to_q_lora`, `<...>.fc1.lora_linear_layer`)
    is read by our table (`canonical_module`) as the same layer."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_text_encoder_lora_key, _convert_unet_lora_key
    except ImportError:
        pytest.skip("diffusers' kohya key converter moved (private API)")
    from sd_cli.weights.lora import model_layout
    from sd_cli.weights.lora_keys import canonical_module

    sd = make_tiny_state_dict()
    table = model_layout(load_config_from_text(TINY_YAML).model).table
    unet, clip = diffusers_names(sd, TINY_YAML)
    checked = {"unet": 0, "te": 0, "older spelling": 0}
    renames = {"te": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
               "unet": {".processor.to_q_lora": ".to_q", ".processor.to_k_lora": ".to_k",
                        ".processor.to_v_lora": ".to_v", ".processor.to_out_lora": ".to_out.0"}}
    for spelled, part in ((unet, "unet"), (clip, "te")):
        for key, ldm in spelled.items():
            if not key.endswith(".weight") or sd[ldm].dim() < 2 or part == "te" and ".embeddings." in key:
                continue
            path, module = key[: -len(".weight")], ldm.rsplit(".", 1)[0]
            kohya = ("lora_unet_" if part == "unet" else "lora_te_") + path.replace(".", "_")
            assert table[kohya] == module, kohya
            down = kohya + ".lora_down.weight"
            name = _convert_unet_lora_key(down) if part == "unet" else _convert_text_encoder_lora_key(down, kohya)
            assert name.endswith(".down.weight"), name
            stem = name[: -len(".down.weight")]  # `<path>.lora`, `<...>.to_q_lora`, `<path>.lora_linear_layer`
            layer = stem.removesuffix(".lora").removesuffix(".lora_linear_layer")
            for old, new in renames[part].items():
                if layer.endswith(old):
                    layer = layer[: -len(old)] + new
            assert layer == path, (kohya, name)
            checked[part] += 1
            if stem != path + ".lora":  # an older diffusers spelling: our table reads it too
                prefix = "unet." if part == "unet" else "text_encoder."
                if "_lora" in stem.rsplit(".", 1)[-1] and part == "te":
                    continue  # `self_attn.to_q_lora`: diffusers-internal, never a file's spelling
                assert table.get(canonical_module(prefix + stem)) == module, (prefix + stem)
                checked["older spelling"] += 1
    print(checked)
    assert checked["unet"] > 200 and checked["te"] == 72 and checked["older spelling"] > 100


# --- 2. merged weights against diffusers' load_lora_weights + fuse_lora ---------------------------------


def lora_targets(unet: dict[str, str], clip: dict[str, str], shapes: dict[str, tuple]) -> dict[str, tuple]:
    """{kohya module name: weight shape}: every attention/ff/proj layer, the resnet layers of a few blocks
    (3x3 LoCon, 1x1 shortcut, time_emb_proj), and the text encoder's q/k/v/out_proj/fc1/fc2."""
    out = {}
    for key, ldm in unet.items():
        path = key[: -len(".weight")]
        if key.endswith(".weight") and (path.endswith(ATTENTION) or
                                        (path.startswith(RESNET_BLOCKS) and path.endswith(RESNET))):
            out["lora_unet_" + path.replace(".", "_")] = shapes[ldm]
    for key, ldm in clip.items():
        if key.endswith(".weight") and key[: -len(".weight")].endswith(TEXT_LAYERS):
            out["lora_te_" + key[: -len(".weight")].replace(".", "_")] = shapes[ldm]
    return out


def write_kohya_lora(path: Path, targets: dict[str, tuple], rank: int, alpha_unet: float, alpha_te: float,
                     seed: int, dtype=torch.float16) -> Path:
    """A kohya-format LoRA/LoCon: conv layers get (r, in, kh, kw) down and (out, r, 1, 1) up factors; the
    change is about 0.1 x the weight's scale (weights N(0, 1/fan_in))."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, shape in sorted(targets.items()):
        out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
        fan_in = inp * (kernel[0] * kernel[1] if kernel else 1)
        lora[name + ".lora_down.weight"] = (torch.randn((rank, inp, *kernel), generator=g) / fan_in ** 0.5).to(dtype)
        up = torch.randn((out, rank, *((1, 1) if kernel else ())), generator=g) * (0.3 / rank ** 0.5)
        lora[name + ".lora_up.weight"] = up.to(dtype)
        lora[name + ".alpha"] = torch.tensor(alpha_unet if name.startswith("lora_unet_") else alpha_te).to(dtype)
    save_file(lora, str(path))
    return path


def diffusers_pipeline(sd: dict[str, torch.Tensor], yaml_text: str):
    """A StableDiffusionPipeline around diffusers/transformers models holding `sd` (no tokenizer,
    scheduler, safety checker: nothing to download)."""
    from diffusers import StableDiffusionPipeline
    from diffusers_ref import build_reference

    ref = build_reference(sd, yaml_text)
    pipe = StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=None, unet=ref.unet,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def diffusers_fused(pipe, lora: Path) -> None:
    """diffusers' kohya/PEFT loading and merging, at WEIGHT; the LoRA modules removed, the change kept."""
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=WEIGHT)
    pipe.unload_lora_weights()


def compare_weights(model, pipe, unet: dict[str, str], clip: dict[str, str], base) -> dict:
    """Our merged weights against diffusers' fused ones, tensor by tensor. `base(ldm_key)`: the file's
    tensor. Unchanged tensors must be equal; changed ones are measured against the size of the change."""
    ref_unet = pipe.unet.state_dict()
    ref_text = pipe.text_encoder.state_dict()
    flat = not hasattr(pipe.text_encoder, "text_model")  # transformers >= 5.6 dropped the `text_model.` level
    pairs = [(ref_unet[k], ldm) for k, ldm in unet.items()]
    pairs += [(ref_text[k.removeprefix("text_model.") if flat else k], ldm) for k, ldm in clip.items()]
    stats = {"changed": 0, "unchanged": 0, "rel_to_delta": 0.0, "rel_to_weight": 0.0}
    for ref, ldm in pairs:
        ours = model.get_parameter(ldm).detach()
        b = base(ldm).to(torch.float32)
        if torch.equal(ref, b):
            assert torch.equal(ours, ref), f"{ldm}: diffusers left it unchanged, ours changed it"
            stats["unchanged"] += 1
            continue
        stats["changed"] += 1
        err = (ours.double() - ref.double()).abs().max()
        stats["rel_to_delta"] = max(stats["rel_to_delta"], (err / (ref.double() - b).abs().max()).item())
        stats["rel_to_weight"] = max(stats["rel_to_weight"], (err / ref.double().abs().max()).item())
    print(stats)
    return stats


def switched_to(sd_model, lora: Path):
    """A loaded model switched to `lora` at WEIGHT (`set_loras`; the merge happens as an image is made:
    one 64x64 step)."""
    sd_model.set_loras([(lora, WEIGHT)])
    sd_model.txt2img("a", seed=1, steps=1, height=64, width=64)
    return sd_model.pipeline().model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, offline):
    """The tiny model as a file, its diffusers names, and our loaded model (fp32)."""
    from safetensors.torch import save_file

    from sd_cli.run.api import StableDiffusion

    d = tmp_path_factory.mktemp("lora_diffusers")
    sd = make_tiny_state_dict()
    save_file(sd, str(d / "tiny.safetensors"))
    (d / "tiny.yaml").write_text(TINY_YAML)
    unet, clip = diffusers_names(sd, TINY_YAML)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    targets = lora_targets(unet, clip, shapes)
    kohya = write_kohya_lora(d / "kohya.safetensors", targets, rank=4, alpha_unet=2.0, alpha_te=1.0, seed=5)
    ours = StableDiffusion.load(d / "tiny.safetensors", config=str(d / "tiny.yaml"), device="cpu", dtype="fp32")
    return {"dir": d, "sd": sd, "unet": unet, "clip": clip, "targets": targets, "kohya": kohya, "ours": ours}


def test_kohya_lora_merge_equals_diffusers_fuse_tiny(tiny):
    """kohya LoRA/LoCon (alpha != rank) at weight 0.7: StableDiffusion.load(..., loras=) == diffusers'
    fuse_lora, layer by layer."""
    from sd_cli.run.api import StableDiffusion

    pipe = diffusers_pipeline(tiny["sd"], TINY_YAML)
    diffusers_fused(pipe, tiny["kohya"])
    ours = StableDiffusion.load(tiny["dir"] / "tiny.safetensors", config=str(tiny["dir"] / "tiny.yaml"),
                                device="cpu", dtype="fp32", loras=[(tiny["kohya"], WEIGHT)])
    stats = compare_weights(ours.pipeline().model, pipe, tiny["unet"], tiny["clip"], lambda k: tiny["sd"][k])
    assert stats["changed"] == len(tiny["targets"])
    assert stats["rel_to_delta"] < 1e-5 and stats["rel_to_weight"] < 1e-6


def save_diffusers_lora(tiny, name: str, text_encoder: bool, metadata: bool) -> Path:
    """The kohya LoRA loaded into diffusers and saved back with diffusers' `save_lora_weights` (PEFT
    names `unet.<path>.lora_A.weight`, `text_encoder.<path>...`); with `metadata` the PEFT configs
    (r, lora_alpha) go into the safetensors header, as diffusers' training scripts do."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    pipe = diffusers_pipeline(tiny["sd"], TINY_YAML)
    pipe.load_lora_weights(str(tiny["kohya"].parent), weight_name=tiny["kohya"].name, adapter_name="k")
    kw = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet, adapter_name="k")}
    if metadata:
        kw["unet_lora_adapter_metadata"] = pipe.unet.peft_config["k"].to_dict()
    if text_encoder:
        kw["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder, adapter_name="k")
        if metadata:
            kw["text_encoder_lora_adapter_metadata"] = pipe.text_encoder.peft_config["k"].to_dict()
    out = tiny["dir"] / name
    StableDiffusionPipeline.save_lora_weights(str(out), weight_name="lora.safetensors", **kw)
    return out / "lora.safetensors"


def check_against_diffusers(tiny, lora: Path) -> dict:
    """diffusers' fuse of `lora` against our loaded tiny model switched to it (set_loras)."""
    pipe = diffusers_pipeline(tiny["sd"], TINY_YAML)
    diffusers_fused(pipe, lora)
    model = switched_to(tiny["ours"], lora)
    return compare_weights(model, pipe, tiny["unet"], tiny["clip"], lambda k: tiny["sd"][k])


def test_diffusers_saved_unet_lora_without_alpha_equals_diffusers(tiny):
    """A diffusers-saved (PEFT-named) UNet LoRA without metadata: scale 1 on both sides."""
    stats = check_against_diffusers(tiny, save_diffusers_lora(tiny, "peft_unet", text_encoder=False, metadata=False))
    assert stats["changed"] == sum(1 for k in tiny["targets"] if k.startswith("lora_unet_"))
    assert stats["rel_to_delta"] < 1e-5


def test_diffusers_saved_lora_with_text_encoder_equals_diffusers(tiny):
    """Text-encoder keys as diffusers with transformers >= 5.6 saves them (`text_encoder.encoder.*`)."""
    stats = check_against_diffusers(tiny, save_diffusers_lora(tiny, "peft_full", text_encoder=True, metadata=False))
    assert stats["changed"] == len(tiny["targets"]) and stats["rel_to_delta"] < 1e-5


def test_diffusers_saved_lora_alpha_metadata_equals_diffusers(tiny):
    """The safetensors header's `lora_adapter_metadata` (PEFT lora_alpha / r) that diffusers'
    save_lora_weights writes gives the scale: alpha 2, rank 4 is 0.5."""
    stats = check_against_diffusers(tiny, save_diffusers_lora(tiny, "peft_meta", text_encoder=False, metadata=True))
    assert stats["rel_to_delta"] < 1e-5


# --- 3. full size (slow) -------------------------------------------------------------------------------


def random_sd1_state_dict(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random full-size SD v1 weights in fp16 (as v1-5-pruned-emaonly): matrices/kernels N(0, 1/fan_in),
    norm scales 1 + N(0, 0.02^2), biases N(0, 0.02^2), so activations stay O(1) through the UNet."""
    import math

    from sd_cli.weights.loading import build_meta_model

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in build_meta_model(cfg).state_dict().items():
        if t.device.type != "meta":  # the schedule buffers (derived, not in v1-5 files' UNet/TE parts)
            continue
        shape = tuple(t.shape)
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        elif len(shape) >= 2:
            out[name] = (torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))).half()
        elif name.endswith(".weight"):
            out[name] = (1.0 + 0.02 * torch.randn(shape, generator=g)).half()
        else:
            out[name] = (0.02 * torch.randn(shape, generator=g)).half()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


@pytest.mark.slow
def test_kohya_lora_full_size_equals_diffusers(tmp_path):
    """Full-size random SD1 (fp16 file), kohya rank-8 LoRA/LoCon (alpha 4 UNet, 2 text encoder) at 0.7:
    StableDiffusion.load(..., loras=...) in fp32 == diffusers' load_lora_weights + fuse_lora, weight by
    weight, and one UNet eps and the text embeddings agree to fp32 rounding."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sd_cli.run.api import StableDiffusion
    from sd_cli.weights.config import load_config

    yaml_text = FULL_CONFIG.read_text()
    sd = random_sd1_state_dict(load_config(FULL_CONFIG).model)
    ckpt = tmp_path / "random-sd1.safetensors"
    save_file(sd, str(ckpt))
    unet, clip = diffusers_names(sd, yaml_text)
    targets = lora_targets(unet, clip, {k: tuple(v.shape) for k, v in sd.items()})
    assert sum(len(s) == 4 and s[2:] == (3, 3) for s in targets.values()) >= 10  # 3x3 LoCon layers
    lora = write_kohya_lora(tmp_path / "kohya.safetensors", targets, rank=8, alpha_unet=4.0, alpha_te=2.0, seed=9)
    pipe = diffusers_pipeline(sd, yaml_text)
    del sd

    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 301.5])
    ctx = torch.randn(2, 77, 768, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    with torch.no_grad():
        eps_base = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        text_base = pipe.text_encoder(input_ids=ids).last_hidden_state
    diffusers_fused(pipe, lora)

    ours = StableDiffusion.load(ckpt, config=str(FULL_CONFIG), device="cpu", dtype="fp32", loras=[(lora, WEIGHT)])
    model = ours.pipeline().model  # load merges the LoRA
    with safe_open(str(ckpt), "pt") as f:
        stats = compare_weights(model, pipe, unet, clip, f.get_tensor)
    assert stats["changed"] == len(targets)
    assert stats["rel_to_delta"] < 1e-5 and stats["rel_to_weight"] < 1e-6

    with torch.no_grad():
        eps_ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        eps = model.unet(x, t, ctx)
        text_ref = pipe.text_encoder(input_ids=ids).last_hidden_state
        text = model.encode_text(ids)
    effect, err = rel(eps_ref, eps_base), rel(eps, eps_ref)
    t_effect, t_err = rel(text_ref, text_base), rel(text, text_ref)
    print(f"eps: LoRA changes it by {effect:.2e}, ours vs diffusers {err:.2e}; "
          f"text: changed {t_effect:.2e}, ours vs diffusers {t_err:.2e}")
    assert err < 2e-5 and effect > 100 * err
    assert t_err < 2e-5 and t_effect > 100 * t_err
