"""Measure the demo model: `python -m sd_cli.eval_demo --help`.

1. Validates the classifier (sd_cli.demo_data.classify) on ground-truth renders of every scene at random
   layouts: it must read shape, color and background back correctly (~100%) before it judges the model.
2. Renders the held-out prompts (scenes never shown whole in training, "a {color} {shape} on a {bg}
   background") with each sampler, step count and guidance scale, several seeds each, and reports the
   share of images whose shape, color and background all match the prompt (and each part alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sd_cli.demo import scenes as D

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def validate_classifier(n_per_scene: int = 10, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    ok = total = 0
    for scene in D.all_scenes():
        for _ in range(n_per_scene):
            ok += D.classify(D.render(scene, *D.random_layout(rng))).matches(scene)
            total += 1
    return ok / total


def load_demo(ckpt: Path, config: Path):
    from sd_cli.weights.config import load_config
    from sd_cli.weights.loading import load_model
    from sd_cli.pipeline.generate import Pipeline

    cfg = load_config(config)
    model = load_model(cfg.model, ckpt, device="cpu", dtype=torch.float32)
    return Pipeline(model, torch.device("cpu"), on_warning=lambda m: None)


def generate(pipe, prompts: list[str], sampler: str, steps: int, scale: float, seed: int) -> np.ndarray:
    from sd_cli.pipeline.generate import initial_noise
    from sd_cli.sampling.samplers import get_sampler

    gen = torch.Generator("cpu").manual_seed(seed)
    noise = initial_noise(gen, len(prompts), 4, D.SIZE, D.SIZE, 8)
    eta = get_sampler(sampler).resolve_eta(None)
    return pipe.generate(prompts, noise, sampler=sampler, steps=steps, scale=scale, eta=eta, generator=gen)


def score(images: np.ndarray, scenes: list[D.Scene]) -> dict[str, float]:
    reads = [D.classify(img) for img in images]
    return {
        "all": float(np.mean([r.matches(s) for r, s in zip(reads, scenes)])),
        "shape": float(np.mean([r.shape == s.shape for r, s in zip(reads, scenes)])),
        "color": float(np.mean([r.color == s.color for r, s in zip(reads, scenes)])),
        "bg": float(np.mean([r.bg == s.bg for r, s in zip(reads, scenes)])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_cli.eval_demo", description=__doc__.splitlines()[0].split(":")[0]
                                + ": accuracy on held-out prompts per sampler, step count and guidance scale.")
    p.add_argument("--ckpt", type=Path, default=DEMO_DIR / "demo.safetensors")
    p.add_argument("--config", type=Path, default=DEMO_DIR / "demo.yaml")
    p.add_argument("--samplers", default="ddim,plms,dpmpp_2m,euler_a")
    p.add_argument("--steps", default="10,25,50", help="comma-separated step counts (default: %(default)s)")
    p.add_argument("--scales", default="1.0,7.5", help="comma-separated guidance scales (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=4, help="images per held-out prompt (seeds 0..N-1) (default: %(default)s)")
    p.add_argument("--train-prompts", action="store_true", help="also score prompts of training scenes (canonical phrasing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", type=Path, help="write a PNG grid of every setting into this folder")
    p.add_argument("--json", type=Path, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.time()
    acc = validate_classifier()
    print(f"classifier on ground-truth renders ({len(D.all_scenes())} scenes x 10 layouts): {acc:.1%}", flush=True)

    pipe = load_demo(args.ckpt, args.config)
    sets = {"held-out": list(D.held_out())}
    if args.train_prompts:
        rng = np.random.default_rng(0)
        train = D.train_scenes()
        sets["train"] = [train[i] for i in rng.choice(len(train), size=16, replace=False)]
    results = []
    print("\n| prompts | sampler | steps | scale | all correct | shape | color | background | s/image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for set_name, scenes in sets.items():
        prompts = [s.prompt() for s in scenes]
        for sampler in args.samplers.split(","):
            for steps in [int(x) for x in args.steps.split(",")]:
                for scale in [float(x) for x in args.scales.split(",")]:
                    t1 = time.time()
                    imgs = np.concatenate([generate(pipe, prompts, sampler, steps, scale, seed) for seed in range(args.seeds)])
                    per = (time.time() - t1) / len(imgs)
                    sc = score(imgs, scenes * args.seeds)
                    results.append({"prompts": set_name, "sampler": sampler, "steps": steps, "scale": scale,
                                    **sc, "seconds_per_image": per})
                    print(f"| {set_name} | {sampler} | {steps} | {scale:g} | {sc['all']:.0%} | {sc['shape']:.0%} | "
                          f"{sc['color']:.0%} | {sc['bg']:.0%} | {per:.2f} |", flush=True)
                    if args.save:
                        from PIL import Image

                        args.save.mkdir(parents=True, exist_ok=True)
                        rows = [np.concatenate(list(imgs[i * len(prompts) : (i + 1) * len(prompts)]), 1)
                                for i in range(args.seeds)]
                        Image.fromarray(np.concatenate(rows, 0)).save(
                            args.save / f"{set_name}-{sampler}-{steps}-{scale:g}.png")
    print(f"\nheld-out prompts: {', '.join(s.prompt() for s in D.held_out())}")
    print(f"done in {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"classifier_ground_truth": acc, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
