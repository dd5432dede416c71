"""`python -m sd_cli.eval_demo`: the flags of the demo model's accuracy table (sd_cli.run.eval_demo)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd_cli.errors import UsageError
from sd_cli.run.eval_demo import EvalOptions, evaluate
from sd_cli.run.settings import fast_preset_text


def build_parser() -> argparse.ArgumentParser:
    d = EvalOptions()
    p = argparse.ArgumentParser(prog="python -m sd_cli.eval_demo",
                                description="Measure the demo model: accuracy on held-out prompts per sampler, "
                                            "step count and guidance scale.")
    p.add_argument("--ckpt", type=Path, default=d.ckpt)
    p.add_argument("--config", type=Path, default=d.config)
    p.add_argument("--samplers", default=d.samplers)
    p.add_argument("--steps", default=d.steps, help="comma-separated step counts (default: %(default)s)")
    p.add_argument("--scales", default=d.scales, help="comma-separated guidance scales (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=d.seeds,
                   help="images per held-out prompt (seeds 0..N-1) (default: %(default)s)")
    p.add_argument("--train-prompts", action="store_true",
                   help="also score prompts of training scenes (canonical phrasing)")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--save", type=Path, help="write a PNG grid of every setting into this folder")
    p.add_argument("--json", type=Path, help="write the results as JSON to this file")
    g = p.add_argument_group("faster sampling (as sd-txt2img's flags, for every row)")
    g.add_argument("--fast", action="store_true", help=f"the preset ({fast_preset_text()}); the options below win")
    g.add_argument("--deepcache", type=int, default=None, metavar="N", help="a full UNet call every N calls")
    g.add_argument("--deepcache-branch", type=int, default=None, metavar="B", help="DeepCache's skip branch")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guidance only while LO <= sigma <= HI (rows at scale 1 have none)")
    g.add_argument("--tome", type=float, default=None, metavar="RATIO", help="token merging ratio")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    if args["cfg_interval"] is not None:
        args["cfg_interval"] = tuple(args["cfg_interval"])
    try:
        return evaluate(EvalOptions(**args))
    except UsageError as err:
        print(f"eval_demo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
