"""`python -m sd_cli.train_demo`: the flags of a demo-model training run (the training: sd_cli.run.train_demo).

Defaults live once, in `TrainOptions`; the parser shows them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from sd_cli.run.train_demo import DEMO_MODEL, TrainOptions, train


def _add_finetune_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a fine-tune for image to image and inpainting (README 'Retrain the demo model')."""
    p.add_argument("--linear-start", type=float,
                   help="first beta of the scaled-linear noise schedule (default: SD's 0.00085, or the --init-from model's)")
    p.add_argument("--linear-end", type=float,
                   help="last beta of the schedule (default: SD's 0.012, or the --init-from model's). 1e-5..0.02 "
                        "has less noise than SD's at low timesteps (img2img at low strength keeps the colours) and "
                        "more at the top: README 'Retrain the demo model'")
    p.add_argument("--split-prob", type=float,
                   help="share of training pictures whose background has a second colour on one side (inpainting "
                        "one side needs such pictures; see --split-caption) (default: %(default)s)")
    p.add_argument("--split-caption", choices=("both", "one"),
                   help="what a split picture's caption names: both background colours, or one of them at random "
                        "(default: %(default)s)")
    p.add_argument("--free-caption-below", type=int,
                   help="below this timestep, train with another picture's caption: at low noise the model keeps "
                        "what the latent shows (0: off) (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sd_cli.train_demo",
        description="Retrain sd-txt2img's built-in demo model (64x64 shapes) from scratch on the CPU: "
                    "VAE first, then UNet + text encoder. Deterministic for a seed (same machine, same --threads).",
        epilog="default run (~1 h on 2 idle cores): python -m sd_cli.train_demo --workdir runs/demo\n"
               "UNet only, on an existing runs/demo/vae.pt: python -m sd_cli.train_demo --stage unet\n"
               "then measure:    python -m sd_cli.eval_demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage", choices=("all", "vae", "unet", "export"),
                   help="all: vae then unet then export; unet: reuse <workdir>/vae.pt; export: write the latest "
                        "<workdir>/unet.pt snapshot to --out (default: %(default)s)")
    p.add_argument("--out", type=Path, help="where demo.safetensors + demo.yaml go (default: the package's sd_cli/demo)")
    p.add_argument("--workdir", type=Path, help="intermediate checkpoints (default: %(default)s)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: the physical cores; on an idle 2-core machine 2 threads make a "
                        "UNet step 0.44 s; on a busy one use 1, since 2 threads then wait for each other)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="training compute: bf16 autocast or plain fp32 (default: %(default)s); weights stay fp32")
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--vae-batch", type=int)
    p.add_argument("--vae-lr", type=float)
    p.add_argument("--vae2-steps", type=int,
                   help="with --stage all: a second VAE phase of this many steps (0: none) (default: %(default)s)")
    p.add_argument("--vae2-batch", type=int)
    p.add_argument("--vae2-lr", type=float)
    p.add_argument("--vae-resume", action="store_true",
                   help="with --stage vae: start from <workdir>/vae.pt and train --vae-steps more (a new phase)")
    p.add_argument("--kl-weight", type=float, help="weight of the per-element KL term (default: %(default)s)")
    p.add_argument("--pool-per-scene", type=int, help="encoded renders per training scene (default: %(default)s)")
    p.add_argument("--unet-steps", type=int,
                   help="UNet + text encoder steps of phase 1; the learning rate is constant after 100 warm-up steps, "
                        "so the snapshot at step N equals a phase 1 of N steps (default: %(default)s)")
    p.add_argument("--decay-steps", type=int,
                   help="phase 2: this many more steps from phase 1's EMA weights (fresh optimizer and EMA), the "
                        "learning rate warmed up again, then cosine down to --final-lr (0: no phase 2). Measured: "
                        "4000 + 3000 steps fit the scenes so well that guidance adds nothing and 7.5 overshoots "
                        "(default: %(default)s)")
    p.add_argument("--final-lr", type=float, help="end of phase 2's cosine (default: %(default)s)")
    p.add_argument("--unet-batch", type=int)
    p.add_argument("--unet-lr", type=float)
    p.add_argument("--text-lr", type=float, help="learning rate of the text encoder (default: %(default)s)")
    p.add_argument("--latent-std", type=float,
                   help="std of the scaled latents the UNet learns (scale_factor = this / measured std). Below 1 the "
                        "flat colors of these 8x8 latents are no longer readable through the noise at SD's highest "
                        "timesteps, so the model has to take them from the caption (default: %(default)s)")
    p.add_argument("--text-hidden", type=int, help="text encoder width = UNet context_dim (default: %d)" % DEMO_MODEL["text_encoder"]["hidden_size"])
    p.add_argument("--text-layers", type=int, help="text encoder layers (default: %d)" % DEMO_MODEL["text_encoder"]["num_hidden_layers"])
    p.add_argument("--text-heads", type=int, help="text encoder attention heads (default: %d)" % DEMO_MODEL["text_encoder"]["num_attention_heads"])
    p.add_argument("--unet-channels", type=int, help="UNet model_channels (default: %d)" % DEMO_MODEL["unet"]["model_channels"])
    p.add_argument("--unet-mult", help="UNet channel_mult, comma-separated (default: %s)" % ",".join(map(str, DEMO_MODEL["unet"]["channel_mult"])))
    p.add_argument("--init-from", type=Path,
                   help="with --stage unet: skip phase 1 and run phase 2 from this unet.pt snapshot (e.g. "
                        "<workdir>/unet_phase1.pt)")
    _add_finetune_flags(p)
    p.add_argument("--note", help="a line for the YAML header (e.g. how the run was made)")
    p.add_argument("--probe-every", type=int,
                   help="every N steps log the eps loss on a fixed batch with the right caption, with shape and "
                        "background colors swapped, with random colors and with \"\" (0: never) (default: %(default)s)")
    p.add_argument("--uncond-prob", type=float, help="caption dropout for guidance (default: %(default)s)")
    p.add_argument("--ema", type=float, help="EMA decay of the exported weights (default: %(default)s)")
    p.add_argument("--save-every", type=int, help="UNet snapshot every N steps (default: %(default)s)")
    p.add_argument("--keep-every", type=int,
                   help="also keep the snapshot of every N-th step as <workdir>/unet_<step>.pt, to evaluate how "
                        "accuracy grows with training (0: keep none) (default: %(default)s)")
    p.set_defaults(**{k: v for k, v in asdict(TrainOptions()).items() if k != "model_dict"})
    return p


def main(argv: list[str] | None = None) -> int:
    return train(TrainOptions(**vars(build_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
