"""Measure the demo model (`python -m sd_cli.eval_demo --help`; the flags are in sd_cli/cli/eval_demo.py).

1. Validates the classifier (sd_cli.demo_data.classify) on ground-truth renders of every scene at random
   layouts: it must read shape, color and background back correctly (~100%) before it judges the model.
2. Renders the held-out prompts (scenes never shown whole in training, "a {color} {shape} on a {bg}
   background") with each sampler, step count and guidance scale, several seeds each, and reports the
   share of images whose shape, color and background all match the prompt (and each part alone).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sd_cli.demo import DEMO_CKPT, DEMO_CONFIG
from sd_cli.demo import scenes as D
from sd_cli.run.api import StableDiffusion
from sd_cli.run.settings import FASTER_KEYS, Generation, Runtime, faster_options
from sd_cli.run.work import WorkPlan



def validate_classifier(n_per_scene: int = 10, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    ok = total = 0
    for scene in D.all_scenes():
        for _ in range(n_per_scene):
            ok += D.classify(D.render(scene, *D.random_layout(rng))).matches(scene)
            total += 1
    return ok / total


def load_demo(ckpt: Path = DEMO_CKPT, config: Path = DEMO_CONFIG, threads: int = 1) -> StableDiffusion:
    """The demo model on the CPU in float32, as every accuracy figure in the README was measured."""
    return StableDiffusion(Runtime(Path(ckpt), str(config), True, "cpu", "fp32", None, threads))


def generate(sd: StableDiffusion, prompts: list[str], sampler: str, steps: int, scale: float, seed: int,
             faster: dict | None = None) -> np.ndarray:
    """One batch of all `prompts` from `seed`, through the CLI's render path; `faster`: Generation's
    faster-sampling keywords (deepcache, deepcache_branch, cfg_interval, tome; none: off)."""
    gen = Generation.create(prompts, demo=True, from_file=True, n_samples=len(prompts), sampler=sampler,
                            steps=steps, scale=scale, eta=None, seed=seed, watermark=False,
                            seed_rule="batch",  # the rule the README's accuracy figures were measured with
                            **(faster or {}))
    return np.stack(sd.render(gen, WorkPlan(gen, {})[0]))


def score(images: np.ndarray, scenes: list[D.Scene]) -> dict[str, float]:
    reads = [D.classify(img) for img in images]
    return {
        "all": float(np.mean([r.matches(s) for r, s in zip(reads, scenes)])),
        "shape": float(np.mean([r.shape == s.shape for r, s in zip(reads, scenes)])),
        "color": float(np.mean([r.color == s.color for r, s in zip(reads, scenes)])),
        "bg": float(np.mean([r.bg == s.bg for r, s in zip(reads, scenes)])),
    }


@dataclass(frozen=True)
class EvalOptions:
    """What `python -m sd_cli.eval_demo` measures (its flags, parsed by sd_cli.cli.eval_demo)."""

    ckpt: Path = DEMO_CKPT
    config: Path = DEMO_CONFIG
    samplers: str = "ddim,plms,dpmpp_2m,euler_a"
    steps: str = "10,25,50"
    scales: str = "1.0,7.5"
    seeds: int = 4
    train_prompts: bool = False
    threads: int = 1
    save: Path | None = None
    json: Path | None = None
    deepcache: int | None = None  # faster sampling, as sd-txt2img's flags (None: not given; --fast's preset)
    deepcache_branch: int | None = None
    cfg_interval: tuple[float, float] | None = None
    tome: float | None = None
    fast: bool = False

    def faster(self, scale: float) -> dict:
        """The faster-sampling keywords of a row at guidance `scale` (no guidance: no interval)."""
        given = {k: getattr(self, k) for k in FASTER_KEYS}
        out = faster_options(given, self.fast, scale)
        if scale == 1.0:
            out.pop("cfg_interval", None)
        return out


def faster_label(faster: dict) -> str:
    """"deepcache 3 (branch 0), cfg-interval 1-inf, tome 0.5", or "off"."""
    parts = []
    if faster.get("deepcache", 1) > 1:
        parts.append(f"deepcache {faster['deepcache']} (branch {faster.get('deepcache_branch', 0)})")
    if faster.get("cfg_interval"):
        parts.append("cfg-interval {:g}-{:g}".format(*faster["cfg_interval"]))
    if faster.get("tome"):
        parts.append(f"tome {faster['tome']:g}")
    return ", ".join(parts) or "off"


def _prompt_sets(train_prompts: bool) -> dict[str, list]:
    sets = {"held-out": list(D.held_out())}
    if train_prompts:
        rng = np.random.default_rng(0)
        train = D.train_scenes()
        sets["train"] = [train[i] for i in rng.choice(len(train), size=16, replace=False)]
    return sets


def _save_grid(folder: Path, name: str, imgs: np.ndarray, per_row: int, rows: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = [np.concatenate(list(imgs[i * per_row : (i + 1) * per_row]), 1) for i in range(rows)]
    Image.fromarray(np.concatenate(lines, 0)).save(folder / f"{name}.png")


def evaluate(opts: EvalOptions) -> int:
    """Print the accuracy table (and write --json/--save) for every sampler, step count and scale."""
    t0 = time.time()
    acc = validate_classifier()
    print(f"classifier on ground-truth renders ({len(D.all_scenes())} scenes x 10 layouts): {acc:.1%}", flush=True)
    sd = load_demo(opts.ckpt, opts.config, opts.threads)
    results = []
    print("\n| prompts | sampler | steps | scale | faster | all correct | shape | color | background | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    grid = [(sampler, int(steps), float(scale)) for sampler in opts.samplers.split(",")
            for steps in opts.steps.split(",") for scale in opts.scales.split(",")]
    for set_name, scenes in _prompt_sets(opts.train_prompts).items():
        prompts = [s.prompt() for s in scenes]
        for sampler, steps, scale in grid:
            faster = opts.faster(scale)
            t1 = time.time()
            imgs = np.concatenate([generate(sd, prompts, sampler, steps, scale, seed, faster)
                                   for seed in range(opts.seeds)])
            per = (time.time() - t1) / len(imgs)
            sc = score(imgs, scenes * opts.seeds)
            results.append({"prompts": set_name, "sampler": sampler, "steps": steps, "scale": scale,
                            "faster": {k: list(v) if isinstance(v, tuple) else v for k, v in faster.items()},
                            **sc, "seconds_per_image": per})
            print(f"| {set_name} | {sampler} | {steps} | {scale:g} | {faster_label(faster)} | {sc['all']:.0%} | "
                  f"{sc['shape']:.0%} | {sc['color']:.0%} | {sc['bg']:.0%} | {per:.2f} |", flush=True)
            if opts.save:
                _save_grid(opts.save, f"{set_name}-{sampler}-{steps}-{scale:g}", imgs, len(prompts), opts.seeds)
    print(f"\nheld-out prompts: {', '.join(s.prompt() for s in D.held_out())}")
    print(f"done in {time.time() - t0:.0f} s")
    if opts.json:
        opts.json.write_text(json.dumps({"classifier_ground_truth": acc, "results": results}, indent=1))
    return 0
