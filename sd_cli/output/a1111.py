"""AUTOMATIC1111's `parameters` text: the line A1111, Civitai and ComfyUI read from a PNG, both ways."""

from __future__ import annotations

import json
import re
from typing import Any

from sd_cli.sampling.schedule import SCHEDULER_LABELS
from sd_cli.version import __version__

# (input key, A1111 label) in A1111's order; "Size" is built from width/height.
_A1111_FIELDS = (
    ("steps", "Steps"),
    ("sampler_label", "Sampler"),
    ("Schedule type", "Schedule type"),
    ("scale", "CFG scale"),
    ("seed", "Seed"),
    ("__size__", "Size"),
    ("model_hash", "Model hash"),
    ("model_name", "Model"),
)
_A1111_REQUIRED = ("prompt", "steps", "sampler_label", "scale", "seed", "width", "height")
_A1111_CONSUMED = frozenset(
    {"prompt", "negative_prompt", "width", "height"} | {k for k, _ in _A1111_FIELDS}
)
_A1111_LABELS = frozenset(label for _, label in _A1111_FIELDS)
_A1111_KEY_RE = re.compile(r"\w[\w \-/]*")
_A1111_PARSE_KEY_RE = re.compile(r"\s*(\w[\w \-/]*?)\s*:[ \t]*")
_NEGATIVE_RE = re.compile(r"(?:^|\n)Negative prompt:")
SIZE_RE = re.compile(r"(\d+)x(\d+)")  # an infotext's "WIDTHxHEIGHT" (Size, Hires resize)
_JSON_DECODER = json.JSONDecoder()
HR_LABELS = {"latent": "Latent", "latent-nearest": "Latent (nearest-exact)", "lanczos": "Lanczos"}  # A1111's


def _a1111_value(value: Any) -> str:
    """A1111's quoting: values that would break the "k: v, k: v" line become JSON strings."""
    s = str(value)
    if any(ch in s for ch in ",:\n\r") or s.startswith('"') or s != s.strip():
        return json.dumps(s, ensure_ascii=False)
    return s


def a1111_parameters(p: dict) -> str:
    """Render the AUTOMATIC1111 "parameters" text (the format A1111, Civitai etc. read)::

        <prompt>
        Negative prompt: <negative prompt>          (line omitted when empty)
        Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: ..., Model: ...

    Required keys: prompt, steps, sampler_label, scale, seed, width, height. Optional:
    negative_prompt, model_hash, model_name, "Schedule type" (placed after Sampler, like A1111).
    Any other key is appended verbatim as ``key: value`` in the dict's order (use A1111's labels,
    e.g. "Eta DDIM", "Clip skip", if A1111's paste should recognise them). Keys whose value is
    None are left out. Values holding ``,`` ``:`` or newlines are written as JSON strings, as
    A1111 does. Prompts are written as they are (no escaping exists in this format); a prompt
    line that itself starts with "Negative prompt:" cannot be told apart when parsing back.
    """
    missing = [k for k in _A1111_REQUIRED if p.get(k) is None]
    if missing:
        raise ValueError(f"a1111_parameters: missing {', '.join(missing)}")
    fields: list[tuple[str, Any]] = []
    for key, label in _A1111_FIELDS:
        if key == "__size__":
            fields.append((label, f"{int(p['width'])}x{int(p['height'])}"))
        elif p.get(key) is not None:
            fields.append((label, p[key]))
    for key, value in p.items():
        if key in _A1111_CONSUMED or value is None:
            continue
        if not isinstance(key, str) or not _A1111_KEY_RE.fullmatch(key) or key in _A1111_LABELS:
            raise ValueError(f"a1111_parameters: unusable extra key {key!r}")
        fields.append((key, value))
    line = ", ".join(f"{label}: {_a1111_value(value)}" for label, value in fields)
    prompt = str(p["prompt"])
    negative = p.get("negative_prompt") or ""
    neg_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{neg_line}\n{line}"


def _parse_params_line(line: str) -> list[tuple[str, str]] | None:
    """Split "k: v, k: "quoted, v", ..." into pairs; None if the line is not such a list."""
    out: list[tuple[str, str]] = []
    pos, n = 0, len(line)
    while True:
        m = _A1111_PARSE_KEY_RE.match(line, pos)
        if m is None:
            return None
        key, pos = m.group(1), m.end()
        if pos < n and line[pos] == '"':
            try:
                value, pos = _JSON_DECODER.raw_decode(line, pos)
            except ValueError:
                return None
            if not isinstance(value, str):
                return None
        else:
            end = line.find(",", pos)
            end = n if end < 0 else end
            value, pos = line[pos:end].strip(), end
        out.append((key, value))
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n:
            return out
        if line[pos] != ",":
            return None
        pos += 1


def as_number(value: str, kind: type) -> Any:
    """`kind(value)` (int or float), or `value` itself when it is not such a number."""
    try:
        return kind(value)
    except ValueError:
        return value


def parse_a1111_parameters(text: str) -> dict:
    """Inverse of ``a1111_parameters``; also reads A1111's own texts.

    Returns prompt and negative_prompt ("" when absent) and, where present: steps (int),
    sampler_label, scale (float), seed (int), width/height (int, from Size), model_hash,
    model_name; every other field under its label with its (unquoted) string value.
    As in A1111, the last line is the settings line only if it holds at least three
    "key: value" fields. The "sd_cli" JSON chunk, not this text, is the exact record.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty A1111 parameters text")
    head, _, last = text.rpartition("\n")
    fields = _parse_params_line(last)
    if fields is None or len(fields) < 3:
        head, fields = text, []
    m = _NEGATIVE_RE.search(head)
    if m:
        prompt, negative = head[: m.start()], head[m.end() :]
        if negative.startswith(" "):
            negative = negative[1:]
    else:
        prompt, negative = head, ""
    res: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    for label, value in fields:
        if label == "Steps":
            res["steps"] = as_number(value, int)
        elif label == "Sampler":
            res["sampler_label"] = value
        elif label == "CFG scale":
            res["scale"] = as_number(value, float)
        elif label == "Seed":
            res["seed"] = as_number(value, int)
        elif label == "Size" and SIZE_RE.fullmatch(value):
            w, h = SIZE_RE.fullmatch(value).groups()
            res["width"], res["height"] = int(w), int(h)
        elif label == "Model hash":
            res["model_hash"] = value
        elif label == "Model":
            res["model_name"] = value
        else:
            res[label] = value
    return res


def a1111_text(meta: dict, schedule: str) -> str:
    """The `parameters` text of one image from its sd_cli metadata: its prompt, then A1111's own labels only."""
    bs = meta.get("batch_size", 1)
    return a1111_parameters({
        **{k: meta[k] for k in ("prompt", "negative_prompt", "steps", "sampler_label", "scale", "seed",
                                "width", "height", "model_hash", "model_name")},
        "Schedule type": SCHEDULER_LABELS.get(meta.get("scheduler") or schedule),
        "VAE hash": meta["vae"]["a1111_hash"] if meta.get("vae") else None,
        "VAE": meta["vae"]["name"] if meta.get("vae") else None,
        "Variation seed": meta.get("subseed") if meta.get("subseed_strength") else None,
        "Variation seed strength": meta.get("subseed_strength") or None,
        "Denoising strength": meta["strength"] if meta.get("init_image") else (meta["hires"]["strength"]
                                                                                if meta.get("hires") else None),
        "Mask blur": meta["mask"]["blur"] if meta.get("mask") else None,
        "Clip skip": meta["clip_skip"] if meta.get("clip_skip", 1) > 1 else None,
        "Hires upscale": meta["hires"]["scale"] if meta.get("hires") else None,
        "Hires steps": meta["hires"]["steps"] if meta.get("hires") else None,
        "Hires upscaler": HR_LABELS.get(meta["hires"]["upscaler"]) if meta.get("hires") else None,
        "Lora hashes": lora_hashes(meta["loras"]) if meta.get("loras") else None,
        "TI hashes": ", ".join(f"{k}: {v}" for k, v in meta["embeddings"].items()) if meta.get("embeddings") else None,
        "Eta DDIM": meta["eta"] if meta["sampler"] == "ddim" and meta["eta"] else None,
        "UniPC variant": "bh2" if meta["sampler"] == "uni_pc_bh2" else None,  # (A1111's setting's label)
        **faster_fields(meta),
        "Batch size": bs if bs > 1 else None,
        "Batch pos": meta.get("batch_index") if bs > 1 else None,
        "Version": f"sd_cli {__version__}",
    })


def faster_fields(meta: dict) -> dict:
    """The faster-sampling options as infotext fields: A1111's own "Token merging ratio" (and "Token merging
    ratio hr", which A1111 writes for a hires pass that merges too: ours uses the same ratio), and ours:
    "DeepCache: N", "DeepCache branch: B", "CFG interval: LO-HI" (HI may be inf). None where off."""
    tome, hr = meta.get("tome"), meta.get("hires")
    interval = meta.get("cfg_interval")
    return {
        "Token merging ratio": tome or None,
        "Token merging ratio hr": tome if tome and hr else None,
        "DeepCache": meta["deepcache"] if meta.get("deepcache", 1) > 1 else None,
        "DeepCache branch": meta.get("deepcache_branch", 0) if meta.get("deepcache", 1) > 1 else None,
        "CFG interval": cfg_interval_text(*interval) if interval else None,
    }


def cfg_interval_text(lo: float, hi: float | None) -> str:
    """"LO-HI" of a guidance interval (hi None or inf: "inf"), each as Python's shortest float text."""
    return f"{float(lo)!r}-{'inf' if hi is None else repr(float(hi))}"


_INTERVAL_RE = re.compile(r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?)-(inf|\d+(?:\.\d*)?(?:e[+-]?\d+)?)")


def parse_cfg_interval(text: str) -> tuple[float, float] | None:
    """(LO, HI) of a "CFG interval" value ("1.0-inf", "0.28-5.42"), None if it is not one."""
    m = _INTERVAL_RE.fullmatch(text.strip())
    return (float(m.group(1)), float(m.group(2))) if m else None


def lora_hashes(loras: list[dict]) -> str:
    """A1111's "Lora hashes" value, "name: hash, name: hash" (names without ':' or ',', which would break
    the list; a LoRA listed twice is named once)."""
    seen = {}
    for r in loras:
        seen.setdefault(str(r["name"]).replace(":", "").replace(",", ""), r["a1111_hash"])
    return ", ".join(f"{name}: {h}" for name, h in seen.items())
