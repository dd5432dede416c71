"""Train the built-in demo model from scratch (`python -m sd_cli.train_demo --help`; flags: sd_cli/cli/train_demo.py).

Two stages, plain PyTorch (no pytorch-lightning: two short loops need no framework, and the tool stays
dependency-free and bit-for-bit deterministic for a seed on a given machine and thread count):

1. VAE: SD's AutoencoderKL layout (f=8, 4 levels), trained on 64x64 renders of the synthetic scenes
   (sd_cli.demo_data) with L1 + L2 reconstruction and a small KL term.
2. Latent diffusion: a pool of training renders is encoded once with the frozen VAE; the scale factor is
   set so latents have std --latent-std (0.3, not SD's 1: see its help); then the UNet and the CLIP-style
   text encoder learn eps-prediction on SD's schedule (scaled linear betas 0.00085..0.012, 1000 steps),
   with the caption replaced by "" 10% of the time so classifier-free guidance works, at a constant
   learning rate (an optional phase 2, --decay-steps, continues from its EMA weights with a cosine decay).
   An EMA of the weights is what gets exported.

Output: `<out>/demo.safetensors` (fp16, the exact SD v1 key names, only the sizes differ) and
`<out>/demo.yaml` (our config format). Intermediate state goes to --workdir (vae.pt, unet.pt,
unet_phase1.pt), so `--stage unet` reuses a trained VAE and `--stage export` writes the latest UNet snapshot.
Held-out scenes (sd_cli.demo_data.held_out) never appear in training.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sd_cli.demo import DEMO_CKPT, DEMO_CONFIG, DEMO_DIR
from sd_cli.sampling.schedule import LINEAR_END, LINEAR_START, NUM_TIMESTEPS
from sd_cli.demo import scenes as D

# The demo model: SD v1's layout (4 UNet levels, 2 res blocks, attention at 4/2/1, a CLIP text tower,
# 4-level VAE), small widths (multiples of 32; 8 GroupNorm groups). The text tower is 2 layers of width 64
# (context_dim 64): measured, 12 layers of width 16 never learned which color word belongs to the shape
# and which to the background; its 49408-token embedding (6.3 MB in fp16) is paid for by UNet levels
# 3-4 at 64 channels instead of 96.
DEMO_MODEL = {
    "family": "sd1",
    "scale_factor": None,  # measured
    "norm_groups": 8,  # SD's 32 groups on 32 channels would be per-channel norms that erase flat colors
    "schedule": {"linear_start": LINEAR_START, "linear_end": LINEAR_END, "timesteps": NUM_TIMESTEPS},
    "unet": {
        "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2, "channel_mult": [1, 2, 2, 2], "num_heads": 4, "transformer_depth": 1,
        "context_dim": 64,
    },
    "vae": {
        "embed_dim": 4, "z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 3, 3],
        "num_res_blocks": 2, "attn_resolutions": [], "resolution": 64,
    },
    "text_encoder": {
        "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    },
}
DEFAULT_OUT = DEMO_DIR
YAML_HEADER = """\
# The built-in demo model of sd-txt2img: a tiny Stable Diffusion v1-layout model trained from scratch on
# 64x64 synthetic scenes ("a red circle on a blue background"). Retrain: python -m sd_cli.train_demo
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_dict(args=None) -> dict:
    """DEMO_MODEL with the sizes given on the command line (--text-hidden, --unet-channels, ...)."""
    m = copy.deepcopy(DEMO_MODEL)
    if args is None:
        return m
    te, un = m["text_encoder"], m["unet"]
    if getattr(args, "text_hidden", None):
        te["hidden_size"] = un["context_dim"] = args.text_hidden
        te["intermediate_size"] = 4 * args.text_hidden
    if getattr(args, "text_layers", None):
        te["num_hidden_layers"] = args.text_layers
    if getattr(args, "text_heads", None):
        te["num_attention_heads"] = args.text_heads
    if getattr(args, "unet_channels", None):
        un["model_channels"] = args.unet_channels
    if getattr(args, "unet_mult", None):
        un["channel_mult"] = [int(x) for x in args.unet_mult.split(",")]
    return with_schedule(m, args)


def with_schedule(m: dict, args) -> dict:
    """m with the noise schedule of --linear-start / --linear-end, where given."""
    m = copy.deepcopy(m)
    for key in ("linear_start", "linear_end"):
        if getattr(args, key, None) is not None:
            m["schedule"][key] = getattr(args, key)
    return m


def model_config(scale_factor: float = 1.0, m: dict | None = None):
    from sd_cli.weights.config import Config, _from_ours  # noqa: F401  (our YAML reader, so the YAML and training agree)

    m = copy.deepcopy(m or DEMO_MODEL)
    m["scale_factor"] = scale_factor
    return _from_ours(m)


def yaml_text(scale_factor: float, extra: dict, m: dict | None = None) -> str:
    from omegaconf import OmegaConf

    m = copy.deepcopy(m or DEMO_MODEL)
    m["scale_factor"] = float(scale_factor)
    body = OmegaConf.to_yaml(OmegaConf.create({"model": m, "runtime": {"device": "auto", "precision": "autocast"}}))
    info = "".join(f"# {k}: {v}\n" for k, v in extra.items())
    return YAML_HEADER + info + body


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def autocast(args):
    """bf16 autocast on the CPU (about 1.5x faster where the CPU has bf16 instructions), or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------------------------------
# Stage 1: the VAE.


def vae_posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    moments = vae.quant_conv(vae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def train_vae(args, vae, steps: int, batch: int, base_lr: float) -> None:
    """One VAE phase: `steps` AdamW steps on `batch` fresh renders each, lr warm-up then cosine to base_lr/10."""
    rng = np.random.default_rng(args.seed)
    scenes = D.train_scenes()
    opt = torch.optim.AdamW(vae.parameters(), lr=base_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    vae.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, base_lr, 20)
        imgs, _, _ = D.sample_batch(rng, scenes, batch)
        x = to_tensor(imgs)
        with autocast(args):
            mean, logvar = vae_posterior(vae, x)
            mean, logvar = mean.float(), logvar.float()
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            rec = vae.decoder(vae.post_quant_conv(z)).float()
        l1 = (rec - x).abs().mean()
        l2 = F.mse_loss(rec, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + l2 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} l1 {l1.item():.4f} l2 {l2.item():.5f} kl {kl.item():.2f} "
                f"({time.time() - t0:.0f} s)")
    vae.eval()


@torch.no_grad()
def colour_separation(vae) -> dict:
    """How far apart the VAE's latent means put pictures that differ only in the shape's colour, and only in
    the background's, in units of the latents' own std (over all these pictures; L2 over the whole 4x8x8
    latent): the smallest shape-colour distance, the smallest and largest background distance, and the
    largest background distance over the smallest shape one. The UNet's noise has to
    drown the background colour at SD's top timesteps (or the caption is ignored) and must not drown
    the shape's colour at img2img's low strengths, so the ratio should be small (README "Retrain the demo
    model")."""
    pictures = {(s, c, b): D.render(D.Scene(s, c, b)) for s in ("circle", "square") for c in D.COLOR_NAMES
                for b in D.COLOR_NAMES if b != c}
    keys = list(pictures)
    mean, _ = vae_posterior(vae, to_tensor(np.stack([pictures[k] for k in keys])))
    z = mean / mean.std()
    at = {k: z[i] for i, k in enumerate(keys)}
    shape = [(at[k] - at[(k[0], c, k[2])]).norm().item() for k in keys for c in D.COLOR_NAMES
             if c not in (k[1], k[2]) and c > k[1]]
    bg = [(at[k] - at[(k[0], k[1], b)]).norm().item() for k in keys for b in D.COLOR_NAMES
          if b not in (k[1], k[2]) and b > k[2]]
    return {"shape_min": round(min(shape), 3), "background_min": round(min(bg), 3),
            "background_max": round(max(bg), 3), "ratio_bg_max_to_shape_min": round(max(bg) / min(shape), 2)}


@torch.no_grad()
def check_vae(vae, n: int = 64, seed: int = 99) -> float:
    """Classifier accuracy on VAE reconstructions of held-out scenes (the VAE never saw them)."""
    rng = np.random.default_rng(seed)
    held = list(D.held_out())
    imgs, _, scenes = D.sample_batch(rng, held, n)
    mean, _ = vae_posterior(vae, to_tensor(imgs))
    rec = vae.decoder(vae.post_quant_conv(mean))
    out = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean([D.classify(o).matches(s) for o, s in zip(out, scenes)]))


# ----------------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder on VAE latents.


@torch.no_grad()
def encode_pool(args, vae) -> tuple[torch.Tensor, torch.Tensor, list[D.Scene]]:
    """Latent posterior (mean, std) of args.pool_per_scene random renders of every training scene."""
    rng = np.random.default_rng(args.seed + 1)
    scenes = [s for s in D.train_scenes() for _ in range(args.pool_per_scene)]
    if args.split_prob > 0:  # a share split_prob of the pool: scenes with a second background colour
        split = D.split_scenes()
        n = round(len(scenes) * args.split_prob / (1 - args.split_prob))
        scenes += [split[int(i)] for i in np.random.default_rng(args.seed + 5).integers(len(split), size=n)]
    means, stds = [], []
    for i in range(0, len(scenes), 64):
        chunk = scenes[i : i + 64]
        imgs = np.stack([D.render(s, *D.random_layout(rng), **({"split": D.random_split(rng)} if s.bg2 else {}))
                         for s in chunk])
        mean, logvar = vae_posterior(vae, to_tensor(imgs))
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(means), torch.cat(stds), scenes


def train_unet(args, model, pool, scale_factor: float, workdir: Path, steps: int, final_lr: float | None = None,
               step_offset: int = 0) -> dict:
    """`steps` AdamW steps (fresh optimizer and EMA, starting from the model's current weights): lr warm-up
    over 100 steps, then constant (final_lr None) or cosine down to final_lr."""
    from sd_cli.model.tokenizer import get_tokenizer

    mean, std, scenes = pool
    tok = get_tokenizer()
    id_cache: dict[str, torch.Tensor] = {}

    def ids_of(caps: list[str]) -> torch.Tensor:
        missing = [c for c in set(caps) if c not in id_cache]
        if missing:
            for c, row in zip(missing, tok(missing).ids):
                id_cache[c] = row
        return torch.stack([id_cache[c] for c in caps])

    unet, text = model.model.diffusion_model, model.cond_stage_model
    params = list(unet.parameters()) + list(text.parameters())
    for p in model.first_stage_model.parameters():
        p.requires_grad_(False)
    ema = [p.detach().clone() for p in params]
    text_mult = args.text_lr / args.unet_lr
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "mult": 1.0},
                             {"params": list(text.parameters()), "mult": text_mult}],
                            lr=args.unet_lr, betas=(0.9, 0.99), weight_decay=0.0)
    probe_set = make_probe(args, pool, scale_factor)
    ac = model.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(args.seed + 2)
    rng = np.random.default_rng(args.seed + 3)
    t0 = time.time()
    losses = []
    unet.train()
    text.train()
    for step in range(steps):
        lr = args.unet_lr * min(1.0, (step + 1) / 100)  # constant after warm-up: a run cut at step N
        # equals a run with --unet-steps N, so any snapshot is a finished model of its own length
        if final_lr is not None and step >= 100:  # or cosine from --unet-lr down to final_lr
            p = (step - 100) / max(1, steps - 101)
            lr = final_lr + (args.unet_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * p))
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"]
        idx = torch.from_numpy(rng.integers(len(scenes), size=args.unet_batch))
        caps = []
        for i in idx.tolist():
            drop = rng.random() < args.uncond_prob
            caps.append("" if drop else caption(args, scenes[i], rng))
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale_factor
        t = torch.randint(0, ac.shape[0], (args.unet_batch,), generator=gen)
        if args.free_caption_below:
            caps = free_captions(args, caps, t, scenes, rng)
        eps = torch.randn(z0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        with autocast(args):
            ctx = model.encode_text(ids_of(caps))
            pred = model.unet(xt, t, ctx).float()
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            log(f"unet step {step_offset + step + 1}/{step_offset + steps} loss {np.mean(losses[-25:]):.4f} lr {lr:.2e} "
                f"({time.time() - t0:.0f} s)")
        keep = bool(args.keep_every) and (step_offset + step + 1) % args.keep_every == 0
        if (step + 1) % args.save_every == 0 or step == steps - 1 or keep:
            save_unet_snapshot(workdir, model, params, ema, step_offset + step + 1, scale_factor, args.model_dict)
            if keep:
                shutil.copyfile(workdir / "unet.pt", workdir / f"unet_{step_offset + step + 1}.pt")
        if args.probe_every and ((step + 1) % args.probe_every == 0 or step == steps - 1):
            log(f"probe at step {step_offset + step + 1}: {probe(model, probe_set, tok)}")
    unet.eval()
    text.eval()
    return {"unet_seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-100:]))}


def caption(args, scene: D.Scene, rng: np.random.Generator) -> str:
    """A training caption of scene in a random phrasing. A split scene's caption names both background
    colours, or with --split-caption one only one of them (drawn at random), as a caption names what
    matters and not every region: the model learns that a background may hold a colour the text leaves
    out, which is what inpainting one side with a new background colour asks of it."""
    template = int(rng.integers(len(D.TEMPLATES)))
    if scene.bg2 is not None and args.split_caption == "one":
        scene = D.Scene(scene.shape, scene.color, (scene.bg, scene.bg2)[int(rng.integers(2))])
    return scene.prompt(template)


def free_captions(args, caps: list[str], t: torch.Tensor, scenes: list, rng: np.random.Generator) -> list[str]:
    """caps with each row below timestep --free-caption-below given another random picture's caption (or
    "", at --uncond-prob): at low noise the model learns to keep what the latent shows, whatever the text
    says, as large models do; img2img at low strength then keeps the picture's colours."""
    out = list(caps)
    for i in np.nonzero(t.numpy() < args.free_caption_below)[0].tolist():
        other = scenes[int(rng.integers(len(scenes)))]
        out[i] = "" if rng.random() < args.uncond_prob else caption(args, other, rng)
    return out


def make_probe(args, pool, scale_factor: float, n: int = 192) -> dict:
    """A fixed batch (latents, noise, t in 100..900) to measure how much the captions matter."""
    mean, _, scenes = pool
    g = torch.Generator().manual_seed(args.seed + 7)
    idx = torch.randperm(len(scenes), generator=g)[:n]
    z0 = mean[idx] * scale_factor
    return {"z0": z0, "eps": torch.randn(z0.shape, generator=g), "t": torch.randint(100, 900, (len(z0),), generator=g),
            "scenes": [scenes[i] for i in idx.tolist()]}


@torch.no_grad()
def probe(model, ps: dict, tok) -> str:
    """eps-MSE with the right caption, with foreground/background colors swapped, with random colors, and
    with "": the gaps show whether the model reads the colors and their roles from the text."""
    a = model.alphas_cumprod.float()[ps["t"]].view(-1, 1, 1, 1)
    xt = a.sqrt() * ps["z0"] + (1 - a).sqrt() * ps["eps"]
    rng = np.random.default_rng(0)

    def recolor(s):
        c, b = rng.choice(len(D.COLOR_NAMES), size=2, replace=False)
        return D.Scene(s.shape, D.COLOR_NAMES[c], D.COLOR_NAMES[b])

    caps = {"right": [s.prompt() for s in ps["scenes"]],
            "swapped": [D.Scene(s.shape, s.bg, s.color).prompt() for s in ps["scenes"]],
            "random": [recolor(s).prompt() for s in ps["scenes"]],
            "empty": [""] * len(ps["scenes"])}
    was = model.training
    model.eval()
    out = {k: F.mse_loss(model.unet(xt, ps["t"], model.encode_text(tok(v).ids)), ps["eps"]).item() for k, v in caps.items()}
    model.train(was)
    return " ".join(f"{k} {v:.4f}" for k, v in out.items())


def save_unet_snapshot(workdir: Path, model, params, ema, step: int, scale_factor: float, mdict: dict) -> None:
    """The EMA weights of UNet + text encoder (plus the VAE) as a full state dict, written atomically."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for p, b in zip(params, backup):
            p.copy_(b)
    tmp = workdir / "unet.pt.tmp"
    torch.save({"state_dict": sd, "step": step, "scale_factor": scale_factor, "model": json.dumps(mdict)}, tmp)
    tmp.replace(workdir / "unet.pt")


def export(workdir: Path, out: Path, extra: dict | None = None) -> Path:
    """Write <out>/demo.safetensors (fp16 weights, fp32 schedule, int64 position_ids) + <out>/demo.yaml."""
    from safetensors.torch import save_file

    from sd_cli.model.ldm import SCHEDULE_KEYS

    snap = torch.load(workdir / "unet.pt", map_location="cpu", weights_only=True)
    sd = {}
    for k, v in snap["state_dict"].items():
        if k in SCHEDULE_KEYS or not v.is_floating_point():
            sd[k] = v.contiguous()
        else:
            sd[k] = v.to(torch.float16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    path = out / DEMO_CKPT.name
    save_file(sd, str(path), metadata={"format": "pt", "sd_cli_demo": "1", "step": str(snap["step"])})
    path.chmod(0o644)
    info = {"unet steps": snap["step"], **(extra or {})}
    mdict = json.loads(snap["model"]) if "model" in snap else None
    (out / DEMO_CONFIG.name).write_text(yaml_text(snap["scale_factor"], info, mdict))
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {out / DEMO_CONFIG.name}")
    return path


# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOptions:
    """Every knob of a training run (the flags of `python -m sd_cli.train_demo`, sd_cli/cli/train_demo.py)."""

    stage: str = 'all'
    out: Path = DEFAULT_OUT
    workdir: Path = Path("runs/demo")
    seed: int = 0
    threads: int | None = None
    precision: str = 'fp32'
    vae_steps: int = 800
    vae_batch: int = 4
    vae_lr: float = 0.002
    vae2_steps: int = 800
    vae2_batch: int = 8
    vae2_lr: float = 0.001
    vae_resume: bool = False
    kl_weight: float = 1e-05
    pool_per_scene: int = 32
    unet_steps: int = 6000
    decay_steps: int = 0
    final_lr: float = 3e-05
    unet_batch: int = 64
    unet_lr: float = 0.001
    text_lr: float = 0.002
    latent_std: float = 0.3
    text_hidden: int | None = None
    text_layers: int | None = None
    text_heads: int | None = None
    unet_channels: int | None = None
    unet_mult: str | None = None
    init_from: Path | None = None
    linear_start: float | None = None
    linear_end: float | None = None
    split_prob: float = 0.0
    split_caption: str = "both"
    free_caption_below: int = 0
    note: str | None = None
    probe_every: int = 250
    uncond_prob: float = 0.1
    ema: float = 0.995
    save_every: int = 100
    keep_every: int = 0
    model_dict: dict | None = None  # the model's sizes (from the text/unet flags, or --init-from)


def _build_model(opts: TrainOptions, init: dict | None):
    """The demo model at its initial weights; (model, the --init-from snapshot `init` with the model's own
    schedule buffers, or None)."""
    from sd_cli.model.layers import norm_groups
    from sd_cli.model.ldm import SCHEDULE_KEYS, LatentDiffusion
    from sd_cli.model.vae import AutoencoderKL

    model = LatentDiffusion(model_config(1.0, opts.model_dict))
    if init is not None:  # the schedule buffers are the model's own (--linear-start/--linear-end may change them)
        own = model.state_dict()
        init = {**init, "state_dict": {k: own[k] if k in SCHEDULE_KEYS else v for k, v in init["state_dict"].items()}}
    # The VAE's initial weights from their own seed, so they do not depend on the sizes of the parts built
    # before it (the UNet's and text encoder's random draws come first in LatentDiffusion).
    with norm_groups(model.cfg.norm_groups):
        torch.manual_seed(opts.seed + 100)
        model.first_stage_model = AutoencoderKL(model.cfg.vae)
    torch.manual_seed(opts.seed)
    with torch.no_grad():
        # zero-init the UNet's output conv (eps starts at 0), as LDM does
        model.model.diffusion_model.out[2].weight.zero_()
        model.model.diffusion_model.out[2].bias.zero_()
        # start the VAE posterior almost deterministic (std ~0.02): with log-variance 0 the sampling noise
        # swamps the young encoder's means and the decoder learns nothing but the average color for a long time
        embed = model.first_stage_model.quant_conv.bias.shape[0] // 2
        model.first_stage_model.quant_conv.bias[embed:] = -8.0
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    log(f"params: unet {n(model.model):,} vae {n(model.first_stage_model):,} text {n(model.cond_stage_model):,} "
        f"(fp16 file ~{2 * n(model) / 1e6:.1f} MB)")
    return model, init


def load_init(path: Path) -> dict:
    """A unet.pt snapshot, or a demo.safetensors exported earlier (with its demo.yaml beside it) as one."""
    if path.suffix != ".safetensors":
        return torch.load(path, map_location="cpu", weights_only=True)
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    if not path.with_suffix(".yaml").is_file():
        raise SystemExit(f"train_demo: error: --init-from {path} needs its config beside it, {path.with_suffix('.yaml')}")
    m = OmegaConf.to_container(OmegaConf.load(path.with_suffix(".yaml")))["model"]
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    return {"state_dict": sd, "step": 0, "scale_factor": m["scale_factor"], "model": json.dumps({**m, "scale_factor": None})}


def _vae_stage(opts: TrainOptions, vae, stats: dict) -> None:
    """Stage 1: the VAE phases, then <workdir>/vae.pt with its held-out reconstruction accuracy."""
    t0 = time.time()
    phases = [(opts.vae_steps, opts.vae_batch, opts.vae_lr)]
    if opts.vae_resume:  # a further VAE phase on top of <workdir>/vae.pt (e.g. at a lower learning rate)
        before = torch.load(opts.workdir / "vae.pt", map_location="cpu", weights_only=True)
        vae.load_state_dict(before["vae"])
        stats["vae_seconds"] = before.get("stats", {}).get("vae_seconds", 0.0)
        stats["vae_phases"] = before.get("stats", {}).get("vae_phases", [])
    elif opts.stage == "all" and opts.vae2_steps > 0:
        phases.append((opts.vae2_steps, opts.vae2_batch, opts.vae2_lr))
    for i, (steps, batch, lr) in enumerate(phases):
        if i > 0 or opts.vae_resume:
            torch.manual_seed(opts.seed)
        train_vae(opts, vae, steps, batch, lr)
        stats["vae_phases"] = stats.get("vae_phases", []) + [{"steps": steps, "batch": batch, "lr": lr}]
    stats["vae_seconds"] = round(stats.get("vae_seconds", 0.0) + time.time() - t0, 1)
    stats["vae_heldout_recon_accuracy"] = check_vae(vae)
    stats["vae_colour_separation"] = colour_separation(vae)
    torch.save({"vae": vae.state_dict(), "stats": stats}, opts.workdir / "vae.pt")
    log(f"vae done: {stats}")


def _unet_stage(opts: TrainOptions, model, init, stats: dict) -> None:
    """Stage 2: encode the pool, set scale_factor, train phase 1 (and phase 2), keep unet.pt for export."""
    t0 = time.time()
    pool = encode_pool(opts, model.first_stage_model)
    z = pool[0] + pool[1] * torch.randn(pool[0].shape, generator=torch.Generator().manual_seed(opts.seed))
    scale_factor = float(f"{opts.latent_std / z.std().item():.5g}") if init is None else init["scale_factor"]
    log(f"pool: {len(pool[2])} latents in {time.time() - t0:.0f} s, latent std {z.std().item():.4f}, "
        f"mean {z.mean().item():.4f} -> scale_factor {scale_factor}")
    model.cfg = model_config(scale_factor, opts.model_dict)
    if init is None:
        log(f"phase 1: {opts.unet_steps} steps at lr {opts.unet_lr:g} (text encoder {opts.text_lr:g})")
        phase1 = train_unet(opts, model, pool, scale_factor, opts.workdir, opts.unet_steps)
        stats["phase1"] = {"steps": opts.unet_steps, **phase1}
        stats["unet_seconds"] = phase1["unet_seconds"]
        (opts.workdir / "unet.pt").replace(opts.workdir / "unet_phase1.pt")
        init = torch.load(opts.workdir / "unet_phase1.pt", map_location="cpu", weights_only=True)
    if opts.decay_steps > 0:
        model.load_state_dict(init["state_dict"])  # the EMA weights of phase 1
        log(f"phase 2 from step {init['step']}: {opts.decay_steps} steps, cosine lr {opts.unet_lr:g} -> {opts.final_lr:g}")
        phase2 = train_unet(opts, model, pool, scale_factor, opts.workdir, opts.decay_steps, opts.final_lr, init["step"])
        stats["phase2"] = {"steps": opts.decay_steps, **phase2}
        stats["unet_seconds"] = round(stats.get("unet_seconds", 0.0) + phase2["unet_seconds"], 1)
    else:
        torch.save(init, opts.workdir / "unet.pt")  # what --stage export writes
    stats["latent_std_before_scaling"] = round(z.std().item(), 4)


def train(opts: TrainOptions) -> int:
    """Run the stages `opts.stage` asks for; the default writes sd_cli/demo/demo.{safetensors,yaml}."""
    from sd_cli.model.cpu import default_threads

    opts = replace(opts, threads=opts.threads or default_threads())
    if not 0.0 <= opts.split_prob < 1.0:
        raise SystemExit(f"train_demo: error: --split-prob {opts.split_prob}: must be at least 0 and below 1")
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    if opts.stage == "export":
        export(opts.workdir, opts.out)
        return 0
    mdict = model_dict(opts)
    init = None
    if opts.init_from:  # phase 2 from a snapshot (its sizes, weights and scale factor)
        init = load_init(opts.init_from)
        mdict = with_schedule(json.loads(init["model"]), opts)
    opts = replace(opts, model_dict=mdict)
    model, init = _build_model(opts, init)
    stats: dict = {}
    if opts.stage in ("all", "vae"):
        _vae_stage(opts, model.first_stage_model, stats)
        if opts.stage == "vae":
            return 0
    if init is not None and not (opts.workdir / "vae.pt").exists():  # the VAE of the model phase 2 starts from
        vae = {k.removeprefix("first_stage_model."): v for k, v in init["state_dict"].items()
               if k.startswith("first_stage_model.")}
        torch.save({"vae": vae, "stats": {}}, opts.workdir / "vae.pt")
    saved = torch.load(opts.workdir / "vae.pt", map_location="cpu", weights_only=True)
    model.first_stage_model.load_state_dict(saved["vae"])
    model.first_stage_model.eval()
    stats = {**saved.get("stats", {}), **stats}
    _unet_stage(opts, model, init, stats)
    stats["seed"] = opts.seed
    (opts.workdir / "stats.json").write_text(json.dumps(stats, indent=1))
    extra = {k: stats[k] for k in ("vae_seconds", "unet_seconds", "seed") if k in stats}
    if opts.note:
        extra["note"] = opts.note
    export(opts.workdir, opts.out, extra)
    log(f"done: {stats}")
    return 0
