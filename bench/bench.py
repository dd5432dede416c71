#!/usr/bin/env python
"""Benchmark of sd_cli's Stable Diffusion v1.x on this machine, against diffusers with the same weights.

A script, not a test. It builds the full-size SD v1.x model (our own model code, random weights,
seeded) and times, per dtype and resolution:

  text   CLIP text encoding of a guided batch (prompt + "", 2 x 77 tokens)
  unet   one guided UNet step (one call on batch 2)          + diffusers' UNet2DConditionModel
  vae    one VAE decode (batch 1)                              + diffusers' AutoencoderKL
  load   reading a random-weight fp32 .safetensors file into the model in the compute dtype
  image  a whole default image: load + text + all sampler steps + VAE, as the CLI runs it;
         saves the pixels so bf16 and fp32 images of the same seed can be compared
  hires  the hires fix through the engine (res, then 2 x res with the latent upscaler): time and
         the process's peak RSS
  accel  faster sampling (README "Faster sampling"): one image with each --variants entry (off,
         DeepCache, the guidance interval, token merging, --fast) through the pipeline, interleaved in
         one process: sampling time, UNet evaluations per image (full and shallow, in batch rows: a
         guided full step is 2), and the mean pixel distance from the image made without them;
         a variant may also set sampler=, steps= and scale= (the LCM path: "sampler=lcm+steps=4+scale=1")
  dtypes our guided UNet step in every --dtype at once: the models side by side in one process, their
         calls interleaved, so the ratio says which dtype is fastest here (what --dtype auto should pick)

diffusers (when importable) gets the SAME weights, converted with diffusers' own
`diffusers.loaders.single_file_utils.convert_ldm_*_checkpoint`, and runs in the same process,
interleaved call by call with ours, so machine noise hits both alike. Its bf16 row is diffusers
with fp32 weights under `torch.autocast(bfloat16)` as a diffusers user runs a pipeline: ONE autocast
context around all the timed calls, under torch.no_grad, the parameters requiring grad as
from_pretrained leaves them, so autocast casts each weight once and reuses it (torch caches casts only
then: not under inference_mode, not for requires_grad=False). The "bf16-autocast-per-call" row is the
earlier measurement, a fresh context (and fresh casts) per call. `--diffusers-alone` times diffusers in
a process without our model beside it. Add `--diffusers-bf16-weights` for weights cast to bf16 too.

Every case runs in its own child process, so "peak RSS" is that case's own high-water mark
(for unet/vae recorded before diffusers' copy is built). Output: a table on stdout and a JSON file
in bench/results/ (git-ignored).

    python bench/bench.py --only unet --res 256              # a few minutes on 2 cores
    python bench/bench.py --only unet,vae --res 512 --dtype bf16
    python bench/bench.py --only image --res 256 --dtype fp32,bf16   # + bf16 vs fp32 pixel difference
    python bench/bench.py --table bench/results/*.json       # one table from several runs
    python bench/bench.py --device cuda --only unet,vae,image --res 512 --batch 1,4
    python bench/bench.py --only hires --res 512 --dtype bf16 --steps 4   # 512 -> 1024, peak RSS
    python bench/bench.py --only accel --res 256,512 --dtype fp32,bf16 --repeats 2   # faster sampling
    python bench/bench.py --only accel --accel-model demo --res 64 --dtype fp32 --steps 6 --repeats 1  # smoke
    python bench/bench.py --only accel --res 512 --dtype bf16 --repeats 0 \
        --variants "off;sampler=lcm+steps=4+scale=1;sampler=lcm+steps=8+scale=1.5"   # the LCM path
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import itertools
import json
import math
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

PIECES = ("text", "unet", "vae", "load", "image", "hires", "accel", "dtypes")
# accel: ";"-separated variants, each "off", "fast" or "+"-joined Generation options (cfg_interval=LO,HI)
ACCEL_VARIANTS = ("off;deepcache=2;deepcache=3;deepcache=4;deepcache=3+deepcache_branch=5;cfg_interval=0.28,5.42;"
                  "tome=0.3;tome=0.5;fast")
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROMPT = "a photograph of an astronaut riding a horse"
MARK = "BENCH_RESULT "


# ----------------------------------------------------------------------------------------------
# Helpers shared by the child cases.


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def random_tensor(name: str, shape, gen):
    """Deterministic random weights with sane scales, so activations stay O(1) through ~60 layers:
    matrices/kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.02^2), biases N(0, 0.02^2)."""
    import torch

    if name.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    if name.endswith(".weight"):
        return 1.0 + 0.02 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen)


def materialize(module, dtype, device, seed: int = 0):
    """Give a meta-device module random weights, tensor by tensor, straight in `dtype` on `device`
    (never a full float32 copy). Buffers that already hold values (the schedule) are kept."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in module.state_dict().items():
        if t.device.type != "meta":
            sd[name] = t.to(device)
            continue
        value = random_tensor(name, tuple(t.shape), gen)
        sd[name] = value.to(device, dtype if value.is_floating_point() else value.dtype)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def model_config():
    from sd_cli.weights.config import load_config

    return load_config(REPO / "configs/stable-diffusion/v1-inference.yaml").model


def compvis_config(cfg) -> dict:
    """Our model config in CompVis' v1-inference.yaml layout, which diffusers' converters read."""
    u, v = cfg.unet, cfg.vae
    return {
        "model": {
            "params": {
                "linear_start": cfg.schedule.linear_start,
                "linear_end": cfg.schedule.linear_end,
                "timesteps": cfg.schedule.timesteps,
                "scale_factor": cfg.scale_factor,
                "unet_config": {
                    "params": {
                        "image_size": 32,
                        "in_channels": u.in_channels,
                        "out_channels": u.out_channels,
                        "model_channels": u.model_channels,
                        "attention_resolutions": list(u.attention_resolutions),
                        "num_res_blocks": u.num_res_blocks,
                        "channel_mult": list(u.channel_mult),
                        "num_heads": u.num_heads,
                        "use_spatial_transformer": True,
                        "transformer_depth": u.transformer_depth,
                        "context_dim": u.context_dim,
                        "legacy": False,
                    }
                },
                "first_stage_config": {
                    "params": {
                        "embed_dim": v.embed_dim,
                        "ddconfig": {
                            "double_z": v.double_z,
                            "z_channels": v.z_channels,
                            "resolution": v.resolution,
                            "in_channels": v.in_channels,
                            "out_ch": v.out_ch,
                            "ch": v.ch,
                            "ch_mult": list(v.ch_mult),
                            "num_res_blocks": v.num_res_blocks,
                            "attn_resolutions": list(v.attn_resolutions),
                            "dropout": 0.0,
                        },
                    }
                },
            }
        }
    }


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:
        return False
    return True


def _diffusers_copy(ours, prefix, cls, make_config, convert, cfg, device):
    """A diffusers `cls` holding `ours`' weights (as float32): the LDM keys (`prefix` + our names) go through
    diffusers' own `make_config` and `convert` from `diffusers.loaders.single_file_utils`."""
    import torch

    # .contiguous(): diffusers as its users run it, NCHW. Our channels-last conv weights handed over as they
    # are would switch diffusers' convs (and its GroupNorms) to NHWC too: torch picks channels-last output
    # when the weight is channels-last, so the earlier "diffusers" figures were partly NHWC runs.
    sd = {f"{prefix}{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in ours.state_dict().items()}
    config = make_config(compvis_config(cfg), sd)
    converted = convert(sd, config)
    del sd
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def diffusers_unet(ours_unet, cfg, device):
    """diffusers' UNet2DConditionModel with our UNet's weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    return _diffusers_copy(ours_unet, "model.diffusion_model.", UNet2DConditionModel,
                           create_unet_diffusers_config_from_ldm, convert_ldm_unet_checkpoint, cfg, device)


def diffusers_vae(ours_vae, cfg, device):
    """diffusers' AutoencoderKL with our VAE's weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    return _diffusers_copy(ours_vae, "first_stage_model.", AutoencoderKL,
                           create_vae_diffusers_config_from_ldm, convert_ldm_vae_checkpoint, cfg, device)


def diffusers_runner(model, mode: str, device):
    """(model, wrap) diffusers in `mode`: fp32 | fp16 | bf16-autocast | bf16-autocast-per-call | bf16-weights |
    fp16-autocast. "-autocast": as a diffusers pipeline call runs, under torch.no_grad with parameters that
    require grad (from_pretrained's), inside the one autocast context `autocast_span` opens around all
    timed calls, so each weight is cast once and the cast is reused (torch's autocast cache). "-autocast-
    per-call": a fresh context per call and no cached casts (the figure before issue 18)."""
    import torch

    if mode.endswith("-weights"):  # a cast copy: the float32 model stays for the other modes
        import copy

        model = copy.deepcopy(model).to(getattr(torch, DTYPE_NAMES[mode.split("-")[0]]))
    dtype = getattr(torch, DTYPE_NAMES[mode.split("-")[0]])

    def wrap(fn):
        def run():
            if mode.endswith("-autocast"):
                if not torch.is_autocast_enabled(device.type):
                    raise RuntimeError("a -autocast runner runs inside autocast_span")
                model.requires_grad_(True)  # (the casts are cached only for leaves that require grad)
                with torch.inference_mode(False), torch.no_grad():
                    return fn(model)
            if mode.endswith("-per-call"):
                model.requires_grad_(False)  # no cached casts: each call casts again, as its own context would
                with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                    return fn(model)
            with torch.autocast(device.type, enabled=False):
                return fn(model)

        return run

    return model, wrap


def autocast_span(modes: list[str], device):
    """The one autocast context the "-autocast" runners share, around the warm-up and all timed calls
    (every other runner disables autocast inside it); a null context when no mode needs it."""
    import torch

    shared = [m for m in modes if m.endswith("-autocast")]
    if not shared:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, DTYPE_NAMES[shared[0].split("-")[0]]))


def no_autocast(fn, device):
    """`fn` with autocast off (ours, inside `autocast_span`)."""
    import torch

    def run():
        with torch.autocast(device.type, enabled=False):
            return fn()

    return run


def diffusers_modes(dtype_name: str, device, extra_bf16_weights: bool) -> list[str]:
    if dtype_name == "fp32":
        return ["fp32"]
    if dtype_name == "bf16":
        return ["bf16-autocast", "bf16-autocast-per-call"] + (["bf16-weights"] if extra_bf16_weights else [])
    return ["fp16-weights"] if device.type == "cuda" else ["fp16-autocast"]


def with_fused_attention(fn):
    """`fn` with torch's fused SDPA kernel for every attention (never `layers.attention_in_rows`)."""
    from sd_cli.model import layers

    def run():
        saved, layers.ROWS_MIN_SCORES = layers.ROWS_MIN_SCORES, None
        try:
            return fn()
        finally:
            layers.ROWS_MIN_SCORES = saved

    return run


def interleaved(runners: dict, device, repeats: int, span=None) -> dict[str, list[float]]:
    """Warm each runner once, then time them in turns: `repeats` rounds of ours, theirs, ...; all of it
    inside the context `span` (`autocast_span`) when given."""
    with span if span is not None else contextlib.nullcontext():
        for fn in runners.values():
            fn()
            sync(device)
        times = {name: [] for name in runners}
        for _ in range(repeats):
            for name, fn in runners.items():
                times[name].append(timed(fn, device))
    return times


# ----------------------------------------------------------------------------------------------
# The cases (each runs in a child process).


def heap_keeps_freed_memory() -> None:
    """glibc only: no mmap for large blocks (M_MMAP_MAX 0) and no trimming (M_TRIM_THRESHOLD at its largest),
    so a freed activation's pages are reused by the next op instead of being unmapped and faulted in anew.
    Measured, not adopted by the CLI (README, "Speed and memory")."""
    import ctypes

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        raise SystemExit("bench: --malloc heap needs glibc")
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def setup(case: dict):
    import torch

    from sd_cli.weights.precision import DTYPES, set_threads

    set_threads(case["threads"])
    if case.get("malloc") == "heap":
        heap_keeps_freed_memory()
    if case.get("attention") == "fused":
        from sd_cli.model import layers

        layers.ROWS_MIN_SCORES = None  # torch's fused SDPA kernel everywhere
    device = torch.device(case["device"])
    return torch, device, DTYPES[case["dtype"]]


def case_text(case: dict) -> dict:
    torch, device, dtype = setup(case)
    from sd_cli.model.text_encoder import FrozenCLIPEmbedder
    from sd_cli.model.tokenizer import get_tokenizer

    cfg = model_config()
    with torch.device("meta"):
        clip = FrozenCLIPEmbedder(cfg.text)
    materialize(clip, dtype, device, seed=2)
    ids = get_tokenizer()([PROMPT, ""]).ids.to(device)  # (2, 77)
    with torch.inference_mode():
        times = interleaved({"ours": lambda: clip(ids)}, device, case["repeats"])
    return {"ours_s": times["ours"], "peak_rss_gib": peak_rss_gib()}


def _ours_unet(case, torch, device, dtype):
    from sd_cli.weights.loading import prepare_for_inference
    from sd_cli.model.unet import UNetModel

    cfg = model_config()
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    materialize(unet, dtype, device, seed=0)
    prepare_for_inference(unet, channels_last=case["channels_last"])
    return cfg, unet


def guided_inputs(case: dict, cfg, torch, device):
    """The inputs of one guided UNet call (x, t, context): batch 2 x case["batch"] ([uncond; cond]),
    x (2B, 4, res/8, res/8), t (2B,) at 500, context (2B, 77, D); float32, seeded."""
    side = case["res"] // 8
    batch = 2 * case["batch"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, side, side, generator=gen).to(device)
    t = torch.full((batch,), 500.0, device=device)
    ctx = torch.randn(batch, 77, cfg.unet.context_dim, generator=gen).to(device)
    return x, t, ctx


def case_unet(case: dict) -> dict:
    torch, device, dtype = setup(case)
    cfg, unet = _ours_unet(case, torch, device, dtype)
    x, t, ctx = guided_inputs(case, cfg, torch, device)
    out: dict = {}
    with torch.inference_mode():
        ours = unet
        if case["compile"]:
            ours = torch.compile(unet)
            out["compile_first_call_s"] = timed(lambda: ours(x, t, ctx), device)
        modes = diffusers_modes(case["dtype"], device, case["diffusers_bf16_weights"]) if case["diffusers"] else []
        if case.get("diffusers_alone") and modes:  # diffusers in a process without our model beside it
            ref = diffusers_unet(unet, cfg, device)
            del ours, unet
            runners = {}
            first = None
        else:
            runners = {"ours": no_autocast(lambda: ours(x, t, ctx), device)}
            first = interleaved(runners, device, 1)["ours"]  # ours alone first: its own peak RSS
            out["peak_rss_gib"] = peak_rss_gib()
            if case.get("attention") == "both":
                runners["sd_cli, fused attention"] = with_fused_attention(runners["ours"])
            ref = diffusers_unet(unet, cfg, device) if modes else None
        for mode in modes:
            _, wrap = diffusers_runner(ref, mode, device)
            runners[f"diffusers {mode}"] = wrap(lambda m: m(x, t, encoder_hidden_states=ctx).sample)
        times = interleaved(runners, device, case["repeats"], autocast_span(modes, device))
    out["ours_s"] = first + times.pop("ours") if first is not None else None
    out["diffusers"] = times  # every other runner: diffusers per mode (and our fused-attention variant)
    return out


def case_dtypes(case: dict) -> dict:
    """Our guided UNet step in each dtype of case["dtypes"], one model per dtype in this process, the calls
    interleaved; the first dtype is "ours", the others are compared with it."""
    from sd_cli.weights.precision import DTYPES, choose_dtype, dtype_name

    names = case["dtypes"]
    torch, device, _ = setup({**case, "dtype": names[0]})
    x, t, ctx = guided_inputs(case, model_config(), torch, device)  # the same float32 inputs for every model
    runners = {}
    for name in names:
        _, unet = _ours_unet(case, torch, device, DTYPES[name])
        runners[name] = no_autocast(lambda unet=unet: unet(x, t, ctx), device)
    with torch.inference_mode():
        times = interleaved(runners, device, case["repeats"])
    auto = dtype_name(choose_dtype("auto", device).dtype)
    return {"ours_s": times.pop(names[0]), "diffusers": {f"sd_cli {n}": v for n, v in times.items()},
            "dtype_auto": auto, "peak_rss_gib": peak_rss_gib()}


def case_vae(case: dict) -> dict:
    torch, device, dtype = setup(case)
    from sd_cli.weights.loading import prepare_for_inference
    from sd_cli.model.vae import AutoencoderKL
    from sd_cli.pipeline.vae_tiling import decode_banded, decode_method, decode_tiled

    cfg = model_config()
    with torch.device("meta"):
        vae = AutoencoderKL(cfg.vae)
    materialize(vae, dtype, device, seed=1)
    prepare_for_inference(vae, channels_last=case["channels_last"])
    side = case["res"] // 8
    z = (torch.randn(case["batch"], 4, side, side, generator=torch.Generator().manual_seed(3)) / cfg.scale_factor).to(device)
    method = decode_method(case["vae_tiling"], case["res"], case["res"])
    out: dict = {"vae_decode": method}
    with torch.inference_mode():
        zd = z.to(dtype)
        decode = {"whole": vae.decode, "bands": lambda z: decode_banded(vae, z), "tiles": lambda z: decode_tiled(vae, z)}
        runners = {"ours": no_autocast(lambda: decode[method](zd), device)}
        first = interleaved(runners, device, 1)["ours"]
        out["peak_rss_gib"] = peak_rss_gib()
        if device.type == "cuda":
            out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if case.get("attention") == "both":
            runners["sd_cli, fused attention"] = with_fused_attention(runners["ours"])
        modes = diffusers_modes(case["dtype"], device, case["diffusers_bf16_weights"]) if case["diffusers"] else []
        if modes:
            ref = diffusers_vae(vae, cfg, device)
            for mode in modes:
                model, wrap = diffusers_runner(ref, mode, device)
                zz = z.to(next(model.parameters()).dtype)
                runners[f"diffusers {mode}"] = wrap(lambda m, zz=zz: m.decode(zz).sample)
        times = interleaved(runners, device, case["repeats"], autocast_span(modes, device))
        times["ours"] = first + times["ours"]
    out["ours_s"] = times.pop("ours")
    out["diffusers"] = times  # every other runner: diffusers per mode (and our fused-attention variant)
    return out


# -- a random-weight checkpoint file, streamed to disk tensor by tensor --------------------------


def random_checkpoint(path: Path, seed: int = 0, half: bool = False) -> Path:
    """A full SD v1.x fp32 (or with `half` fp16, like v1-5-pruned-emaonly) .safetensors file (~4.3 GB /
    2.1 GB) with random weights, written one tensor at a time (safetensors layout: u64 header size, JSON
    header, raw little-endian data)."""
    import torch

    from sd_cli.weights.loading import build_meta_model

    if path.exists():
        return path
    model = build_meta_model(model_config())
    items = [(k, v) for k, v in model.state_dict().items() if v.device.type == "meta"]  # not the schedule
    header, offset = {}, 0
    for name, t in items:
        dt, size = ("I64", 8) if name.endswith("position_ids") else (("F16", 2) if half else ("F32", 4))
        n = math.prod(t.shape) * size
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in items:
            value = random_tensor(name, tuple(t.shape), gen)
            value = value.half() if half and not name.endswith("position_ids") else value
            f.write(value.contiguous().numpy().tobytes())
    os.replace(tmp, path)
    return path


def case_load(case: dict) -> dict:
    torch, device, dtype = setup(case)
    from sd_cli.weights.loading import load_model

    path = Path(case["ckpt"])
    t0 = time.perf_counter()
    model = load_model(model_config(), path, device=device, dtype=dtype)
    sync(device)
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    return {"ours_s": [seconds], "peak_rss_gib": peak_rss_gib(), "params": n, "file_gib": path.stat().st_size / 2**30}


def case_image(case: dict) -> dict:
    torch, device, dtype = setup(case)
    import numpy as np

    from sd_cli.weights.loading import load_model, prepare_for_inference
    from sd_cli.pipeline.generate import Pipeline, initial_noise

    t0 = time.perf_counter()
    model = load_model(model_config(), Path(case["ckpt"]), device=device, dtype=dtype)
    prepare_for_inference(model, channels_last=case["channels_last"])
    load_s = time.perf_counter() - t0
    pipe = Pipeline(model, device, on_warning=lambda m: print(f"warning: {m}", file=sys.stderr),
                    vae_tiling=case["vae_tiling"])
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    noise = initial_noise(gen, case["batch"], 4, case["res"], case["res"], 8)
    marks = []
    sync(device)
    t1 = time.perf_counter()
    images = pipe.generate([PROMPT] * case["batch"], noise, sampler=case["sampler"], steps=case["steps"],
                           scale=7.5, generator=gen,
                           callback=lambda i, n, x: (sync(device), marks.append(time.perf_counter())))
    total = time.perf_counter() - t1
    steps = [b - a for a, b in zip(marks, marks[1:])]
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-mallocheap" if case.get("malloc") == "heap" else ""
    npy = RESULTS / f"image-{case['res']}-{case['dtype']}-{case['sampler']}{case['steps']}-b{case['batch']}-seed{case['seed']}{suffix}.npy"
    np.save(npy, images)
    return {
        "ours_s": [total],
        "load_s": load_s,
        "text_and_first_step_s": marks[0] - t1,
        "median_step_s": statistics.median(steps) if steps else None,
        "decode_s": t1 + total - marks[-1],  # VAE decode + conversion to uint8
        "peak_rss_gib": peak_rss_gib(),
        "peak_cuda_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "fell_back_to_fp32_vae": pipe.decoder.fell_back,
        "pixels": str(npy),
    }


def case_hires(case: dict) -> dict:
    """The CLI's render path with the hires fix: res x res, then 2x res (latent upscaler); the peak RSS
    of the whole process (load, both passes, the tiled decode at 2x) is the figure that matters."""
    torch, device, dtype = setup(case)
    from sd_cli import StableDiffusion

    t0 = time.perf_counter()
    sd = StableDiffusion.load(case["ckpt"], device=case["device"], dtype=case["dtype"], threads=case["threads"])
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    images = sd.txt2img(PROMPT, seed=case["seed"], sampler=case["sampler"], steps=case["steps"], height=case["res"],
                        width=case["res"], hr_scale=2.0, watermark=False)
    total = time.perf_counter() - t1
    return {"ours_s": [total], "load_s": load_s, "peak_rss_gib": peak_rss_gib(), "size": list(images[0].size)}


# accel variant keys that change the run itself rather than a faster-sampling option ("sampler=lcm+steps=4+
# scale=1": the LCM path); a variant without them runs the case's sampler and steps at the case's guidance.
RUN_KEYS = {"sampler": str, "steps": int, "scale": float}


def parse_variant(text: str) -> dict:
    """An accel variant: "off" -> {}, "fast" -> the --fast preset (at guidance), or "+"-joined Generation
    options: "deepcache=3+deepcache_branch=5", "cfg_interval=0.28,5.42" (inf allowed), "tome=0.5", and the
    RUN_KEYS sampler=, steps=, scale=."""
    from sd_cli.run.settings import FASTER_KEYS, faster_options

    text = text.strip()
    if text in ("off", ""):
        return {}
    if text == "fast":
        return faster_options({}, True, 7.5)
    out = {}
    for part in text.split("+"):
        key, _, value = part.partition("=")
        if key in RUN_KEYS:
            out[key] = RUN_KEYS[key](value)
            continue
        if key not in FASTER_KEYS:
            raise SystemExit(f"bench: unknown accel option {key!r}; choose from "
                             f"{', '.join([*FASTER_KEYS, *RUN_KEYS])}")
        out[key] = tuple(float(v) for v in value.split(",")) if key == "cfg_interval" else (
            float(value) if key == "tome" else int(value))
    return out


class UNetCalls:
    """Counts UNet calls and their batch rows: every call (full, shallow or plain) starts with `prepare`;
    only a full one runs the middle block."""

    def __init__(self, unet):
        self.unet, self.rows, self.full_rows = unet, 0, 0
        prepare = unet.prepare

        def counted(x, t, context):
            self.rows += x.shape[0]
            return prepare(x, t, context)

        unet.prepare = counted
        unet.middle_block.register_forward_hook(lambda m, args, out: setattr(self, "full_rows",
                                                                             self.full_rows + args[0].shape[0]))

    def take(self) -> tuple[int, int]:
        """(full rows, shallow rows) since the last take."""
        full, shallow = self.full_rows, self.rows - self.full_rows
        self.rows = self.full_rows = 0
        return full, shallow


def accel_model(case: dict, torch, device, dtype):
    """The full-size SD v1 model with the random-weight checkpoint, or (--accel-model demo) the demo model."""
    from sd_cli.weights.config import load_config
    from sd_cli.weights.loading import load_model, prepare_for_inference

    if case.get("accel_model") == "demo":
        from sd_cli.demo import DEMO_CKPT, DEMO_CONFIG

        model = load_model(load_config(DEMO_CONFIG).model, DEMO_CKPT, device=device, dtype=dtype)
    else:
        model = load_model(model_config(), Path(case["ckpt"]), device=device, dtype=dtype)
    return prepare_for_inference(model, channels_last=case["channels_last"])


def case_accel(case: dict) -> dict:
    """Each variant's image of one seed through the pipeline, interleaved: sampling time per image, UNet
    row-evaluations per image (full, shallow) and the mean |pixel difference| (0-255) from variant "off"."""
    torch, device, dtype = setup(case)
    import numpy as np

    from sd_cli.pipeline.generate import Pipeline, initial_noise

    model = accel_model(case, torch, device, dtype)
    pipe = Pipeline(model, device, on_warning=lambda m: print(f"warning: {m}", file=sys.stderr),
                    vae_tiling=case["vae_tiling"])
    calls = UNetCalls(model.model.diffusion_model)
    variants = {v.strip(): parse_variant(v) for v in case["variants"].split(";")}
    scale = 3.0 if case.get("accel_model") == "demo" else 7.5
    b = case["batch"]

    def render(opts: dict):
        run = {"sampler": case["sampler"], "steps": case["steps"], "scale": scale}
        run.update({k: v for k, v in opts.items() if k in RUN_KEYS})
        gen = torch.Generator("cpu").manual_seed(case["seed"])
        noise = initial_noise(gen, b, 4, case["res"], case["res"], 8)
        sync(device)
        t0 = time.perf_counter()
        latents = pipe.latents([PROMPT] * b, noise, generator=gen, **run,
                               **{k: v for k, v in opts.items() if k not in RUN_KEYS})
        sync(device)
        return latents, time.perf_counter() - t0

    out: dict = {"variants": {}}
    images = {}
    with torch.inference_mode():
        for name, opts in variants.items():  # the warm-up: images, counts (and with --repeats 0 the timing)
            latents, seconds = render(opts)
            images[name] = pipe.decode(latents)
            out["variants"][name] = {"options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
                                     "rows_per_image": [n / b for n in calls.take()],
                                     "sampling_s": [] if case["repeats"] else [seconds]}
        for _ in range(case["repeats"]):
            for name, opts in variants.items():
                out["variants"][name]["sampling_s"].append(render(opts)[1])
    ref = images.get("off")
    for name, img in images.items():  # (a variant with another sampler, steps or scale makes another picture)
        same_run = not any(k in RUN_KEYS for k in variants[name])
        d = np.abs(img.astype(np.int16) - ref.astype(np.int16)) if ref is not None and same_run else None
        out["variants"][name]["mean_abs_diff"] = float(d.mean()) if d is not None else None
    out["ours_s"] = out["variants"][next(iter(variants))]["sampling_s"]
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def accel_table(results: list[dict]) -> str:
    """One row per accel variant: sampling time per image, its ratio to "off", UNet rows, pixel distance."""
    lines = ["| res | dtype | variant | sampling / image | / off | UNet rows / image: full + shallow | "
             "mean abs diff from off (0-255) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("piece") != "accel" or not isinstance(r.get("variants"), dict):  # (a failed case: its case string)
            continue
        base = med(r["variants"].get("off", {}).get("sampling_s"))
        for name, v in r["variants"].items():
            t = med(v["sampling_s"])
            ratio = f"{t / base:.2f}" if base else "-"
            full, shallow = v["rows_per_image"]
            diff = "-" if v["mean_abs_diff"] is None else f"{v['mean_abs_diff']:.2f}"
            lines.append(f"| {r['res']} | {r['dtype']} | {name} | {fmt_s(t)} | {ratio} | {full:g} + {shallow:g} | "
                         f"{diff} |")
    return "\n".join(lines)


CASES = {"text": case_text, "unet": case_unet, "vae": case_vae, "load": case_load, "image": case_image,
         "hires": case_hires, "accel": case_accel, "dtypes": case_dtypes}


# ----------------------------------------------------------------------------------------------
# Orchestration.


def machine() -> dict:
    import torch

    from sd_cli.weights.precision import cpu_features, default_threads

    feats = cpu_features()
    name = platform.processor() or "?"
    ident = {}  # "cpu family", "model": tells apart CPUs that share a marketing name ("AMD EPYC")
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                name = value
            elif key in ("cpu family", "model") and key not in ident:
                ident[key] = value
            elif not line.strip():
                break
    except OSError:
        pass
    info = {
        "cpu": name,
        "cpu_family_model": f"{ident.get('cpu family', '?')}/{ident.get('model', '?')}",
        "logical_cpus": os.cpu_count(),
        "physical_cores": feats.physical_cores,
        "avx512_bf16": feats.avx512_bf16,
        "amx_bf16": feats.amx_bf16,
        "vendor": feats.vendor,
        "default_threads": default_threads(feats),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception:
        info["diffusers"] = None
    return info


def run_child(case: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(case)]
    print(f"[bench] {case['piece']} res={case['res']} dtype={case['dtype']} batch={case['batch']} ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
    if proc.returncode != 0 or result is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {**case, "error": f"exit {proc.returncode}: {tail}", "wall_s": wall}
    return {**case, **result, "wall_s": wall}


STAT = {"name": "median"}  # --stat: how the timed calls of one runner become one figure


def med(v):
    """One figure from a runner's timed calls: their median, or with --stat min their minimum (on a shared
    machine the least-disturbed call; the ratio of two minima compares both runners at their best)."""
    if not (isinstance(v, list) and v):
        return v
    return min(v) if STAT["name"] == "min" else statistics.median(v)


def fmt_s(v) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def table(results: list[dict]) -> str:
    """Markdown table: one row per case (and per diffusers mode)."""
    lines = [
        "| piece | res | batch | dtype | ours | compared with: diffusers (mode) or variant | ours / that | peak RSS | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['piece']} | {r['res']} | {r['batch']} | {r['dtype']} | error | | | | {r['error'].splitlines()[-1][:80]} |")
            continue
        ours = med(r.get("ours_s"))
        notes = []
        if r["piece"] == "dtypes":
            notes.append(f"guided step, one model per dtype, interleaved; --dtype auto here: {r.get('dtype_auto')}")
        if r["piece"] == "unet":
            notes.append("guided step = 1 call on batch 2" if r["batch"] == 1 else f"guided, batch {2 * r['batch']}")
            if r.get("compile_first_call_s") is not None:
                notes.append(f"compiled; first call {r['compile_first_call_s']:.0f} s")
        if r["piece"] == "vae" and r.get("vae_decode", "whole") != "whole":
            notes.append(f"decoded in {r['vae_decode']}")
        if r["piece"] == "image":
            notes.append(f"{r['sampler']} {r['steps']} steps; median step {fmt_s(r.get('median_step_s'))}, "
                         f"load {fmt_s(r.get('load_s'))} (not in total)")
            if r.get("fell_back_to_fp32_vae"):
                notes.append("VAE fell back to fp32")
        if r["piece"] == "load":
            notes.append(f"{r.get('file_gib', 0):.1f} GiB fp32 file, warm page cache")
        if r["piece"] == "accel":
            notes.append(f"{r['sampler']} {r['steps']} steps, sampling only, variant "
                         f"{next(iter(r.get('variants', {'?': 0})))}; all variants: the accel table below")
        if r["piece"] == "hires":
            notes.append(f"{r['sampler']} {r['steps']} + hires {int(0.7 * r['steps']) + 1} steps to "
                         f"{'x'.join(map(str, r.get('size', [])))}; load {fmt_s(r.get('load_s'))} (not in total)")
        if r.get("channels_last") is not None:
            notes.append("NHWC" if r["channels_last"] else "NCHW")
        if r.get("threads") is not None:
            notes.append(f"{r['threads']} threads")
        if r.get("attention") == "fused":
            notes.append("fused attention only")
        if r.get("malloc") == "heap":
            notes.append("malloc: heap kept")
        rss = f"{r['peak_rss_gib']:.2f} GiB" if r.get("peak_rss_gib") is not None else "-"
        diff = r.get("diffusers") or {}
        if not diff:
            lines.append(f"| {r['piece']} | {r['res'] or '-'} | {r['batch']} | {r['dtype']} | {fmt_s(ours)} | - | - | {rss} | {'; '.join(notes)} |")
        for i, (mode, times) in enumerate(diff.items()):
            theirs = med(times)
            ratio = f"{ours / theirs:.2f}" if theirs and ours else "-"  # (--diffusers-alone: no ours)
            first = fmt_s(ours) if i == 0 else "〃"
            lines.append(f"| {r['piece']} | {r['res'] or '-'} | {r['batch']} | {r['dtype']} | {first} | {fmt_s(theirs)} ({mode.removeprefix('diffusers ')}) "
                         f"| {ratio} | {rss} | {'; '.join(notes)} |")
    return "\n".join(lines)


def _pixel_diff(f: Path, g: Path):
    """|f - g| of two saved uint8 images, as int16."""
    import numpy as np

    return np.abs(np.load(f).astype(np.int16) - np.load(g).astype(np.int16))


def image_diffs(results: list[dict]) -> list[dict]:
    """bf16 (and fp16) vs fp32 images of the same res/sampler/steps/seed, from this run or saved ones; and
    each image made with `--malloc heap` against the same one made with glibc as it comes."""
    out = []
    for f in sorted(RESULTS.glob("image-*-fp32-*.npy")):
        for other in ("bf16", "fp16"):
            g = Path(str(f).replace("-fp32-", f"-{other}-"))
            if not g.exists():
                continue
            d = _pixel_diff(f, g)
            out.append({"fp32": f.name, "other": g.name, "mean_abs": float(d.mean()), "max_abs": int(d.max()),
                        "frac_over_8": float((d > 8).mean())})
    for f in sorted(RESULTS.glob("image-*-mallocheap.npy")):  # the allocator must not change a pixel
        g = Path(str(f).replace("-mallocheap", ""))
        if g.exists():
            d = _pixel_diff(f, g)
            out.append({"malloc_heap": f.name, "malloc_default": g.name, "mean_abs": float(d.mean()), "max_abs": int(d.max())})
    return out


def parse_list(text: str, allowed=None, kind=str) -> list:
    items = [kind(x) for x in text.split(",") if x]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SystemExit(f"bench: unknown value(s) {bad}; choose from {sorted(allowed)}")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="text,unet,vae", help=f"comma list of pieces: {','.join(PIECES)} or all (default: %(default)s)")
    p.add_argument("--res", default="256,512", help="comma list of square resolutions in px (default: %(default)s)")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list: fp32, bf16, fp16 (default: %(default)s)")
    p.add_argument("--batch", default="1", help="comma list of images per batch (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores, as the CLI)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per runner after one warm-up (default: %(default)s)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="activation layout; auto = what the CLI does on this device (default: %(default)s)")
    p.add_argument("--vae-tiling", choices=("auto", "on", "tiles", "off"), default="auto",
                   help="vae piece: decode as the CLI would (auto), in exact bands (on), in tiles, or whole")
    p.add_argument("--attention", choices=("auto", "fused", "both"), default="auto",
                   help="auto: as the CLI (bf16 on a CPU without AMX: layers.attention_in_rows for large "
                        "attentions); fused: torch's fused SDPA kernel only; both: time ours both ways, interleaved")
    p.add_argument("--malloc", choices=("default", "heap", "both"), default="default",
                   help="default: glibc as it comes (as the CLI runs); heap: large blocks from the heap and "
                        "freed memory kept there (glibc mallopt; diffusers in the same process gets it too); "
                        "both: each case twice, one child process each")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet (unet piece; reports compile time)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers comparison")
    p.add_argument("--diffusers-bf16-weights", action="store_true", help="also time diffusers with bf16 weights")
    p.add_argument("--diffusers-alone", action="store_true",
                   help="unet piece: time diffusers in a process without our UNet (built from it, then freed)")
    p.add_argument("--variants", default=ACCEL_VARIANTS,
                   help="accel piece: ';'-separated variants, each off, fast, or '+'-joined options "
                        "(deepcache=N, deepcache_branch=B, cfg_interval=LO,HI, tome=R; and sampler=S, steps=N, scale=G, "
                        "which make another picture: no pixel distance) (default: %(default)s)")
    p.add_argument("--accel-model", choices=("full", "demo"), default="full",
                   help="accel piece: the full-size random-weight SD v1 model, or the demo model (a smoke check)")
    p.add_argument("--sampler", default=None, help="image piece: sampler (default: the CLI's default)")
    p.add_argument("--steps", type=int, default=None, help="image piece: steps (default: the CLI's default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ckpt", default=None, help="load/image pieces: checkpoint (default: a random fp32 file in the temp dir)")
    p.add_argument("--out", default=None, help="JSON file to write (default: bench/results/bench-<time>.json)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="figure per runner from its timed calls: median, or min (for a machine shared with other "
                        "work, where the median mixes in their load) (default: %(default)s)")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print one table from saved result files and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    STAT["name"] = args.stat

    if args.child:
        case = json.loads(args.child)
        result = CASES[case["piece"]](case)
        print(MARK + json.dumps(result), flush=True)
        return 0

    if args.table:
        results, machines = [], []
        for f in args.table:
            data = json.loads(Path(f).read_text())
            results += data["results"]
            machines.append(data["machine"])
        print(f"machine: {json.dumps(machines[0])}; figures: {args.stat} of each runner's timed calls\n")
        print(table(results))
        if any(r.get("piece") == "accel" for r in results):
            print("\n" + accel_table(results))
        for d in image_diffs(results):
            print(f"\npixels compared: {d}")
        return 0

    from sd_cli.run.settings import DEFAULT_SAMPLER, DEFAULT_STEPS
    from sd_cli.weights.precision import default_threads

    import torch

    pieces = list(PIECES) if args.only == "all" else parse_list(args.only, PIECES)
    resolutions = parse_list(args.res, kind=int)
    dtypes = parse_list(args.dtype, DTYPE_NAMES)
    batches = parse_list(args.batch, kind=int)
    mallocs = ["default", "heap"] if args.malloc == "both" else [args.malloc]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch sees no CUDA device")
    threads = args.threads or default_threads()
    cl = {"auto": None, "on": True, "off": False}[args.channels_last]  # None: the CLI's per-part default
    with_diffusers = not args.no_diffusers and diffusers_available()
    if not args.no_diffusers and not with_diffusers:
        print("[bench] diffusers is not importable: timing ours only", file=sys.stderr)

    ckpt = args.ckpt
    if ckpt is None and ({"load", "image", "hires"} & set(pieces) or "accel" in pieces and args.accel_model == "full"):
        ckpt = str(Path(tempfile.gettempdir()) / "sd_cli_bench" / "random-sd1-fp32.safetensors")
        if not Path(ckpt).exists():
            print(f"[bench] writing random-weight checkpoint {ckpt} (~4.3 GB, once) ...", file=sys.stderr, flush=True)
            random_checkpoint(Path(ckpt))

    results = []
    info = machine()
    print(f"[bench] {info}", file=sys.stderr)
    for piece in pieces:
        for res in ([None] if piece in ("text", "load") else resolutions):
            for dtype in (["+".join(dtypes)] if piece == "dtypes" else dtypes):
                for batch, malloc in itertools.product([1] if piece in ("text", "load") else batches, mallocs):
                    case = {
                        "piece": piece, "res": res, "dtype": dtype, "batch": batch, "device": args.device,
                        "threads": threads, "repeats": args.repeats, "channels_last": cl,
                        "vae_tiling": args.vae_tiling, "compile": args.compile, "attention": args.attention,
                        "diffusers": with_diffusers and piece in ("unet", "vae"),
                        "diffusers_bf16_weights": args.diffusers_bf16_weights,
                        "sampler": args.sampler or DEFAULT_SAMPLER, "steps": args.steps or DEFAULT_STEPS,
                        "seed": args.seed, "ckpt": ckpt, "malloc": malloc,
                        "diffusers_alone": args.diffusers_alone, "variants": args.variants,
                        "accel_model": args.accel_model, "dtypes": dtypes,
                    }
                    r = run_child(case, args.timeout)
                    results.append(r)
                    print(table([r]).splitlines()[-1], file=sys.stderr, flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"bench-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    diffs = image_diffs(results) if "image" in pieces else []
    out.write_text(json.dumps({"machine": info, "results": results, "image_diffs": diffs}, indent=1))
    print(f"machine: {info['cpu']} (family/model {info['cpu_family_model']}), {info['physical_cores']} cores, avx512_bf16={info['avx512_bf16']}, "
          f"amx_bf16={info['amx_bf16']}, torch {info['torch']}, diffusers {info['diffusers']}, {threads} threads; "
          f"figures: {args.stat} of each runner's timed calls\n")
    print(table(results))
    if "accel" in pieces:
        print("\n" + accel_table(results))
    for d in diffs:
        if "malloc_heap" in d:
            print(f"\n{d['malloc_heap']} vs {d['malloc_default']}: max |diff| {d['max_abs']} (the allocator must not change a pixel)")
            continue
        print(f"\n{d['other']} vs {d['fp32']}: mean |diff| {d['mean_abs']:.3f}, max {d['max_abs']} "
              f"(of 255), {d['frac_over_8']:.2%} of values differ by more than 8")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
