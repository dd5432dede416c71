"""`--replay IMAGE.png`: regenerate an image from the `sd_cli` metadata in it and compare the pixels.

1. Read the metadata (the PNG is untrusted input: every field is checked, one clear error otherwise).
   Generation flags (--prompt, --seed, --sampler, --H, ...) may not be given: they come from the image.
2. Check the model: the image's `model_hash` must equal the short hash of `--ckpt`; a mismatch is an error
   (exit 1) naming both hashes, unless `--force`, which replays anyway with a warning.
3. Regenerate the image's whole batch exactly as the run did: the same `n_samples` rows of start noise
   from `Generator("cpu").manual_seed(seed)`, `batch_size` rows kept, the same generator handed to the
   sampler. Every row uses the image's own prompt: rows of a batch are computed independently (the batch
   shape, not the other rows' prompts, decides the numerics), so row `batch_index` is the image.
4. Watermark it if the run did (metadata `watermark`; files from before that field try both).
5. Compare with the PNG's pixels: "identical" (exit 0), or the mean and max absolute difference over all
   channel values and the share of pixels that differ (exit 1). When the pixels are identical it also
   says whether the PNG file itself is byte-identical to what sd-txt2img writes for them.

The device comes from --device/--config as in a normal run. The dtype is the image's own (its `dtype`
field) unless --dtype or --precision is given, or this device cannot run it (a CUDA float16 image on a
CPU: then --dtype auto's choice); so an image replays in the dtype it was made in even where `--dtype
auto` now picks another (it did change: Intel CPUs with AVX512-BF16 but no AMX get float32 now, bf16
before). When device or dtype differ from the recorded ones the report says so (a CUDA float16 image
replayed on a CPU in float32 is close, not identical). On a CPU the run's thread count (`threads` in the
metadata) is used unless --threads is given, since CPU results depend on it in the last bit; the VAE
decode is tiled or not as recorded (`vae_decode`). Nothing is written unless --outdir is given
explicitly: then the regenerated image goes to OUTDIR/samples with the original metadata (device, dtype
and `replay_of` updated).
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd_cli.version import __version__
from sd_cli.demo import previous_demo_hint
from sd_cli.errors import CheckpointError, SdCliError, UsageError
from sd_cli.output.watermark import can_watermark

OLD_WATERMARK_MIN_PIXELS = 256 * 256  # the threshold before issue 13 (imwatermark's own limit)
from sd_cli.run.settings import MAX_BATCH, MAX_PIXELS, SEED_LIMIT



class ReplayError(SdCliError):
    """The image cannot be replayed (unreadable, no or bad metadata)."""


@dataclass(frozen=True)
class Recorded:
    """The fields of an image's `sd_cli` metadata that decide its pixels, checked."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    sampler: str
    scale: float
    eta: float
    width: int
    height: int
    batch_size: int
    batch_index: int
    n_samples: int
    model_hash: str
    model_name: str
    watermark: bool | None  # None: written before the field existed
    vae_tiling: str  # the --vae-tiling mode that decodes as the run did: off | on | tiles | auto
    threads: int | None  # CPU threads of the run (results depend on it in the last bit)
    device: str
    dtype: str


def _field(meta: dict, name: str, kinds: tuple[type, ...], path: Path, default=None):
    if name not in meta:
        if default is not None:
            return default
        raise ReplayError(f"{path}: its sd_cli metadata has no '{name}'; cannot replay it")
    value = meta[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ReplayError(f"{path}: its sd_cli metadata has a malformed '{name}' ({value!r:.60})")
    return value


def _recorded_tiling(meta: dict) -> str:
    """The --vae-tiling mode that decodes as the recorded run did ("auto" when nothing is recorded)."""
    method = meta.get("vae_decode")
    if method in ("whole", "bands", "tiles"):
        return {"whole": "off", "bands": "on", "tiles": "tiles"}[method]
    old = meta.get("vae_tiled")  # field of earlier versions: a bool
    return {True: "on", False: "off"}.get(old, "auto") if isinstance(old, bool) else "auto"


def parse_recorded(meta: dict, path: Path) -> Recorded:
    from sd_cli.sampling.samplers import SAMPLERS

    if meta.get("grid"):
        raise ReplayError(f"{path} is a grid; replay one of the single images in samples/ instead")
    num = (int, float)
    rec = Recorded(
        prompt=_field(meta, "prompt", (str,), path),
        negative_prompt=_field(meta, "negative_prompt", (str,), path, default=""),
        seed=_field(meta, "seed", (int,), path),
        steps=_field(meta, "steps", (int,), path),
        sampler=_field(meta, "sampler", (str,), path),
        scale=float(_field(meta, "scale", num, path)),
        eta=float(_field(meta, "eta", num, path, default=0.0)),
        width=_field(meta, "width", (int,), path),
        height=_field(meta, "height", (int,), path),
        batch_size=_field(meta, "batch_size", (int,), path, default=1),
        batch_index=_field(meta, "batch_index", (int,), path, default=0),
        n_samples=_field(meta, "n_samples", (int,), path, default=meta.get("batch_size", 1)),
        model_hash=_field(meta, "model_hash", (str,), path),
        model_name=_field(meta, "model_name", (str,), path, default="?"),
        watermark=meta.get("watermark") if isinstance(meta.get("watermark"), bool) else None,
        vae_tiling=_recorded_tiling(meta),
        threads=meta["threads"] if type(meta.get("threads")) is int and 1 <= meta["threads"] <= 1024 else None,
        device=str(meta.get("device", "?")),
        dtype=str(meta.get("dtype", "?")),
    )
    problems = []
    if rec.sampler not in SAMPLERS:
        problems.append(f"unknown sampler {rec.sampler!r:.40}")
    if not 0 <= rec.seed < SEED_LIMIT:
        problems.append(f"seed {rec.seed} out of range")
    if not 1 <= rec.steps <= 1000:
        problems.append(f"steps {rec.steps} out of range")
    if not math.isfinite(rec.scale) or not math.isfinite(rec.eta) or not 0 <= rec.eta <= 1:
        problems.append(f"scale {rec.scale} / eta {rec.eta} out of range")
    if rec.width < 8 or rec.height < 8 or rec.width % 8 or rec.height % 8 or rec.width * rec.height > MAX_PIXELS:
        problems.append(f"size {rec.width}x{rec.height} not a multiple of 8 up to 4096x4096")
    if not 1 <= rec.batch_size <= rec.n_samples <= MAX_BATCH or not 0 <= rec.batch_index < rec.batch_size:
        problems.append(f"batch position {rec.batch_index} of {rec.batch_size} (of {rec.n_samples}) "
                        f"out of range (at most {MAX_BATCH})")
    if "\0" in rec.prompt or "\0" in rec.negative_prompt:
        problems.append("a NUL in the prompt")
    if problems:
        raise ReplayError(f"{path}: its sd_cli metadata cannot be replayed: {'; '.join(problems)}")
    return rec


def read_image(path: Path) -> tuple[str | None, dict, np.ndarray]:
    """(A1111 text, sd_cli metadata, (H, W, 3) uint8 pixels) of the image to replay."""
    from PIL import Image, UnidentifiedImageError

    from sd_cli.output.png import read_png_metadata

    try:
        text, meta = read_png_metadata(path)
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ReplayError(f"--replay {path}: no such file") from None
    except IsADirectoryError:
        raise ReplayError(f"--replay {path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ReplayError(f"--replay {path}: not an image file") from None
    except ValueError as err:  # sd_cli chunk that is not a JSON object
        raise ReplayError(f"--replay {path}: {str(err).removeprefix(f'{path}: ')}") from None
    except Exception as err:  # truncated or damaged image data, permissions, ...
        reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise ReplayError(f"--replay {path}: cannot read the image ({reason})") from None
    if meta is None:
        raise ReplayError(f"--replay {path}: no sd_cli metadata in it (not written by sd-txt2img, or stripped "
                          "by an image editor); nothing to replay")
    return text, meta, pixels


def png_bytes(img: np.ndarray, parameters: str, metadata: dict) -> bytes:
    """The bytes sd-txt2img writes for these pixels and texts."""
    from sd_cli.output.png import write_png

    buf = io.BytesIO()
    write_png(buf, img, parameters, metadata)
    return buf.getvalue()


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "identical": not diff.any(),
        "mean_abs_diff": round(float(diff.mean()), 4),
        "max_abs_diff": int(diff.max()),
        "differing_pixels": round(float(diff.any(axis=-1).mean()), 6),
    }




@dataclass(frozen=True)
class ReplayRequest:
    """What `--replay` checks: the image, whether a model-hash mismatch is allowed, where to write the
    regenerated image (None: nowhere), and the VAE decode mode (None: as recorded)."""

    image: Path
    force: bool = False
    write_dir: Path | None = None
    vae_tiling: str | None = None
    json: bool = False
    quiet: bool = False
    init_img: Path | None = None  # sd-img2img --replay: the init image the image was made from
    mask: Path | None = None  # ... and its inpainting mask


def recorded_init(req: ReplayRequest, meta: dict, path: Path) -> dict:
    """Generation fields of an image-to-image image: its init image (given again with --init-img, checked
    by sha256 and fitted as recorded), strength and encoding; {} for a text-to-image one."""
    from sd_cli.output.init_image import load_init_image
    from sd_cli.run.settings import ENCODE_MODES

    made = meta.get("init_image")
    if made is None:
        if req.init_img is not None:
            raise ReplayError(f"{path} was made from text alone; drop --init-img")
        return {}
    strength, encode = meta.get("strength"), meta.get("encode")
    if not isinstance(made, dict) or type(strength) not in (int, float) or encode not in ENCODE_MODES:
        raise ReplayError(f"{path}: its sd_cli metadata has a malformed init_image, strength or encode")
    if req.init_img is None:
        raise ReplayError(f"{path} was made from the init image {made.get('file')!s:.200}; replay it with "
                          "sd-img2img --replay IMAGE --init-img THAT_FILE")
    sized = made.get("resize")
    init = load_init_image(req.init_img, meta.get("width") if sized else None, meta.get("height") if sized else None,
                           sized or "crop")
    if init.sha256 != made.get("sha256"):
        raise ReplayError(f"--init-img {req.init_img} is not the image {path} was made from (sha256 "
                          f"{init.sha256[:12]}... vs {str(made.get('sha256'))[:12]}...)")
    return {"init": init, "strength": float(strength), "encode": encode, "resize": sized,
            **_recorded_mask(req, meta, path, init)}


def _recorded_mask(req: ReplayRequest, meta: dict, path: Path, init) -> dict:
    from sd_cli.output.init_image import load_mask

    made = meta.get("mask")
    if made is None:
        if req.mask is not None:
            raise ReplayError(f"{path} was not inpainted; drop --mask")
        return {}
    if not isinstance(made, dict) or type(made.get("blur")) is not int or not isinstance(made.get("fill"), str):
        raise ReplayError(f"{path}: its sd_cli metadata has a malformed mask record")
    if req.mask is None:
        raise ReplayError(f"{path} was inpainted with the mask {made.get('file')!s:.200}; give it as --mask")
    mask = load_mask(req.mask, init.size)
    if mask.sha256 != made.get("sha256"):
        raise ReplayError(f"--mask {req.mask} is not the mask {path} was made with")
    return {"mask": mask, "mask_blur": made["blur"], "fill": made["fill"]}


def _engine(req: ReplayRequest, runtime, rec: Recorded, meta: dict, log):
    """The model as the image was made: the run's thread count and VAE decode unless given otherwise,
    and the same checkpoint by hash (`--force` goes on with a warning)."""
    from dataclasses import replace

    from sd_cli.run.api import StableDiffusion

    runtime = replace(runtime, threads=runtime.threads or rec.threads, vae_tiling=req.vae_tiling or rec.vae_tiling)
    sd = None
    recorded = RECORDED_DTYPES.get(rec.dtype)
    if runtime.dtype is None and runtime.precision is None and recorded is not None:
        try:  # the image's own dtype, not what --dtype auto picks today (its rule may have changed since)
            sd = StableDiffusion(replace(runtime, dtype=recorded), log=log)
        except UsageError:  # a dtype this device cannot run (fp16 made on CUDA, replayed on a CPU): auto
            sd = None
    sd = sd or StableDiffusion(runtime, log=log)
    if sd.model_hash != rec.model_hash:
        why = (f"{req.image} was made with model hash {rec.model_hash} ({rec.model_name}) but --ckpt "
               f"{runtime.ckpt} has hash {sd.model_hash}")
        if not req.force:
            hint = previous_demo_hint(rec.model_hash)
            how = hint or "pass that model's file as --ckpt"
            raise CheckpointError(f"{why}; {how}, or add --force to replay anyway")
        log.warn(f"{why}; replaying anyway (--force)")
    _check_vae(req, runtime, meta, log)
    recorded = meta.get("embeddings") if isinstance(meta.get("embeddings"), dict) else {}
    missing = sorted(str(name) for name in recorded if name not in sd.embeddings.paths)
    if missing:
        raise ReplayError(f"{req.image} was made with the embedding(s) {', '.join(missing)}; put them in a folder "
                          "and pass it as --embeddings")
    if (sd.device.type, sd.dtype_name) != (rec.device, rec.dtype):
        log.info(f"recorded on {rec.device} in {rec.dtype}, replaying on {sd.device.type} in {sd.dtype_name}: "
                 "expect small differences")
    if rec.threads and sd.threads and sd.threads != rec.threads:
        log.info(f"recorded with {rec.threads} CPU threads, replaying with {sd.threads}: expect last-bit differences")
    return sd


def recorded_hires(meta: dict, path: Path) -> dict:
    """The hires-fix fields of the image, as Generation keywords ({} without a hires pass)."""
    hr = meta.get("hires")
    if hr is None:
        return {}
    ok = isinstance(hr, dict) and type(hr.get("scale")) in (int, float) and type(hr.get("steps")) is int \
        and type(hr.get("strength")) in (int, float) and isinstance(hr.get("upscaler"), str)
    if not ok:
        raise ReplayError(f"{path}: its sd_cli metadata has a malformed hires record")
    rule = hr.get("steps_rule", "fraction")  # absent: made before A1111's hires steps rule
    if rule not in ("a1111", "fraction"):
        raise ReplayError(f"{path}: its sd_cli metadata has an unknown hires steps_rule {rule!r}")
    return {"hr_scale": float(hr["scale"]), "hr_upscaler": hr["upscaler"], "hr_steps": hr["steps"],
            "hr_strength": float(hr["strength"]), "hr_rule": rule}


def recorded_faster(meta: dict, path: Path) -> dict:
    """DeepCache, the guidance interval and token merging of the image, as Generation keywords (absent:
    off, as every image made before them)."""
    out: dict = {}
    n, branch = meta.get("deepcache", 1), meta.get("deepcache_branch", 0)
    interval, tome = meta.get("cfg_interval"), meta.get("tome", 0.0)
    num = (int, float)
    ok = type(n) is int and type(branch) is int and type(tome) in num and (interval is None or (
        isinstance(interval, list) and len(interval) == 2 and type(interval[0]) in num
        and (interval[1] is None or type(interval[1]) in num)))
    if not ok:
        raise ReplayError(f"{path}: its sd_cli metadata has a malformed deepcache, deepcache_branch, cfg_interval "
                          "or tome")
    if n != 1:
        out.update(deepcache=n, deepcache_branch=branch)
    if interval is not None:
        out["cfg_interval"] = (float(interval[0]), math.inf if interval[1] is None else float(interval[1]))
    if tome:
        out["tome"] = float(tome)
    return out


def _check_vae(req: ReplayRequest, runtime, meta: dict, log) -> None:
    """The image's --vae (by hash) is the one given now; neither, or both the same (--force: a warning)."""
    from sd_cli.weights.checkpoint import file_hash

    made = meta.get("vae") if isinstance(meta.get("vae"), dict) else None
    now = file_hash(runtime.vae) if runtime.vae is not None else None
    if (made or {}).get("sha256") == now:
        return
    if made is None:
        why = f"{req.image} was made with the checkpoint's own VAE, not --vae {runtime.vae}"
    else:
        why = f"{req.image} was made with --vae {made.get('file')} (sha256 {str(made.get('sha256'))[:10]}...)"
        why += f", not {runtime.vae}" if runtime.vae is not None else "; pass that file as --vae"
    if not req.force:
        raise CheckpointError(f"{why} (or add --force to replay anyway)")
    log.warn(f"{why}; replaying anyway (--force)")


def _regenerate(sd, rec: Recorded, meta: dict, path: Path, quiet: bool, init_fields: dict):
    """The image's whole batch made again through the render path; {watermarked?: pixels} for the
    options the metadata allows (an image from before the `watermark` field tries both)."""
    from tqdm import tqdm

    from sd_cli.output.watermark import apply_watermark
    from sd_cli.run.settings import Generation
    from sd_cli.run.work import WorkItem

    m = sd.config.model
    syntax, clip_skip, s_noise = meta.get("prompt_syntax", "plain"), meta.get("clip_skip", 1), meta.get("s_noise", 1.0)
    rule = meta.get("seed_rule", "batch")  # images before the field: one generator per batch
    if not isinstance(syntax, str) or type(clip_skip) is not int or type(s_noise) not in (int, float) \
            or rule not in ("image", "batch"):
        raise ReplayError(f"{path}: its sd_cli metadata has a malformed prompt_syntax, clip_skip, s_noise or "
                          "seed_rule")
    subseed, sub_strength = meta.get("subseed"), meta.get("subseed_strength", 0.0)
    if not (subseed is None or type(subseed) is int) or type(sub_strength) not in (int, float):
        raise ReplayError(f"{path}: its sd_cli metadata has a malformed subseed or subseed_strength")
    first = rec.seed - rec.batch_index if rule == "image" else rec.seed  # the batch's seeds count up
    if first < 0:
        raise ReplayError(f"{path}: its sd_cli metadata cannot be replayed: seed {rec.seed} at batch position "
                          f"{rec.batch_index}")
    try:
        gen = Generation((rec.prompt,), negative_prompt=rec.negative_prompt, sampler=rec.sampler, steps=rec.steps,
                         scale=rec.scale, eta=rec.eta, seed=first, height=rec.height, width=rec.width,
                         latent_channels=m.latent_channels, factor=m.downscale, n_samples=rec.n_samples,
                         fixed_code=meta.get("fixed_code") is True, watermark=False,
                         prompt_syntax=syntax, clip_skip=clip_skip,  # absent: the text as it is, as made
                         prompt_editing=meta.get("prompt_editing") is True,  # absent: brackets were emphasis
                         scheduler=_recorded_scheduler(meta, rec.sampler), s_noise=float(s_noise),
                         seed_rule=rule, loras=recorded_loras(meta, path), **init_fields,
                         subseed=subseed, subseed_strength=float(sub_strength), **recorded_hires(meta, path),
                         **recorded_faster(meta, path))
    except UsageError as err:
        raise ReplayError(f"{path}: its sd_cli metadata cannot be replayed: {err}") from None
    sd.check_loras(gen)  # the prompt's <lora:...> names are found before the model loads
    seeds = tuple(first + i for i in range(rec.batch_size)) if rule == "image" else ()
    item = WorkItem(0, 0, (rec.prompt,) * rec.batch_size, first, (), seeds)
    bar = tqdm(total=rec.steps, desc=f"replaying {rec.sampler}", unit="step", leave=False, disable=quiet,
               file=sys.stderr)
    img = sd.render(gen, item, lambda i, tot, x: (setattr(bar, "total", tot), bar.update(1)))[rec.batch_index]
    bar.close()
    can_mark = can_watermark(rec.height, rec.width) or rec.width * rec.height >= OLD_WATERMARK_MIN_PIXELS
    options = {False: img}
    if rec.watermark or (rec.watermark is None and can_mark):  # force: versions before 0.2 marked from 256x256
        options[True] = apply_watermark(img, force=True)
    if rec.watermark is not None:
        options = {rec.watermark: options[rec.watermark]}
    return options, gen


def recorded_loras(meta: dict, path: Path) -> tuple:
    """The image's --lora files as requests (its prompt's <lora:...> tags are found again in --lora-dir)."""
    from sd_cli.run.loras import LoraRequest

    records = meta.get("loras", [])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ReplayError(f"{path}: its sd_cli metadata has a malformed loras list")
    out = []
    for r in records:
        if r.get("source") != "--lora":
            continue
        file, te, unet = r.get("file"), r.get("te_weight"), r.get("unet_weight")
        if not isinstance(file, str) or type(te) not in (int, float) or type(unet) not in (int, float):
            raise ReplayError(f"{path}: its sd_cli metadata has a malformed LoRA entry")
        if not Path(file).is_file():
            raise ReplayError(f"{path} was made with --lora {file}, which is not there (run from the folder it was "
                              "made in, or put the file back)")
        out.append(LoraRequest(Path(file), float(te), float(unet), str(r.get("name", Path(file).stem)), "--lora"))
    return tuple(out)


def _recorded_scheduler(meta: dict, sampler: str) -> str:
    """The recorded scheduler, or (images before the field) the sampler's own default."""
    from sd_cli.sampling.samplers import get_sampler

    value = meta.get("scheduler")
    return value if isinstance(value, str) else get_sampler(sampler).schedule


def _write(req: ReplayRequest, sd, rec: Recorded, meta: dict, text: str | None, img: np.ndarray, marked: bool,
           state) -> Path:
    """The regenerated image into OUTDIR/samples, with the original metadata (device, dtype, threads,
    watermark and `replay_of` updated)."""
    from sd_cli.output.a1111 import a1111_text
    from sd_cli.output.png import SAMPLE_PATTERN, save_png
    from sd_cli.run.resume import deferred_interrupt
    from sd_cli.sampling.samplers import get_sampler

    new_meta = {**meta, "device": sd.device.type, "dtype": sd.dtype_name, "threads": sd.threads,
                "sd_cli_version": __version__, "watermark": marked, "replay_of": str(req.image)}
    try:
        params = a1111_text(new_meta, get_sampler(rec.sampler).schedule)
    except (KeyError, ValueError):
        params = text or rec.prompt
    with deferred_interrupt():
        written = save_png(req.write_dir, SAMPLE_PATTERN, img, parameters=params, metadata=new_meta)
        state.images.append({"path": str(written), **new_meta})
    return written


def replay(req: ReplayRequest, runtime, state) -> int:
    """Run `--replay`; returns 0 (identical pixels) or 1 (different). Errors raise SdCliError."""
    from sd_cli.run.report import Log

    log = Log(req.quiet)
    path = req.image
    text, meta, original = read_image(path)
    rec = parse_recorded(meta, path)
    hr = meta.get("hires") if isinstance(meta.get("hires"), dict) else {}
    want = (hr.get("height", rec.height), hr.get("width", rec.width), 3)
    if original.shape != want:
        raise ReplayError(f"--replay {path}: the image is {original.shape[1]}x{original.shape[0]} but its metadata "
                          f"says {want[1]}x{want[0]} (resized or cropped since?)")
    if req.write_dir is not None:
        from sd_cli.output.png import ensure_writable_dir

        ensure_writable_dir(req.write_dir)
    init_fields = recorded_init(req, meta, path)  # before the model loads: the right --init-img?
    sd = _engine(req, runtime, rec, meta, log)
    t0 = time.perf_counter()
    sd.pipeline()
    options, gen = _regenerate(sd, rec, meta, path, req.quiet, init_fields)
    results = {marked: compare(candidate, original) for marked, candidate in options.items()}
    marked = min(results, key=lambda m: (not results[m]["identical"], results[m]["mean_abs_diff"]))
    result, chosen = results[marked], options[marked]
    check = check_metadata(sd, gen, rec, meta, text, marked)
    if result["identical"] and check["differs"] == [] and check["text_matches"]:
        try:
            check["bytes_identical"] = png_bytes(chosen, check["text"], check["meta"]) == path.read_bytes()
        except Exception:  # noqa: BLE001 - the byte check is a bonus; the verdict stands on pixels and texts
            pass
    written = _write(req, sd, rec, meta, text, chosen, marked, state) if req.write_dir is not None else None
    log.info(f"replayed in {time.perf_counter() - t0:.1f} s")
    _report(req, sd, rec, result, check, marked, written)
    return 0 if result["identical"] and not check["differs"] and check["text_matches"] else 1


RECORDED_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # metadata "dtype" -> --dtype
# Fields that say where and with what an image was made, not what it is: a replay elsewhere may differ in
# them (reported, not a mismatch). The file's values are kept when the expected bytes are rebuilt.
ENVIRONMENT_FIELDS = ("device", "dtype", "threads", "sd_cli_version", "model_name")
_NOT_COMPARED = ("replay_of", "vae_tiled")  # written by --replay --outdir; a field of early versions


def check_metadata(sd, gen, rec: Recorded, meta: dict, text: str | None, marked: bool) -> dict:
    """The metadata these settings write, against the file's: which sd_cli fields differ (model hash
    included), and whether the A1111 text is the one they write. Only fields the file has are compared,
    so files from before a field existed still replay."""
    from sd_cli.output.a1111 import a1111_text
    from sd_cli.run.work import image_metadata
    from sd_cli.sampling.samplers import get_sampler

    expected = image_metadata(sd.base_metadata(gen), rec.prompt, rec.seed, rec.batch_size, rec.batch_index,
                              rec.n_samples, meta.get("iteration", 0), marked, sd.describe(gen, rec.prompt))
    expected.update({k: meta[k] for k in ENVIRONMENT_FIELDS if k in meta})
    expected.update({k: meta[k] for k in _NOT_COMPARED if k in meta})
    differs = sorted(k for k in meta if k not in _NOT_COMPARED and (k not in expected or meta[k] != expected[k]))
    for field in ("embeddings", "loras", "vae"):  # e.g. a trigger word that is an embedding now
        if expected.get(field) and field not in meta:
            differs.append(field)
    written = a1111_text(expected, get_sampler(gen.sampler).schedule)
    as_file = {k: expected.get(k, meta[k]) for k in meta}  # the fields the file has, as these settings write them
    return {"differs": differs, "text_matches": text == written, "text": written, "meta": as_file,
            "expected": {k: expected.get(k) for k in differs}, "found": {k: meta[k] for k in differs},
            "bytes_identical": None}


def _verdict(req: ReplayRequest, sd, rec: Recorded, result: dict, check: dict) -> str:
    path = req.image
    what = (f"{rec.width}x{rec.height}, seed {rec.seed}, {rec.sampler} {rec.steps} steps, "
            f"image {rec.batch_index + 1} of {rec.batch_size}")
    if not result["identical"]:
        return (f"differs: {path}: mean abs difference {result['mean_abs_diff']:.4f}, max {result['max_abs_diff']} "
                f"(0-255 scale), {100 * result['differing_pixels']:.2f}% of pixels differ ({what}; recorded on "
                f"{rec.device} {rec.dtype}, replayed on {sd.device.type} {sd.dtype_name})")
    if check["differs"]:
        fields = ", ".join(f"{k} (file {check['found'][k]!r:.40}, these settings write {check['expected'][k]!r:.40})"
                           for k in check["differs"])
        return f"differs: {path}: the pixels are identical, but its sd_cli metadata is not what they write: {fields}"
    if not check["text_matches"]:
        return (f"differs: {path}: the pixels are identical, but its A1111 parameters text is not the one its "
                "settings write (edited by hand or by another program?)")
    tail = {True: "; the PNG file is byte-identical too", False: "; the PNG file itself differs (re-saved by "
            "another program, or another Pillow/zlib?)", None: ""}[check["bytes_identical"]]
    return f"identical: {path} regenerated pixel for pixel ({what}), its metadata and parameters text too{tail}"


def _report(req: ReplayRequest, sd, rec: Recorded, result: dict, check: dict, marked: bool, written) -> None:
    from sd_cli.run.report import print_json, write_stdout

    verdict = _verdict(req, sd, rec, result, check)
    if written is not None:
        verdict += f"; regenerated image written to {written}"
    if not req.json:
        write_stdout(verdict)
        return
    if not req.quiet:
        print(verdict, file=sys.stderr)
    print_json({
        "ok": result["identical"] and not check["differs"] and check["text_matches"], **result,
        "metadata_differs": check["differs"], "parameters_text_matches": check["text_matches"],
        "bytes_identical": check["bytes_identical"], "image": str(req.image), "watermark": marked,
        "recorded": {"device": rec.device, "dtype": rec.dtype, "threads": rec.threads, "model_hash": rec.model_hash},
        "replayed": {"device": sd.device.type, "dtype": sd.dtype_name, "threads": sd.threads,
                     "model_hash": sd.model_hash},
        "written": str(written) if written is not None else None,
    })
