"""LoRA and LyCORIS files -> per-layer weight deltas, checked against the model before anything merges.

A file is a flat dict `<module>.<suffix>: tensor`; `<module>` names a layer in one of the spellings of
`lora_keys`, `<suffix>` says which factor it is. Per layer, the factors form one adapter; its delta is
(all in float32, `scale` = alpha / rank, or 1 without alpha):

* LoRA / LoCon (kohya `lora_down`/`lora_up`/`alpha`, diffusers `lora_A`/`lora_B` or `down`/`up`):
  dW = up (out, r) @ down (r, in*kh*kw) * scale, reshaped to the layer's weight. With `lora_mid`
  (r, r, kh, kw) (Tucker): dW[o, c, k, l] = sum_ab up[o, a] mid[a, b, k, l] down[b, c].
* LoHa (`hada_w1_a/b`, `hada_w2_a/b`, optional `hada_t1/t2`): dW = (w1a @ w1b) * (w2a @ w2b) * scale
  (elementwise product; with t1/t2 each factor is rebuilt as in Tucker); rank = w1b's first dim.
* LoKr (`lokr_w1` or `lokr_w1_a @ lokr_w1_b`, `lokr_w2` or `lokr_w2_a @ lokr_w2_b` or Tucker with `lokr_t2`):
  dW = kron(w1, w2) * scale, where the scale applies only if a factor is split (rank: its inner dim).
* full (`diff`, `diff_b`; for norm layers `w_norm`, `b_norm`): dW = diff, db = diff_b.

The user's weight multiplies dW. Every key must belong to a layer of this model with a fitting shape;
anything else is an error naming the key (never skipped). Files are read with `checkpoint.read_object`:
safetensors, or PyTorch zip files through the restricted unpickler (no code from the file runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from sd_cli.errors import CheckpointError
from sd_cli.weights.lora_keys import TEXT, UNET, canonical_module, module_table

# suffix -> (format, role). The longest suffix that a key ends with decides.
SUFFIXES = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"), "lora_mid.weight": ("lora", "mid"),
    "lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
    "down.weight": ("lora", "down"), "up.weight": ("lora", "up"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"), "diff_b": ("full", "diff_b"),
    "w_norm": ("full", "diff"), "b_norm": ("full", "diff_b"),  # LyCORIS norm-layer deltas
    "alpha": (None, "alpha"),
    "dora_scale": (None, "dora_scale"),
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)
REQUIRED = {"lora": {"down", "up"}, "loha": {"w1a", "w1b", "w2a", "w2b"}, "lokr": set(), "full": set()}
OPTIONAL = {"lora": {"mid"}, "loha": {"t1", "t2"}, "lokr": {"w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"},
            "full": {"diff", "diff_b"}}


@dataclass(frozen=True)
class Layout:
    """The model's layers as a LoRA sees them: weight key -> shape, and every spelling -> module path."""

    shapes: dict[str, tuple[int, ...]]
    table: dict[str, str]


@lru_cache(maxsize=4)
def model_layout(cfg) -> Layout:
    """The layout of the model of `cfg` (a ModelConfig), from its module tree on the meta device."""
    from sd_cli.model.ldm import LatentDiffusion

    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith((UNET, TEXT))}
    modules = sorted({k.rsplit(".", 1)[0] for k in shapes if k.endswith(".weight")})
    return Layout(shapes, module_table(modules, cfg.unet.num_res_blocks, len(cfg.unet.channel_mult)))


@dataclass(frozen=True)
class Adapter:
    """One layer's factors in one file: `delta()` is its dW (float32, the layer's weight shape)."""

    key: str  # the file's module name, for messages
    target: str  # the LDM weight key it changes
    kind: str
    factors: dict[str, torch.Tensor] = field(repr=False)
    alpha: float | None
    shape: tuple[int, ...]

    def delta(self, device=None) -> torch.Tensor:
        f = {k: v.to(device=device, dtype=torch.float32) for k, v in self.factors.items()}
        dw = {"lora": _lora, "loha": _loha, "lokr": _lokr, "full": lambda f, a: (f["diff"], 1.0)}[self.kind](f, self.alpha)
        delta, scale = dw
        return (delta.reshape(self.shape) * scale) if scale != 1.0 else delta.reshape(self.shape).clone()

    def add_to(self, acc: torch.Tensor, weight: float) -> None:
        """acc += weight * dW in place (acc: float32, contiguous, the layer's shape). A plain LoRA goes
        straight into acc (one addmm: no dW tensor of the layer's size is made); the others add delta()."""
        if self.kind == "lora" and "mid" not in self.factors:
            up = self.factors["up"].to(acc.device, torch.float32).flatten(1)  # (out, r)
            down = self.factors["down"].to(acc.device, torch.float32).flatten(1)  # (r, in*kh*kw)
            scale = self.alpha / down.shape[0] if self.alpha is not None else 1.0
            acc.view(acc.shape[0], -1).addmm_(up, down, alpha=weight * scale)
        else:
            acc.add_(self.delta(acc.device), alpha=weight)

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.factors.get("diff_b")
        return None if b is None else b.to(torch.float32)


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) from a core t (r, r, kh, kw), b (r, out) on its first index, a (r, in) on its second."""
    return torch.einsum("ijkl,jr,ip->prkl", t, a.flatten(1), b.flatten(1))


def _lora(f: dict, alpha: float | None):
    up, down = f["up"], f["down"]
    rank = down.shape[0]
    if "mid" in f:
        delta = _tucker(f["mid"], down, up.flatten(1).T)
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return delta, (alpha / rank if alpha is not None else 1.0)


def _loha(f: dict, alpha: float | None):
    rank = f["w1b"].shape[0]
    w1 = _tucker(f["t1"], f["w1b"], f["w1a"]) if "t1" in f else f["w1a"] @ f["w1b"]
    w2 = _tucker(f["t2"], f["w2b"], f["w2a"]) if "t2" in f else f["w2a"] @ f["w2b"]
    return w1 * w2, (alpha / rank if alpha is not None else 1.0)


def _lokr(f: dict, alpha: float | None):
    rank = None
    w1 = f.get("w1")
    if w1 is None:
        w1, rank = f["w1a"] @ f["w1b"], f["w1b"].shape[0]
    w2 = f.get("w2")
    if w2 is None:
        rank = f["w2b"].shape[0]
        w2 = _tucker(f["t2"], f["w2b"], f["w2a"]) if "t2" in f else f["w2a"] @ f["w2b"]
    if w2.dim() == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    return torch.kron(w1.contiguous(), w2.contiguous()), (alpha / rank if alpha is not None and rank is not None else 1.0)


def _natural_shape(kind: str, f: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The shape of dW before it is fitted to the layer: (out, in) or (out, in, kh, kw); None if the
    factors do not chain (inner dimensions disagree)."""
    s = {k: tuple(v.shape) for k, v in f.items()}
    if kind == "lora":
        up, down = s["up"], s["down"]
        if len(up) not in (2, 4) or len(down) not in (2, 4) or up[1] != down[0] or up[2:] not in ((), (1, 1)):
            return None
        if "mid" in s:
            mid = s["mid"]
            if len(mid) != 4 or mid[:2] != (up[1], down[0]) or down[2:] not in ((), (1, 1)):
                return None
            return (up[0], down[1], *mid[2:])
        return (up[0], *down[1:])
    if kind == "loha":
        shapes = []
        for w in ("1", "2"):
            a, b, t = s[f"w{w}a"], s[f"w{w}b"], s.get(f"t{w}")
            if t is None:
                if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
                    return None
                shapes.append((a[0], b[1]))
            else:
                if len(t) != 4 or len(a) != 2 or len(b) != 2 or t[:2] != (a[0], b[0]):
                    return None
                shapes.append((a[1], b[1], *t[2:]))
        return shapes[0] if shapes[0] == shapes[1] else None
    if kind == "lokr":
        return _lokr_shape(s)
    if "diff" not in s:
        return None
    return s["diff"]


def _lokr_shape(s: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    def factor(n: str) -> tuple[int, ...] | None:
        if n in s:
            return s[n]
        a, b = s.get(n + "a"), s.get(n + "b")
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        t = s.get("t2") if n == "w2" else None
        if t is None:
            return (a[0], b[1]) if a[1] == b[0] else None
        return (a[1], b[1], *t[2:]) if len(t) == 4 and t[:2] == (a[0], b[0]) else None

    w1, w2 = factor("w1"), factor("w2")
    if w1 is None or w2 is None or len(w1) != 2 or len(w2) not in (2, 4):
        return None
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def _fits(natural: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """dW of shape `natural` can be this layer's: the same, a linear form of a 1x1 conv (either way), or
    (out, in*kh*kw) for a conv (LyCORIS' LoHa/LoKr store conv factors flattened)."""
    strip = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    flat = len(target) == 4 and natural == (target[0], target[1] * target[2] * target[3])
    return natural == target or strip(natural) == strip(target) or flat


def _split(key: str) -> tuple[str, str] | None:
    for suffix in _BY_LENGTH:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file, read and checked against one model: its adapters by target weight key."""

    path: Path
    adapters: tuple[Adapter, ...]

    def parts(self) -> set[str]:
        """Which parts it changes: "te" (text encoder) and/or "unet"."""
        return {"te" if a.target.startswith(TEXT) else "unet" for a in self.adapters}


def _tensors(top, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(top, dict):
        raise CheckpointError(f"LoRA {path} holds a {type(top).__name__}, not a dict of tensors")
    inner = dict.get(top, "state_dict")
    source = inner if isinstance(inner, dict) else top
    return {k: v for k, v in dict.items(source) if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _looks_like(keys: list[str]) -> str:
    """A guess at what a file without LoRA keys is, for the error message."""
    text = " ".join(keys[:2000])
    for needle, what in (("model.diffusion_model.", "a full checkpoint: pass it as --ckpt"),
                         ("lora_te1_", "an SDXL LoRA: this tool runs SD v1.x"),
                         ("conditioner.embedders", "an SDXL checkpoint"),
                         ("string_to_param", "a textual-inversion embedding: put it in --embeddings"),
                         ("emb_params", "a textual-inversion embedding: put it in --embeddings"),
                         ("decoder.up", "a VAE: pass it as --vae"),
                         ("hypernetwork", "a hypernetwork, which this tool does not use")):
        if needle in text:
            return what
    shown = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
    return f"keys {shown}" if keys else "no tensors"


def _group(path: Path, tensors: dict[str, torch.Tensor], table: dict[str, str]) -> dict[str, dict]:
    """{module path: {"key", "kinds", "factors", "alpha"}} from the file's keys; unknown keys raise."""
    groups: dict[str, dict] = {}
    known = [k for k in tensors if _split(k) is not None]
    if not known:
        raise CheckpointError(f"{path} is not a LoRA this tool understands (looks like {_looks_like(sorted(tensors))})")
    for key in sorted(tensors):
        parts = _split(key)
        if parts is None:
            raise CheckpointError(f"LoRA {path}: key {key} is not a LoRA/LyCORIS factor this tool knows")
        module, suffix = parts
        target = table.get(canonical_module(module))
        if target is None:
            raise CheckpointError(f"LoRA {path}: key {key} names no layer of this SD v1 model "
                                  f"(a LoRA for another model, e.g. SDXL or SD 2.x?)")
        kind, role = SUFFIXES[suffix]
        g = groups.setdefault(target, {"key": module, "kinds": set(), "factors": {}, "alpha": None})
        if role == "dora_scale":
            raise CheckpointError(f"LoRA {path}: {key} is a DoRA magnitude, which this tool does not apply yet")
        if role == "alpha":
            g["alpha"] = _scalar(tensors[key], key, path)
            continue
        if role in g["factors"]:
            raise CheckpointError(f"LoRA {path}: two keys give {role} of layer {module} (one is {key})")
        g["kinds"].add(kind)
        g["factors"][role] = tensors[key]
    return groups


def _scalar(t: torch.Tensor, key: str, path: Path) -> float:
    if t.numel() != 1 or not t.is_floating_point() and t.dtype not in (torch.int32, torch.int64, torch.int16):
        raise CheckpointError(f"LoRA {path}: {key} should be one number, is a {t.dtype} tensor of shape {tuple(t.shape)}")
    value = float(t.reshape(()))
    if not math.isfinite(value):
        raise CheckpointError(f"LoRA {path}: {key} is {value}")
    return value


def _complete(kind: str, roles: set[str]) -> bool:
    if kind == "lokr":
        return all(w in roles or {w + "a", w + "b"} <= roles for w in ("w1", "w2")) and \
            ("t2" not in roles or {"w2a", "w2b"} <= roles)
    if kind == "full":
        return bool(roles)
    return REQUIRED[kind] <= roles and roles <= REQUIRED[kind] | OPTIONAL[kind]


def _adapters(path: Path, target: str, g: dict, shapes: dict[str, tuple[int, ...]]) -> list[Adapter]:
    module, kinds, factors = g["key"], g["kinds"], g["factors"]
    if len(kinds) != 1:
        what = " and ".join(sorted(kinds)) if kinds else "only an alpha"
        raise CheckpointError(f"LoRA {path}: layer {module} has {what}; expected the factors of one adapter")
    kind = kinds.pop()
    if not _complete(kind, set(factors)):
        raise CheckpointError(f"LoRA {path}: layer {module} has {kind} factors {', '.join(sorted(factors))}, "
                              "which do not form one adapter")
    for role, t in factors.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t.to(torch.float32)).all()):
            raise CheckpointError(f"LoRA {path}: {module} {role} is not finite floating-point data")
    out = []
    bias = factors.pop("diff_b", None)
    if bias is not None:
        out.append(_checked(path, module, target + ".bias", "full", {"diff": bias}, None, shapes))
    if factors:
        out.append(_checked(path, module, target + ".weight", kind, factors, g["alpha"], shapes))
    return out


def _checked(path: Path, module: str, target: str, kind: str, factors: dict, alpha, shapes) -> Adapter:
    empty = [r for r, t in factors.items() if t.numel() == 0]
    if empty:
        raise CheckpointError(f"LoRA {path}: {module} {empty[0]} is empty (shape {tuple(factors[empty[0]].shape)})")
    natural = _natural_shape(kind, factors)
    want = shapes.get(target)
    if want is None:
        raise CheckpointError(f"LoRA {path}: layer {module} has no {target.rsplit('.', 1)[1]} in this model")
    if natural is None:
        dims = ", ".join(f"{r} {tuple(t.shape)}" for r, t in sorted(factors.items()))
        raise CheckpointError(f"LoRA {path}: the factors of {module} do not fit together ({dims})")
    if not _fits(natural, want):
        raise CheckpointError(f"LoRA {path}: {module} gives a change of shape {natural}, but the layer is {want} "
                              "(a LoRA for another model?)")
    return Adapter(module, target, kind, dict(factors), alpha, want)


def read_lora(path: str | Path, layout: Layout) -> LoraFile:
    """The file at `path` as adapters of the model of `layout`; CheckpointError names what does not fit."""
    from sd_cli.weights.checkpoint import read_object

    path = Path(path)
    tensors = _tensors(read_object(path), path)
    peft = _peft_configs(path)
    adapters: list[Adapter] = []
    for target, g in _group(path, tensors, layout.table).items():
        if g["alpha"] is None and peft:
            g["alpha"] = _peft_alpha(peft, g)
        adapters += _adapters(path, target, g, layout.shapes)
    return LoraFile(path, tuple(sorted(adapters, key=lambda a: a.target)))


PEFT_PARTS = ("unet", "text_encoder")


def _peft_configs(path: Path) -> dict[str, dict]:
    """The PEFT LoraConfigs diffusers' `save_lora_weights` writes into a safetensors header
    (`lora_adapter_metadata`: JSON, keys "unet.r", "unet.lora_alpha", "unet.alpha_pattern", ...), by part;
    {} when there are none. Untrusted: anything malformed is an error naming the file."""
    import json

    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    from sd_cli.weights.checkpoint import _utf8_path

    try:
        with _utf8_path(path) as name, safe_open(name, framework="pt") as f:
            text = (f.metadata() or {}).get("lora_adapter_metadata")
    except Exception:  # noqa: BLE001 - read_object already read this file; no metadata then
        return {}
    if text is None:
        return {}
    try:
        meta = json.loads(text)
        assert isinstance(meta, dict)
        out = {part: {k[len(part) + 1:]: v for k, v in meta.items() if k.startswith(part + ".")} for part in PEFT_PARTS}
        for cfg in out.values():
            for key in ("lora_alpha", "r"):
                assert cfg.get(key) is None or isinstance(cfg[key], (int, float)) and cfg[key] > 0
            for key in ("alpha_pattern", "rank_pattern"):
                assert isinstance(cfg.get(key) or {}, dict)
        return out
    except (ValueError, AssertionError):
        raise CheckpointError(f"LoRA {path}: its lora_adapter_metadata is not a PEFT LoraConfig") from None


def _pattern_value(patterns: dict, name: str):
    """PEFT's per-module override: the pattern that `name` ends with (as a dotted suffix), or None."""
    import re

    for pattern, value in (patterns or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?({pattern})", name):
                return value
        except re.error:
            if name == pattern or name.endswith("." + pattern):
                return value
    return None


def _peft_alpha(peft: dict[str, dict], g: dict) -> float | None:
    """The alpha that makes our alpha / rank the PEFT scaling of this layer (lora_alpha / r, or
    lora_alpha / sqrt(r) with rsLoRA), from the file's LoraConfig; None where it says nothing."""
    module = g["key"]
    part = next((p for p in PEFT_PARTS if module.startswith(p + ".")), None)
    cfg = peft.get(part) if part else None
    down = g["factors"].get("down")
    if not cfg or down is None or down.dim() < 2:
        return None
    name = module[len(part) + 1:]
    alpha = _pattern_value(cfg.get("alpha_pattern"), name) or cfg.get("lora_alpha")
    if alpha is None:
        return None
    rank = down.shape[0]
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        return None
    return float(alpha) * math.sqrt(rank) if cfg.get("use_rslora") else float(alpha)
