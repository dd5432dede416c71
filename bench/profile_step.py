#!/usr/bin/env python
"""Where a guided bf16 UNet step spends its time on this CPU (issue 18, item 4): torch.profiler over a
few steps of the full-size random-weight UNet at 512 px (batch 2, as a guided call), with the table of
the operators that take the most self time, and this CPU's bf16 GEMM rate from a 4096^2 matmul.

    python bench/profile_step.py                       # bf16, 512 px, 3 profiled steps, 2 threads
    python bench/profile_step.py --res 256 --steps 2

A script, not a test; it prints and writes bench/results/profile_step_<res>_<dtype>.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (this folder's bench.py: the same model construction and machine record)


def gemm_gflops(torch, dtype, n: int = 4096, repeats: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(bench.timed(lambda: a @ b, torch.device("cpu")) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    case = {"threads": args.threads, "device": "cpu", "dtype": args.dtype, "channels_last": "auto"}
    torch, device, dtype = bench.setup(case)
    from torch.profiler import ProfilerActivity, profile

    cfg, unet = bench._ours_unet(case, torch, device, dtype)
    h = args.res // 8
    x = torch.randn(2, 4, h, h, dtype=dtype)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, 768, dtype=dtype)
    with torch.inference_mode():
        unet(x, t, ctx)  # warm-up
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                unet(x, t, ctx)
        wall = (time.perf_counter() - t0) / args.steps
    rate = gemm_gflops(torch, dtype)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    head = (f"machine: {bench.machine()}\nres {args.res}, {args.dtype}, batch 2 (a guided step), "
            f"{args.threads} threads: {wall:.2f} s per step (profiled, so a little slower than unprofiled)\n"
            f"bf16 4096^2 matmul: {gemm_gflops(torch, torch.bfloat16):.0f} GFLOP/s; in {args.dtype}: {rate:.0f}\n")
    text = head + table
    print(text)
    out = bench.RESULTS / f"profile_step_{args.res}_{args.dtype}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
