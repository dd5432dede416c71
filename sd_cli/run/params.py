"""`--params`: settings from an A1111 infotext (a PNG's `parameters` text, ours or A1111's, or the text
itself), for the flags the command line does not give.

Read: prompt, negative prompt, Steps, Sampler (with Schedule type, or the older form with the schedule in
the sampler's name, "DPM++ 2M Karras"), CFG scale, Seed, Size, Clip skip, Eta DDIM, Batch size, Variation
seed and its strength, Token merging ratio, DeepCache, DeepCache branch, CFG interval (and A1111's NGMS with
"NGMS all steps: True" as the interval S-inf); in sd-txt2img the hires fix (Hires upscale or Hires resize, Hires steps, Hires
upscaler, and Denoising strength as its strength); in sd-img2img Denoising strength as --strength. Fields
that only describe the image (Model hash, Model, Version, Batch pos, TI hashes, Lora hashes, Token count)
are not settings. Any other field (ENSD, a sampler or schedule type this tool lacks, Hires sampler, ...)
is named in a warning, or is an error under --strict-params: never silently ignored. A hires pass this
tool cannot run as written (an upscaler it lacks, such as R-ESRGAN 4x+; a Hires resize that is not a
multiple of the size) is an error unless the command line gives the replacement (--hr-upscaler,
--hr-scale): then it is named in the warning.
"""

from __future__ import annotations

from collections.abc import Collection
from fractions import Fraction
from pathlib import Path

from sd_cli.errors import UsageError

DESCRIPTIVE = frozenset({"model_hash", "model_name", "Version", "Batch pos", "TI hashes", "Token count",
                         "Emphasis", "Lora hashes"})
# Every "Schedule type" label of A1111 (modules/sd_schedulers.py), for the older sampler names that end in
# one ("DPM++ SDE Karras"); which of them this tool has: `_scheduler`.
A1111_SCHEDULES = ("Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "SGMUniform",
                   "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")


def read_infotext(source: str) -> str:
    """The infotext of a PNG file (its `parameters` chunk), or `source` itself when it is not a file."""
    path = Path(source)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        return source
    from sd_cli.output.png import read_png_metadata

    try:
        text, _ = read_png_metadata(path)
    except Exception as err:  # noqa: BLE001 - an unreadable image is the user's input error
        raise UsageError(f"--params {source}: cannot read it as a PNG ({type(err).__name__})") from None
    if not text:
        raise UsageError(f"--params {source}: the image has no parameters text")
    return text


def _sampler(label: str) -> tuple[str | None, str | None]:
    """(registry name, the schedule type its name carries) for A1111's sampler name: "DPM++ 2M", or the
    older "DPM++ SDE Karras" form (A1111 before "Schedule type"); a legacy alias only when nothing else
    has it. (None, None) for a sampler this tool lacks."""
    from sd_cli.sampling.samplers import SAMPLERS

    def find(name: str) -> str | None:
        found = [n for n, info in SAMPLERS.items() if name in (info.label, info.a1111_name)]
        return min(found, key=lambda n: SAMPLERS[n].alias_of is not None) if found else None

    exact = find(label)  # (our own labels include "DPM++ 2M Karras")
    if exact is not None:
        return exact, None
    for schedule in A1111_SCHEDULES:
        base = find(label[: -len(schedule) - 1]) if label.endswith(" " + schedule) else None
        if base is not None:
            return base, schedule
    return None, None


def _scheduler(label: str, ours: bool) -> str | None:
    """Our scheduler for an A1111 "Schedule type" label other than "Automatic", None where this tool has
    none that gives the same sigmas. A1111's "Uniform" is the model's own sigmas (get_sigmas), our
    "normal"; A1111's "Beta" spaces the Beta quantiles linearly in sigma, not ComfyUI's beta that sd_cli
    runs and writes as "Beta", so "Beta" is ours only in an infotext sd_cli wrote (`ours`)."""
    from sd_cli.sampling.schedule import SCHEDULER_LABELS

    if label == "Uniform":
        return "normal"
    if label == "SGMUniform":  # A1111's alias
        label = "SGM Uniform"
    if label == "Beta" and not ours:
        return None
    return next((name for name, text in SCHEDULER_LABELS.items() if text == label), None)


def _number(fields: dict, key: str, kind: type):
    value = fields.pop(key)
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"--params: {key} {value!r} is not a number") from None


def _sampling(fields: dict, out: dict, unused: list[str]) -> None:
    """Sampler and Schedule type into `out` ("Automatic": the sampler's default, no scheduler)."""
    from sd_cli.sampling.samplers import get_sampler
    from sd_cli.sampling.schedule import SCHEDULERS

    label = fields.pop("sampler_label", None)
    given = fields.pop("Schedule type", None)
    sampler, in_name = _sampler(label) if label is not None else (None, None)
    if label is not None and sampler is None:
        unused.append(f"Sampler: {label}")
    elif sampler is not None:
        out["sampler"] = sampler
    variant = fields.pop("UniPC variant", None)  # A1111's UniPC setting (its default bh1 is our uni_pc)
    if variant is not None and sampler == "uni_pc" and variant in ("bh1", "bh2"):
        out["sampler"] = "uni_pc" if variant == "bh1" else "uni_pc_bh2"
    elif variant is not None:
        unused.append(f"UniPC variant: {variant}")
    schedule = in_name or given  # (A1111 too reads the name's schedule before the field)
    if schedule is None or schedule == "Automatic":
        return
    ours = str(fields.get("Version", "")).startswith("sd_cli")
    scheduler = _scheduler(schedule, ours) if sampler is not None else None
    own_grid = sampler is not None and get_sampler(sampler).schedule not in SCHEDULERS  # DDIM, PLMS, LCM
    if scheduler is not None and not own_grid:
        out["scheduler"] = scheduler
    elif own_grid:
        unused.append(f"Schedule type: {schedule} ({label} runs on its own grid)")
    elif schedule == "Beta" and sampler is not None:
        unused.append("Schedule type: Beta (A1111's, which is not this tool's beta)")
    else:
        unused.append(f"Schedule type: {schedule}")


def _hires_scale(fields: dict, out: dict, given: Collection[str], unused: list[str]) -> float | None:
    """The hires fix's scale from "Hires upscale", or from A1111's alternative "Hires resize: WxH" (0 for
    one side: kept in proportion) when that is the first pass's size times one factor."""
    from sd_cli.output.a1111 import SIZE_RE
    from sd_cli.run.settings import hires_size

    resize = fields.pop("Hires resize", None)
    if resize is None:
        return _number(fields, "Hires upscale", float) if "Hires upscale" in fields else None
    if "Hires upscale" in fields:  # (A1111 writes one of the two; with a resize it ignores the scale)
        unused.append(f"Hires upscale: {fields.pop('Hires upscale')}")
    m = SIZE_RE.fullmatch(resize)
    if m is None:
        raise UsageError(f"--params: Hires resize {resize!r} is not WIDTHxHEIGHT")
    rx, ry = int(m.group(1)), int(m.group(2))
    w, h = out.get("width"), out.get("height")
    scale = None
    if w and h and (rx or ry):
        sx = Fraction(rx, w) if rx else Fraction(ry, h)
        sy = Fraction(ry, h) if ry else sx
        if sx == sy and hires_size(w, h, float(sx)) == (w * sx, h * sx):
            scale = float(sx)
    if scale is not None:
        return scale
    if "hr_scale" not in given:
        size = f"Size {w}x{h}" if w and h else "the Size (which the text lacks)"
        raise UsageError(f"--params: Hires resize {resize} is not {size} times one factor; this tool's hires fix only "
                         "scales (A1111 crops to such a size); give --hr-scale F to run it at F times the size")
    unused.append(f"Hires resize: {resize}")
    return None


def _hires(fields: dict, out: dict, given: Collection[str], unused: list[str]) -> None:
    """sd-txt2img's hires fix: scale, steps ("Hires steps: 0" or none: the first pass's), upscaler, and
    "Denoising strength" (which A1111 writes for the hires pass)."""
    from sd_cli.output.a1111 import HR_LABELS

    hires = "Hires upscale" in fields or "Hires resize" in fields
    scale = _hires_scale(fields, out, given, unused)  # (None for a resize that --hr-scale replaces)
    if not hires:
        if "Denoising strength" in fields:  # (a txt2img without a hires pass has no denoising)
            unused.append(f"Denoising strength (no hires fix): {fields.pop('Denoising strength')}")
        return
    if scale is not None and not 1.0 < scale <= 8.0:
        raise UsageError(f"--params: a hires scale of {scale:g}: this tool's hires fix takes more than 1 and at most 8")
    if scale is not None:
        out["hr_scale"] = scale
    if "Hires steps" in fields:
        steps = _number(fields, "Hires steps", int)
        if steps:
            out["hr_steps"] = steps
    if "Denoising strength" in fields:
        out["hr_strength"] = _number(fields, "Denoising strength", float)
    upscaler = fields.pop("Hires upscaler", None)
    # The labels this tool runs: its own (HR_LABELS, which sd_cli writes) and A1111's "None", a plain Pillow
    # Lanczos resize of the decoded first pass (A1111's images.resize_image), which is our lanczos.
    ours = {label: name for name, label in HR_LABELS.items()} | {"None": "lanczos"}
    if upscaler in ours:
        out["hr_upscaler"] = ours[upscaler]
    elif upscaler is not None and "hr_upscaler" in given:
        unused.append(f"Hires upscaler: {upscaler}")
    elif upscaler is not None:
        raise UsageError(f"--params: Hires upscaler {upscaler!r} is not one this tool has ({', '.join(HR_LABELS.values())}"
                         f"); give --hr-upscaler {'|'.join(HR_LABELS)} to run the hires fix with one of them instead")


def _faster(fields: dict, out: dict, unused: list[str]) -> None:
    """Token merging (A1111's "Token merging ratio", and "... hr" when it is the same ratio: this tool merges
    in both passes alike), ours "DeepCache", "DeepCache branch", "CFG interval", and A1111's "NGMS: s" (no
    negative prompt below sigma s) as the interval s..inf when "NGMS all steps: True" says A1111 skipped
    it at every step; without that, A1111 skips it only every other call, which this tool does not do."""
    from sd_cli.output.a1111 import as_number, parse_cfg_interval
    from sd_cli.run.settings import MAX_TOME

    if "Token merging ratio" in fields:
        ratio = _number(fields, "Token merging ratio", float)
        out["tome"] = min(ratio, MAX_TOME)
        if ratio > MAX_TOME:  # (tomesd too merges at most the 3 non-destination tokens of each 2x2 cell)
            unused.append(f"Token merging ratio: {ratio:g} (run as {MAX_TOME:g}: nothing more merges)")
    if "Token merging ratio hr" in fields:
        hr = fields.pop("Token merging ratio hr")
        if as_number(hr, float) != out.get("tome"):
            unused.append(f"Token merging ratio hr: {hr}")
    if "DeepCache" in fields:
        out["deepcache"] = _number(fields, "DeepCache", int)
    if "DeepCache branch" in fields:
        out["deepcache_branch"] = _number(fields, "DeepCache branch", int)
    if "CFG interval" in fields:
        text = fields.pop("CFG interval")
        interval = parse_cfg_interval(text)
        if interval is None:
            raise UsageError(f"--params: CFG interval {text!r} is not LO-HI (two sigmas, HI may be inf)")
        out["cfg_interval"] = interval
    every = fields.pop("NGMS all steps", None)
    if "NGMS" in fields and every == "True" and "cfg_interval" not in out:
        out["cfg_interval"] = (_number(fields, "NGMS", float), float("inf"))
    elif "NGMS" in fields:
        ngms = fields.pop("NGMS")
        why = "" if every == "True" else " (A1111 skipped the negative prompt every other step below it; " \
              "--cfg-interval S inf skips it at every step)"
        unused.append(f"NGMS: {ngms}{why}")
    elif every is not None:
        unused.append(f"NGMS all steps: {every}")


def settings_from_infotext(text: str, command: str = "txt2img",
                           given: Collection[str] = ()) -> tuple[dict, list[str]]:
    """(Generation.create keyword arguments, the fields that were not used) of an infotext, for `command`
    ("txt2img" or "img2img"). `given`: the flags (argparse dests) of the command line, which win; an
    upscaler or resize the hires fix cannot run is an error unless the flag that replaces it is given."""
    from sd_cli.output.a1111 import parse_a1111_parameters

    try:
        fields = parse_a1111_parameters(text)
    except ValueError as err:
        raise UsageError(f"--params: {err}") from None
    out: dict = {"prompt": fields.pop("prompt"), "negative_prompt": fields.pop("negative_prompt")}
    unused: list[str] = []
    for key, name in (("steps", "steps"), ("scale", "scale"), ("seed", "seed"), ("width", "width"),
                      ("height", "height")):
        if key in fields:
            value = fields.pop(key)
            if isinstance(value, str):
                raise UsageError(f"--params: {key} {value!r} is not a number")
            out[name] = value
    _sampling(fields, out, unused)
    for key, name, kind in (("Clip skip", "clip_skip", int), ("Eta DDIM", "eta", float),
                            ("Batch size", "n_samples", int), ("Variation seed", "subseed", int),
                            ("Variation seed strength", "subseed_strength", float)):
        if key in fields:
            out[name] = _number(fields, key, kind)
    _faster(fields, out, unused)
    if command == "img2img":
        if "Denoising strength" in fields:
            out["strength"] = _number(fields, "Denoising strength", float)
    else:
        _hires(fields, out, given, unused)
    out.setdefault("n_samples", 1)  # an infotext without "Batch size" describes an image made alone
    unused += [k for k in fields if k not in DESCRIPTIVE]
    return out, unused
