"""`--params`: settings from an A1111 infotext (a PNG's `parameters` text, ours or A1111's, or the text
itself), for the flags the command line does not give.

Read: prompt, negative prompt, Steps, Sampler (with Schedule type), CFG scale, Seed, Size, Clip skip,
Eta DDIM, Batch size, Variation seed and its strength. Fields that only describe the image (Model hash,
Model, Version, Batch pos, TI hashes, Lora hashes, Token count) are not settings. Any other field (Hires
fix, Denoising strength, ENSD, a sampler this tool lacks, ...) is named in a warning, or is an error
under --strict-params: never silently ignored.
"""

from __future__ import annotations

from pathlib import Path

from sd_cli.errors import UsageError

DESCRIPTIVE = frozenset({"model_hash", "model_name", "Version", "Batch pos", "TI hashes", "Token count",
                         "Schedule type", "Emphasis", "Lora hashes"})


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


def _sampler(label: str, schedule: str | None) -> str | None:
    """The registry name for A1111's sampler name (a legacy alias only when nothing else has it)."""
    from sd_cli.sampling.samplers import SAMPLERS

    wanted = {label, f"{label} {schedule}" if schedule else label}
    found = [name for name, info in SAMPLERS.items() if {info.label, info.a1111_name} & wanted]
    return min(found, key=lambda n: SAMPLERS[n].alias_of is not None) if found else None


def _scheduler(label: str | None) -> str | None:
    """Our scheduler for A1111's "Schedule type" label; "Automatic" is the sampler's default (None), and
    A1111's "Uniform" is the model's own sigmas, our "normal"."""
    from sd_cli.sampling.schedule import SCHEDULER_LABELS

    if label == "Uniform":
        return "normal"
    return next((name for name, text in SCHEDULER_LABELS.items() if text == label), None)


def settings_from_infotext(text: str) -> tuple[dict, list[str]]:
    """(Generation.create keyword arguments, names of the fields that were not used)."""
    from sd_cli.output.a1111 import parse_a1111_parameters

    try:
        fields = parse_a1111_parameters(text)
    except ValueError as err:
        raise UsageError(f"--params: {err}") from None
    out: dict = {"prompt": fields.pop("prompt"), "negative_prompt": fields.pop("negative_prompt")}
    unused = []
    for key, name in (("steps", "steps"), ("scale", "scale"), ("seed", "seed"), ("width", "width"),
                      ("height", "height")):
        if key in fields:
            value = fields.pop(key)
            if isinstance(value, str):
                raise UsageError(f"--params: {key} {value!r} is not a number")
            out[name] = value
    label = fields.pop("sampler_label", None)
    if label is not None:
        sampler = _sampler(label, fields.get("Schedule type"))
        if sampler is None:
            unused.append(f"Sampler: {label}")
        else:
            out["sampler"] = sampler
            from sd_cli.sampling.samplers import get_sampler

            scheduler = _scheduler(fields.get("Schedule type"))
            from sd_cli.sampling.schedule import SCHEDULERS

            if scheduler is not None and get_sampler(sampler).schedule in SCHEDULERS:  # (not an own grid)
                out["scheduler"] = scheduler
    for key, name, kind in (("Clip skip", "clip_skip", int), ("Eta DDIM", "eta", float),
                            ("Batch size", "n_samples", int), ("Variation seed", "subseed", int),
                            ("Variation seed strength", "subseed_strength", float)):
        if key in fields:
            value = fields.pop(key)
            try:
                out[name] = kind(value)
            except ValueError:
                raise UsageError(f"--params: {key} {value!r} is not a number") from None
    out.setdefault("n_samples", 1)  # an infotext without "Batch size" describes an image made alone
    unused += [k for k in fields if k not in DESCRIPTIVE]
    return out, unused
