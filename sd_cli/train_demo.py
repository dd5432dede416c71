"""Train the built-in demo model from scratch: `python -m sd_cli.train_demo --help`.

Two stages, plain PyTorch (no pytorch-lightning: two short loops need no framework, and the tool stays
dependency-free and bit-for-bit deterministic for a seed on a given machine and thread count):

1. VAE: SD's AutoencoderKL layout (f=8, 4 levels), trained on 64x64 renders of the synthetic scenes
   (sd_cli.demo_data) with L1 + L2 reconstruction and a small KL term.
2. Latent diffusion: a pool of training renders is encoded once with the frozen VAE; the scale factor is
   measured so latents have unit std; then the UNet and the CLIP-style text encoder learn eps-prediction
   on SD's schedule (scaled linear betas 0.00085..0.012, 1000 steps), with the caption replaced by "" 10%
   of the time so classifier-free guidance works. An EMA of the weights is what gets exported.

Output: `<out>/demo.safetensors` (fp16, the exact SD v1 key names, only the sizes differ) and
`<out>/demo.yaml` (our config format). Intermediate state goes to --workdir (vae.pt, unet.pt), so
`--stage unet` reuses a trained VAE and `--stage export` writes the latest UNet snapshot.
Held-out scenes (sd_cli.demo_data.held_out) never appear in training.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import demo_data as D

# The demo model: SD v1's layout (4 UNet levels, 2 res blocks, attention at 4/2/1, 12 CLIP layers,
# 4-level VAE), the smallest widths the layout allows (multiples of 32; 8 GroupNorm groups).
DEMO_MODEL = {
    "family": "sd1",
    "scale_factor": None,  # measured
    "norm_groups": 8,  # SD's 32 groups on 32 channels would be per-channel norms that erase flat colors
    "schedule": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000},
    "unet": {
        "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2, "channel_mult": [1, 2, 3, 3], "num_heads": 4, "transformer_depth": 1,
        "context_dim": 16,
    },
    "vae": {
        "embed_dim": 4, "z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 3, 3],
        "num_res_blocks": 2, "attn_resolutions": [], "resolution": 64,
    },
    "text_encoder": {
        "vocab_size": 49408, "hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 12,
        "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    },
}
DEFAULT_OUT = Path(__file__).resolve().parent / "demo"
YAML_HEADER = """\
# The built-in demo model of sd-txt2img: a tiny Stable Diffusion v1-layout model trained from scratch on
# 64x64 synthetic scenes ("a red circle on a blue background"). Retrain: python -m sd_cli.train_demo
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_config(scale_factor: float = 1.0):
    from .config import Config, _from_ours  # noqa: F401  (our YAML reader, so the YAML and training agree)

    m = copy.deepcopy(DEMO_MODEL)
    m["scale_factor"] = scale_factor
    return _from_ours(m)


def yaml_text(scale_factor: float, extra: dict) -> str:
    from omegaconf import OmegaConf

    m = copy.deepcopy(DEMO_MODEL)
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
    means, stds = [], []
    for i in range(0, len(scenes), 64):
        chunk = scenes[i : i + 64]
        imgs = np.stack([D.render(s, *D.random_layout(rng)) for s in chunk])
        mean, logvar = vae_posterior(vae, to_tensor(imgs))
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(means), torch.cat(stds), scenes


def train_unet(args, model, pool, scale_factor: float, workdir: Path) -> dict:
    from .tokenizer import get_tokenizer

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
    opt = torch.optim.AdamW(params, lr=args.unet_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ac = model.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(args.seed + 2)
    rng = np.random.default_rng(args.seed + 3)
    t0 = time.time()
    losses = []
    unet.train()
    text.train()
    for step in range(args.unet_steps):
        lr = args.unet_lr * min(1.0, (step + 1) / 100)  # constant after warm-up: a run cut at step N
        # equals a run with --unet-steps N, so any snapshot is a finished model of its own length
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.integers(len(scenes), size=args.unet_batch))
        caps = []
        for i in idx.tolist():
            drop = rng.random() < args.uncond_prob
            caps.append("" if drop else scenes[i].prompt(int(rng.integers(len(D.TEMPLATES)))))
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale_factor
        t = torch.randint(0, ac.shape[0], (args.unet_batch,), generator=gen)
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
        if step % 25 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step + 1}/{args.unet_steps} loss {np.mean(losses[-25:]):.4f} lr {lr:.2e} "
                f"({time.time() - t0:.0f} s)")
        if (step + 1) % args.save_every == 0 or step == args.unet_steps - 1:
            save_unet_snapshot(workdir, model, params, ema, step + 1, scale_factor)
    unet.eval()
    text.eval()
    return {"unet_seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-100:]))}


def save_unet_snapshot(workdir: Path, model, params, ema, step: int, scale_factor: float) -> None:
    """The EMA weights of UNet + text encoder (plus the VAE) as a full state dict, written atomically."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for p, b in zip(params, backup):
            p.copy_(b)
    tmp = workdir / "unet.pt.tmp"
    torch.save({"state_dict": sd, "step": step, "scale_factor": scale_factor}, tmp)
    tmp.replace(workdir / "unet.pt")


def export(workdir: Path, out: Path, extra: dict | None = None) -> Path:
    """Write <out>/demo.safetensors (fp16 weights, fp32 schedule, int64 position_ids) + <out>/demo.yaml."""
    from safetensors.torch import save_file

    from .ldm import SCHEDULE_KEYS

    snap = torch.load(workdir / "unet.pt", map_location="cpu", weights_only=True)
    sd = {}
    for k, v in snap["state_dict"].items():
        if k in SCHEDULE_KEYS or not v.is_floating_point():
            sd[k] = v.contiguous()
        else:
            sd[k] = v.to(torch.float16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "sd_cli_demo": "1", "step": str(snap["step"])})
    path.chmod(0o644)
    info = {"unet steps": snap["step"], **(extra or {})}
    (out / "demo.yaml").write_text(yaml_text(snap["scale_factor"], info))
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {out / 'demo.yaml'}")
    return path


# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sd_cli.train_demo",
        description="Retrain sd-txt2img's built-in demo model (64x64 shapes) from scratch on the CPU: "
                    "VAE first, then UNet + text encoder. Deterministic for a seed (same machine, same --threads).",
        epilog="default run (~1 h on 2 idle cores): python -m sd_cli.train_demo --workdir runs/demo\n"
               "longer, better:  python -m sd_cli.train_demo --unet-steps 4000\n"
               "then measure:    python -m sd_cli.eval_demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage", choices=("all", "vae", "unet", "export"), default="all",
                   help="all: vae then unet then export; unet: reuse <workdir>/vae.pt; export: write the latest "
                        "<workdir>/unet.pt snapshot to --out (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where demo.safetensors + demo.yaml go (default: the package's sd_cli/demo)")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="intermediate checkpoints (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s; on a shared machine 2 threads measured up to 20x "
                        "slower than 1, since each waits for the other to be scheduled)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="fp32",
                   help="training compute: bf16 autocast or plain fp32 (default: %(default)s); weights stay fp32")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae2-steps", type=int, default=800,
                   help="with --stage all: a second VAE phase of this many steps (0: none) (default: %(default)s)")
    p.add_argument("--vae2-batch", type=int, default=8)
    p.add_argument("--vae2-lr", type=float, default=1e-3)
    p.add_argument("--vae-resume", action="store_true",
                   help="with --stage vae: start from <workdir>/vae.pt and train --vae-steps more (a new phase)")
    p.add_argument("--kl-weight", type=float, default=1e-5, help="weight of the per-element KL term (default: %(default)s)")
    p.add_argument("--pool-per-scene", type=int, default=24, help="encoded renders per training scene (default: %(default)s)")
    p.add_argument("--unet-steps", type=int, default=2300,
                   help="UNet + text encoder steps; the learning rate is constant after 100 warm-up steps, so the "
                        "snapshot at step N equals a run of N steps (default: %(default)s)")
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--uncond-prob", type=float, default=0.1, help="caption dropout for guidance (default: %(default)s)")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the exported weights (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=50, help="UNet snapshot every N steps (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stage == "export":
        export(args.workdir, args.out)
        return 0

    from .ldm import LatentDiffusion

    model = LatentDiffusion(model_config(1.0))
    torch.manual_seed(args.seed)
    with torch.no_grad():
        # zero-init the UNet's output conv (eps starts at 0), as LDM does
        model.model.diffusion_model.out[2].weight.zero_()
        model.model.diffusion_model.out[2].bias.zero_()
        # start the VAE posterior almost deterministic (std ~0.02): with log-variance 0 the sampling noise
        # swamps the young encoder's means and the decoder learns nothing but the average color for a long time
        embed = model.first_stage_model.quant_conv.bias.shape[0] // 2
        model.first_stage_model.quant_conv.bias[embed:] = -8.0
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    log(f"params: unet {n(model.model):,} vae {n(model.first_stage_model):,} text {n(model.cond_stage_model):,}")
    stats: dict = {}
    vae = model.first_stage_model
    if args.stage in ("all", "vae"):
        t0 = time.time()
        phases = [(args.vae_steps, args.vae_batch, args.vae_lr)]
        if args.vae_resume:  # a further VAE phase on top of <workdir>/vae.pt (e.g. at a lower learning rate)
            before = torch.load(args.workdir / "vae.pt", map_location="cpu", weights_only=True)
            vae.load_state_dict(before["vae"])
            stats["vae_seconds"] = before.get("stats", {}).get("vae_seconds", 0.0)
            stats["vae_phases"] = before.get("stats", {}).get("vae_phases", [])
        elif args.stage == "all" and args.vae2_steps > 0:
            phases.append((args.vae2_steps, args.vae2_batch, args.vae2_lr))
        for i, (steps, batch, lr) in enumerate(phases):
            if i > 0 or args.vae_resume:
                torch.manual_seed(args.seed)
            train_vae(args, vae, steps, batch, lr)
            stats["vae_phases"] = stats.get("vae_phases", []) + [{"steps": steps, "batch": batch, "lr": lr}]
        stats["vae_seconds"] = round(stats.get("vae_seconds", 0.0) + time.time() - t0, 1)
        stats["vae_heldout_recon_accuracy"] = check_vae(vae)
        torch.save({"vae": vae.state_dict(), "stats": stats}, args.workdir / "vae.pt")
        log(f"vae done: {stats}")
        if args.stage == "vae":
            return 0
    saved = torch.load(args.workdir / "vae.pt", map_location="cpu", weights_only=True)
    vae.load_state_dict(saved["vae"])
    vae.eval()
    stats = {**saved.get("stats", {}), **stats}

    t0 = time.time()
    pool = encode_pool(args, vae)
    z = pool[0] + pool[1] * torch.randn(pool[0].shape, generator=torch.Generator().manual_seed(args.seed))
    scale_factor = float(f"{1.0 / z.std().item():.5g}")
    log(f"pool: {len(pool[2])} latents in {time.time() - t0:.0f} s, latent std {z.std().item():.4f}, "
        f"mean {z.mean().item():.4f} -> scale_factor {scale_factor}")
    model.cfg = model_config(scale_factor)
    stats.update(train_unet(args, model, pool, scale_factor, args.workdir))
    stats["latent_std_before_scaling"] = round(1.0 / scale_factor, 4)
    stats["seed"] = args.seed
    (args.workdir / "stats.json").write_text(json.dumps(stats, indent=1))
    export(args.workdir, args.out, {k: stats[k] for k in ("vae_seconds", "unet_seconds", "seed") if k in stats})
    log(f"done: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
