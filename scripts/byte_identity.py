"""Byte-identity check for refactors: run a fixed set of sd_cli commands against one source tree and record
what they produce, then compare two such records.

    python scripts/byte_identity.py --src /tmp/sd_old --out /tmp/old.json    # e.g. a git worktree of HEAD
    python scripts/byte_identity.py --src .            --out /tmp/new.json
    python scripts/byte_identity.py --compare /tmp/old.json /tmp/new.json    # exit 1 if anything differs

Every command is `python -m sd_cli ... --threads 1` with PYTHONPATH=<src> (which comes before the editable
install on sys.path; checked before the cases run), OMP_NUM_THREADS=1, CUDA_VISIBLE_DEVICES="" (CPU
only), a private XDG_CACHE_HOME (checkpoint hash cache) and a fresh folder per case as cwd, so the
built-in demo model is the default. All paths given to the CLI are relative to that folder, as PNG
metadata can hold them (--replay writes `replay_of`). For every case the record holds each command's exit
code, its --json stdout without the timing fields ("seconds", "seconds_per_step") and with the temp
folder replaced by <CASE>, and the sha256 of every PNG left in the folder. Case "checkpoint" makes its
own micro SD v1 checkpoint (real key layout, seeded random weights) with torch + safetensors only, so it
does not depend on the code under test. Compare runs made on the same machine: with --dtype auto the
compute dtype depends on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red circle on a blue background", "a yellow square on green", "blue triangle, white background",
           "a white cross on a red background", "a green circle on yellow"]
BATCH = ["--from-file", "prompts.txt", "--n_samples", "2", "--n_iter", "2", "--json"]
TIMING = ("seconds", "seconds_per_step")
MICRO_YAML = """\
model:
  family: sd1
  scale_factor: 0.18215
  schedule: {linear_start: 0.00085, linear_end: 0.012, timesteps: 1000}
  unet: {in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1], num_res_blocks: 2,
         channel_mult: [1, 1], num_heads: 2, transformer_depth: 1, context_dim: 32}
  vae: {embed_dim: 4, z_channels: 4, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 1, 1, 1], num_res_blocks: 1,
        attn_resolutions: [], resolution: 256}
  text_encoder: {vocab_size: 49408, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
                 num_attention_heads: 2, max_position_embeddings: 77, hidden_act: quick_gelu}
runtime: {device: cpu, precision: full}
"""


# --------------------------------------------------------------------------------------------------
# The micro checkpoint: shapes of MICRO_YAML's model in the SD v1 key layout (no schedule buffers, no
# position_ids: the loader derives those), seeded random values
# --------------------------------------------------------------------------------------------------

def _unet_shapes(add, conv, lin, norm) -> None:
    p = "model.diffusion_model."

    def res(n: str, cin: int) -> None:
        norm(n + ".in_layers.0", cin), conv(n + ".in_layers.2", 32, cin, 3), lin(n + ".emb_layers.1", 32, 128)
        norm(n + ".out_layers.0", 32), conv(n + ".out_layers.3", 32, 32, 3)
        if cin != 32:
            conv(n + ".skip_connection", 32, cin, 1)

    def attn(n: str) -> None:
        norm(n + ".norm", 32), conv(n + ".proj_in", 32, 32, 1), conv(n + ".proj_out", 32, 32, 1)
        t = n + ".transformer_blocks.0."
        for a in ("attn1", "attn2"):
            for x in "qkv":
                lin(f"{t}{a}.to_{x}", 32, 32, bias=False)
            lin(f"{t}{a}.to_out.0", 32, 32)
        lin(t + "ff.net.0.proj", 256, 32), lin(t + "ff.net.2", 32, 128)
        for i in (1, 2, 3):
            norm(f"{t}norm{i}", 32)

    lin(p + "time_embed.0", 128, 32), lin(p + "time_embed.2", 128, 128), conv(p + "input_blocks.0.0", 32, 4, 3)
    for b in (1, 2):
        res(f"{p}input_blocks.{b}.0", 32), attn(f"{p}input_blocks.{b}.1")
    conv(p + "input_blocks.3.0.op", 32, 32, 3)
    for b in (4, 5):
        res(f"{p}input_blocks.{b}.0", 32)
    res(p + "middle_block.0", 32), attn(p + "middle_block.1"), res(p + "middle_block.2", 32)
    for b in range(6):
        res(f"{p}output_blocks.{b}.0", 64)
        if b >= 3:
            attn(f"{p}output_blocks.{b}.1")
    conv(p + "output_blocks.2.1.conv", 32, 32, 3), norm(p + "out.0", 32), conv(p + "out.2", 4, 32, 3)


def _vae_clip_shapes(add, conv, lin, norm) -> None:
    def block(n: str) -> None:
        norm(n + ".norm1", 32), conv(n + ".conv1", 32, 32, 3), norm(n + ".norm2", 32), conv(n + ".conv2", 32, 32, 3)

    def mid(n: str) -> None:
        block(n + ".mid.block_1"), norm(n + ".mid.attn_1.norm", 32), block(n + ".mid.block_2")
        for x in ("q", "k", "v", "proj_out"):
            conv(f"{n}.mid.attn_1.{x}", 32, 32, 1)

    enc, dec = "first_stage_model.encoder", "first_stage_model.decoder"
    conv(enc + ".conv_in", 32, 3, 3), mid(enc), norm(enc + ".norm_out", 32), conv(enc + ".conv_out", 8, 32, 3)
    conv(dec + ".conv_in", 32, 4, 3), mid(dec), norm(dec + ".norm_out", 32), conv(dec + ".conv_out", 3, 32, 3)
    for i in range(4):
        block(f"{enc}.down.{i}.block.0"), block(f"{dec}.up.{i}.block.0"), block(f"{dec}.up.{i}.block.1")
        if i < 3:
            conv(f"{enc}.down.{i}.downsample.conv", 32, 32, 3)
        if i > 0:
            conv(f"{dec}.up.{i}.upsample.conv", 32, 32, 3)
    conv("first_stage_model.quant_conv", 8, 8, 1), conv("first_stage_model.post_quant_conv", 4, 4, 1)
    c = "cond_stage_model.transformer.text_model."
    add(c + "embeddings.token_embedding.weight", 49408, 32), add(c + "embeddings.position_embedding.weight", 77, 32)
    layer = c + "encoder.layers.0."
    for x in ("q", "k", "v", "out"):
        lin(f"{layer}self_attn.{x}_proj", 32, 32)
    norm(layer + "layer_norm1", 32), lin(layer + "mlp.fc1", 64, 32), lin(layer + "mlp.fc2", 32, 64)
    norm(layer + "layer_norm2", 32), norm(c + "final_layer_norm", 32)


def write_micro_checkpoint(folder: Path, seed: int = 0) -> None:
    """micro.safetensors + micro.yaml in `folder`; the same bytes every time (sorted keys, seeded values:
    norm scales 1 + 0.1 N, biases 0.05 N, other weights N / sqrt(fan_in))."""
    import torch
    from safetensors.torch import save_file

    shapes: dict[str, tuple[int, ...]] = {}

    def add(name: str, *shape: int) -> None:
        shapes[name] = shape

    def conv(n: str, o: int, i: int, k: int) -> None:
        add(n + ".weight", o, i, k, k), add(n + ".bias", o)

    def lin(n: str, o: int, i: int, bias: bool = True) -> None:
        add(n + ".weight", o, i)
        if bias:
            add(n + ".bias", o)

    def norm(n: str, c: int) -> None:
        add(n + ".weight", c), add(n + ".bias", c)

    _unet_shapes(add, conv, lin, norm)
    _vae_clip_shapes(add, conv, lin, norm)
    gen, sd = torch.Generator().manual_seed(seed), {}
    for key in sorted(shapes):
        shape, noise = shapes[key], torch.randn(shapes[key], generator=gen)
        if key.endswith(".bias"):
            sd[key] = 0.05 * noise
        elif len(shape) == 1:
            sd[key] = 1.0 + 0.1 * noise
        else:
            sd[key] = noise / float(torch.tensor(shape[1:]).prod()) ** 0.5
    save_file(sd, str(folder / "micro.safetensors"))
    (folder / "micro.yaml").write_text(MICRO_YAML)


# --------------------------------------------------------------------------------------------------
# Running the cases
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """Runs sd_cli commands of one source tree, each case in its own folder under `base`."""

    def __init__(self, src: Path, base: Path):
        self.src, self.base = src, base
        skip = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        self.env = {k: v for k, v in os.environ.items() if k not in skip}
        self.env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

    def folder(self, case: str) -> Path:
        d = self.base / case
        d.mkdir()
        (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        return d

    def run(self, cwd: Path, args: list[str], launcher: list[str] | None = None, one_cpu: bool = False) -> dict:
        """One command in `cwd`: {'argv', 'rc', 'json'}. `one_cpu` pins it (and its children) to one CPU."""
        argv = [*(launcher or []), "-m", "sd_cli", *args, "--threads", "1"]
        pin = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_cpu else None
        proc = subprocess.run([sys.executable, *argv], cwd=cwd, env={**self.env, "XDG_CACHE_HOME": str(cwd / "cache")},
                              capture_output=True, text=True, timeout=600, preexec_fn=pin)
        if proc.returncode != 0:
            print(f"  rc {proc.returncode}: {' '.join(argv)}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"argv": argv, "rc": proc.returncode, "json": self.clean(proc.stdout, cwd)}

    def clean(self, stdout: str, cwd: Path):
        """The JSON object(s) on stdout without timing fields, temp folders and the source path."""
        text = stdout.replace(str(cwd), "<CASE>").replace(str(self.base), "<TMP>").replace(str(self.src), "<SRC>")

        def strip(x):
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if k not in TIMING}
            return [strip(v) for v in x] if isinstance(x, list) else x

        try:
            return [strip(json.loads(line)) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return {"not_json": text}

    def check_import(self) -> str:
        out = subprocess.run([sys.executable, "-c", "import sd_cli; print(sd_cli.__file__)"], cwd=self.base,
                             env=self.env, capture_output=True, text=True, check=True).stdout.strip()
        if not Path(out).resolve().is_relative_to(self.src):
            sys.exit(f"PYTHONPATH={self.src} imports sd_cli from {out}, not from the source tree")
        return out


def png_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def run_cases(r: Runner) -> dict[str, dict]:
    """Every case: {'steps': [command records], 'files': {png: sha256}}."""
    cases, folders = {}, {}

    def case(name: str, *steps: dict) -> None:
        cases[name] = {"steps": list(steps), "files": png_hashes(folders[name])}

    def new(name: str) -> Path:
        folders[name] = r.folder(name)
        return folders[name]

    d = new("a_demo_default")
    case("a_demo_default", r.run(d, ["--n_iter", "2", "--n_samples", "2", "--json"]))
    d = new("b_from_file")
    case("b_from_file", r.run(d, BATCH))
    d = new("c_resume")
    first = r.run(d, BATCH)
    for name in ("samples/00001.png", "samples/00006.png", "grid-0000.png"):
        (d / "outputs/txt2img-samples" / name).unlink(missing_ok=True)  # gone if the run failed
    case("c_resume", first, r.run(d, [*BATCH, "--resume"]))
    d = new("d_plms")
    case("d_plms", r.run(d, ["--plms", "--steps", "10", "--seed", "7", "--negative-prompt", "red",
                             "--n_samples", "1", "--n_iter", "2", "--json"]))
    d = new("d_euler_a")
    case("d_euler_a", r.run(d, ["--sampler", "euler_a", "--steps", "8", "--ddim_eta", "1", "--fixed_code",
                                "--n_samples", "2", "--n_iter", "1", "--json"]))
    d = new("e_torchrun")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    step = r.run(d, ["--from-file", "prompts.txt", "--n_samples", "2", "--n_iter", "1", "--json"], launcher, True)
    step["argv"][launcher.index("--master_port") + 1] = "<PORT>"
    case("e_torchrun", step)
    d = new("f_replay")
    source = folders["a_demo_default"] / "outputs/txt2img-samples/samples/00000.png"
    if source.exists():  # else case a failed, and so does this one
        shutil.copy(source, d / "a_00000.png")
    case("f_replay", r.run(d, ["--replay", "a_00000.png", "--outdir", "replayed", "--json"]))
    d = new("g_checkpoint")
    write_micro_checkpoint(d)
    case("g_checkpoint", r.run(d, ["--ckpt", "micro.safetensors", "--config", "micro.yaml", "--H", "64", "--W", "64",
                                   "--n_samples", "2", "--n_iter", "1", "--json"]))
    return cases


def record(src: Path, out: Path) -> None:
    import torch

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="byte_identity_") as tmp:
        runner = Runner(src, Path(tmp).resolve())
        imported = runner.check_import()
        cases = run_cases(runner)
    meta = {"src": str(src), "imported": imported, "python": sys.version.split()[0], "torch": torch.__version__,
            "seconds": round(time.monotonic() - start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "cases": cases}, indent=1, sort_keys=True) + "\n")
    bad = [name for name, c in cases.items() if any(s["rc"] != 0 for s in c["steps"])]
    print(f"{len(cases)} cases in {meta['seconds']} s -> {out}" + (f"; non-zero exit in {bad}" if bad else ""))


# --------------------------------------------------------------------------------------------------
# Comparing two records
# --------------------------------------------------------------------------------------------------

def diff_case(a: dict | None, b: dict | None) -> list[str]:
    """What differs between one case's two records (empty: the same)."""
    if a is None or b is None:
        return ["only in one record"]
    why = []
    if len(a["steps"]) != len(b["steps"]):
        why.append(f"{len(a['steps'])} vs {len(b['steps'])} commands")
    for i, (x, y) in enumerate(zip(a["steps"], b["steps"])):
        if x["rc"] != y["rc"]:
            why.append(f"command {i}: exit code {x['rc']} vs {y['rc']}")
        if x["json"] != y["json"]:
            why.append(f"command {i}: JSON output differs")
    fa, fb = a["files"], b["files"]
    why += [f"{f}: {'only in first' if f not in fb else 'only in second' if f not in fa else 'bytes differ'}"
            for f in sorted(fa.keys() | fb.keys()) if fa.get(f) != fb.get(f)]
    return why


def compare(first: Path, second: Path) -> int:
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    if a["meta"]["torch"] != b["meta"]["torch"]:
        print(f"note: torch {a['meta']['torch']} vs {b['meta']['torch']}")
    failed = 0
    for name in sorted(a["cases"].keys() | b["cases"].keys()):
        why = diff_case(a["cases"].get(name), b["cases"].get(name))
        n_files = len((a["cases"].get(name) or b["cases"][name])["files"])
        print(f"{name}: {'DIFFERENT' if why else 'same'} ({n_files} PNGs)")
        for line in why:
            print(f"    {line}")
        failed += bool(why)
    print("all cases identical" if not failed else f"{failed} case(s) differ")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, help="source tree whose sd_cli package to run")
    ap.add_argument("--out", type=Path, help="where to write the record (JSON)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("FIRST", "SECOND"), help="compare two records")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not (args.src and args.out):
        ap.error("give --src and --out, or --compare FIRST SECOND")
    record(args.src.resolve(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
