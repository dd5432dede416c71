#!/usr/bin/env python
"""What a LoRA costs at load time: the full-size SD v1 checkpoint alone vs with a ~144 MB kohya LoRA.

A script, not a test. In a temporary folder it writes
  * a random full-size SD v1.x checkpoint, fp16 .safetensors (~2.1 GB, the layout of
    v1-5-pruned-emaonly), streamed tensor by tensor, and
  * a kohya LoRA, fp16, rank 128, alpha 64 (`lora_unet_<diffusers path>` over every attention
    to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out; `lora_te_<clip path>` over
    q/k/v/out_proj, fc1, fc2 of the 12 CLIP layers): 75.5 M parameters, ~151 MB (144 MiB),
then, each in a FRESH child process, interleaved, --repeats times per dtype:
  ckpt       StableDiffusion.load(ckpt, dtype=...)                          (the checkpoint alone)
  ckpt+lora  StableDiffusion.load(ckpt, dtype=..., loras=[(lora, 1.0)])     (read, check, hash and
             merge the LoRA: load merges it, from the checkpoint's own tensors)
and in the ckpt+lora child afterwards, switching in the loaded model: off (set_loras([]) + the merge
step the next image does, which restores the layers from the checkpoint's tensors), on again (the
merge alone, the file already read), a weight change (1.0 -> 0.5), and the API call `set_loras` alone.

Peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss of the child, i.e. that load's own high-water
mark (imports included: ~0.4 GiB for torch + sd_cli). Before the measured runs, one unrecorded child
fills the checkpoint-hash cache (a private XDG_CACHE_HOME); a cold first start additionally hashes the
checkpoint (sha256 of 2 GB). The page cache does not stay warm: loading releases the file's pages
(MADV_PAGEOUT) as it goes, so every child reads most of the checkpoint from disk again.

    python bench/lora_load.py                       # bf16 and fp32, 3 repetitions: ~20 min on 2 cores
    python bench/lora_load.py --dtype bf16 --repeats 2 --keep /tmp/lora_bench
Writes bench/results/lora_load.md (the table, the machine) unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs/stable-diffusion/v1-inference-cpu.yaml"
MARK = "LORA_BENCH "
UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
               "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _bench_module():
    """bench/bench.py (random_tensor, machine): loaded by path, it is a script, not a package."""
    spec = importlib.util.spec_from_file_location("sd_bench", REPO / "bench" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def model_config():
    from sd_cli.weights.config import load_config

    return load_config(CONFIG).model


# --- the files -----------------------------------------------------------------------------------


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random full-size SD v1 weights as fp16 safetensors (bench.py's random_checkpoint and scales:
    N(0, 1/fan_in) matrices, 1 + N(0, 0.02^2) norm scales, N(0, 0.02^2) biases)."""
    return _bench_module().random_checkpoint(path, seed, half=True)


def lora_targets() -> dict[str, tuple[int, ...]]:
    """{kohya module name: weight shape} of the usual targets, the names in kohya's diffusers spelling."""
    from sd_cli.weights.lora import model_layout
    from sd_cli.weights.lora_keys import TEXT, UNET

    layout = model_layout(model_config())
    out = {}
    for name, module in layout.table.items():
        shape = layout.shapes.get(module + ".weight")
        if name.startswith("lora_unet_") and name.startswith(("lora_unet_down_blocks", "lora_unet_mid_block",
                                                               "lora_unet_up_blocks")):
            if module[len(UNET):].endswith(UNET_LAYERS):
                out[name] = shape
        elif name.startswith("lora_te_") and module[len(TEXT):].endswith(TEXT_LAYERS):
            out[name] = shape
    return out


def write_lora(path: Path, rank: int, alpha: float, seed: int = 1) -> dict:
    """A kohya LoRA (fp16 lora_down / lora_up / alpha) over `lora_targets()`; changes ~0.1 x a weight."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors, params = {}, 0
    targets = lora_targets()
    for name, shape in sorted(targets.items()):
        out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
        tensors[name + ".lora_down.weight"] = (torch.randn((rank, inp, *kernel), generator=g) / math.sqrt(inp)).half()
        tensors[name + ".lora_up.weight"] = (torch.randn((out, rank, *kernel), generator=g) * 0.1 / rank).half()
        tensors[name + ".alpha"] = torch.tensor(float(alpha)).half()
        params += rank * (out + inp)
    save_file(tensors, str(path))
    return {"modules": len(targets), "unet_modules": sum(k.startswith("lora_unet_") for k in targets),
            "params": params, "bytes": path.stat().st_size}


# --- the child -----------------------------------------------------------------------------------


def rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def merge(sd) -> None:
    """The merge the next image does (StableDiffusion.render: Pipeline.set_loras of the API's set)."""
    if hasattr(sd, "lora_uses"):
        uses = sd.lora_uses(sd.default_loras)
    else:  # before load(loras=) merged at load (commit 5e6c475)
        from sd_cli.weights.merge import LoraUse

        uses = [LoraUse(r.file, r.request.te, r.request.unet) for r in sd.loras.resolve(list(sd.default_loras))]
    sd.pipeline().set_loras(uses)


def child(case: dict) -> dict:
    import torch

    from sd_cli.run.api import StableDiffusion

    lora = case.get("lora")
    t0 = time.perf_counter()
    sd = StableDiffusion.load(case["ckpt"], config=str(CONFIG), device="cpu", dtype=case["dtype"],
                              loras=[(lora, 1.0)] if lora else ())
    out = {"load_s": time.perf_counter() - t0, "rss_after_load_gib": rss_gib(), "peak_rss_gib": peak_rss_gib(),
           "threads": torch.get_num_threads()}
    if lora:
        t = time.perf_counter()
        merge(sd)  # already merged by load: must change nothing
        out["merge_after_load_s"] = time.perf_counter() - t
        probe = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
        merged = sd.pipeline().model.get_parameter(probe).detach().clone()
        offs, ons = [], []
        for _ in range(case["switches"]):
            t = time.perf_counter()
            sd.set_loras([])
            merge(sd)
            offs.append(time.perf_counter() - t)
            assert not torch.equal(sd.pipeline().model.get_parameter(probe), merged), "the LoRA did not come off"
            t = time.perf_counter()
            sd.set_loras([(lora, 1.0)])
            merge(sd)
            ons.append(time.perf_counter() - t)
        assert torch.equal(sd.pipeline().model.get_parameter(probe), merged), "switching changed the merge"
        t = time.perf_counter()
        sd.set_loras([(lora, 0.5)])
        merge(sd)
        out["reweight_s"] = time.perf_counter() - t
        t = time.perf_counter()
        sd.set_loras([(lora, 1.0)])
        out["api_set_loras_s"] = time.perf_counter() - t
        out.update(off_s=offs, on_s=ons, peak_rss_end_gib=peak_rss_gib(), rss_end_gib=rss_gib())
    return out


def run_child(case: dict, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(case)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return {**case, **json.loads(line[len(MARK):]), "wall_s": wall}
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise SystemExit(f"child {case} failed (exit {proc.returncode}):\n{tail}")


# --- the report ----------------------------------------------------------------------------------


def span(values: list[float], unit: str = "s", digits: int = 2) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def tables(results: list[dict], dtypes: list[str]) -> str:
    lines = ["| dtype | case | load (StableDiffusion.load) | peak RSS | RSS after load |", "|---|---|---|---|---|"]
    for dt in dtypes:
        for case in ("ckpt", "ckpt+lora"):
            rows = [r for r in results if r["dtype"] == dt and r["case"] == case]
            lines.append(f"| {dt} | {case} | {span([r['load_s'] for r in rows])} | "
                         f"{span([r['peak_rss_gib'] for r in rows], 'GiB')} | "
                         f"{span([r['rss_after_load_gib'] for r in rows], 'GiB')} |")
    lines += ["", "| dtype | LoRA off (restore) | LoRA on (merge) | weight 1.0 -> 0.5 | API set_loras alone "
              "| peak RSS after switching |", "|---|---|---|---|---|---|"]
    for dt in dtypes:
        rows = [r for r in results if r["dtype"] == dt and r["case"] == "ckpt+lora"]
        offs = [v for r in rows for v in r["off_s"]]
        ons = [v for r in rows for v in r["on_s"]]
        lines.append(f"| {dt} | {span(offs)} | {span(ons)} | {span([r['reweight_s'] for r in rows])} | "
                     f"{span([r['api_set_loras_s'] * 1000 for r in rows], 'ms', 1)} | "
                     f"{span([r['peak_rss_end_gib'] for r in rows], 'GiB')} |")
    return "\n".join(lines)


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16,fp32", help="comma list of fp32, bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--switches", type=int, default=2, help="off/on switches per ckpt+lora child")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--keep", type=Path, help="work folder to keep (and reuse) instead of a temporary one")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lora_load.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    work = args.keep or Path(tempfile.mkdtemp(prefix="lora_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    try:
        ckpt, lora = work / "random-sd1-fp16.safetensors", work / f"kohya-r{args.rank}.safetensors"
        t = time.perf_counter()
        if not ckpt.exists():
            write_checkpoint(ckpt)
        ckpt_bytes = ckpt.stat().st_size
        info = write_lora(lora, args.rank, alpha=args.rank / 2)
        print(f"[lora_load] files in {work} ({time.perf_counter() - t:.0f} s): checkpoint {ckpt_bytes / 1e9:.2f} "
              f"GB; LoRA {info['bytes'] / 1e6:.1f} MB ({info['bytes'] / 2**20:.1f} MiB), rank {args.rank}, "
              f"{info['modules']} modules ({info['unet_modules']} UNet), {info['params'] / 1e6:.1f} M parameters",
              file=sys.stderr, flush=True)
        # warm-up, not recorded: the checkpoint hash cache (and the page cache, which loading empties again:
        # it releases the file's pages with MADV_PAGEOUT as it goes)
        run_child({"case": "warmup", "dtype": dtypes[0], "ckpt": str(ckpt), "lora": str(lora), "switches": 0}, env)
        load_before = os.getloadavg()[0]
        results = []
        for rep in range(args.repeats):
            for dt in dtypes:
                for case in ("ckpt", "ckpt+lora"):
                    spec = {"case": case, "dtype": dt, "ckpt": str(ckpt), "switches": args.switches,
                            **({"lora": str(lora)} if case == "ckpt+lora" else {})}
                    r = run_child(spec, env)
                    print(f"[lora_load] rep {rep + 1} {dt} {case}: load {r['load_s']:.2f} s, peak RSS "
                          f"{r['peak_rss_gib']:.2f} GiB" + (f"; off {r['off_s']}, on {r['on_s']}" if "on_s" in r else ""),
                          file=sys.stderr, flush=True)
                    results.append(r)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    load_after = os.getloadavg()[0]
    m = _bench_module().machine()
    cpu = (f"{m['cpu']} (family/model {m['cpu_family_model']}), {m['logical_cpus']} logical CPUs, "
           f"avx512_bf16={m['avx512_bf16']}, amx_bf16={m['amx_bf16']}, {m['mem_gib']} GiB RAM; "
           f"torch {m['torch']}, {results[0]['threads']} threads; load average {load_before:.1f} at the start, "
           f"{load_after:.1f} at the end")
    text = tables(results, dtypes)
    print(f"machine: {cpu}\n\n{text}")
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# LoRA load cost (`bench/lora_load.py`)\n\n"
            f"`python bench/lora_load.py --dtype {','.join(dtypes)} --repeats {args.repeats}`, "
            f"{_dt.date.today().isoformat()}, code at {commit()}.\n\nMachine: {cpu}.\n\n"
            f"Files: random full-size SD v1 checkpoint, fp16 safetensors, {ckpt_bytes / 1e9:.2f} GB; kohya LoRA, "
            f"fp16, rank {args.rank}, alpha {args.rank / 2:g}, {info['modules']} modules ({info['unet_modules']} "
            f"UNet attention/ff/proj, {info['modules'] - info['unet_modules']} text encoder), "
            f"{info['params'] / 1e6:.1f} M parameters, {info['bytes'] / 1e6:.1f} MB "
            f"({info['bytes'] / 2**20:.1f} MiB).\n\n"
            f"Each row: {args.repeats} fresh child processes, interleaved with the other rows; median (min-max). "
            f"`load`: StableDiffusion.load, with `loras=` including reading, checking, hashing and merging the "
            f"LoRA. Hash cache warm; the checkpoint mostly read from disk (loading pages it out as it goes). "
            f"Peak RSS: the child's ru_maxrss (includes ~0.4 GiB of imports). Switching: in the loaded ckpt+lora "
            f"model, {args.switches} off/on pairs per child (off = set_loras([]) + the next image's merge step, "
            f"restoring the layers from the checkpoint file; on = the merge, the LoRA file already read).\n\n"
            f"{text}\n\nRaw (JSON, one object per child):\n\n```\n"
            + "\n".join(json.dumps({k: v for k, v in r.items() if k not in ("ckpt", "lora")}) for r in results)
            + "\n```\n")
        print(f"[lora_load] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
