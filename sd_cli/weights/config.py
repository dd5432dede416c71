"""YAML configs -> typed dataclasses. Configs hold numbers and names; code decides what to build.

Two layouts are read:
- ours (`configs/stable-diffusion/v1-inference.yaml`): `model.{unet,vae,text_encoder,schedule}` + `runtime`;
- CompVis' original `v1-inference.yaml` (`model.target`, `model.params.unet_config.params`, ...):
  its numbers are read and its `target:` import strings are only compared against known names,
  never imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sd_cli.errors import ConfigError
from sd_cli.model.ldm import SD_SCALE_FACTOR, ModelConfig, ScheduleConfig
from sd_cli.model.text_encoder import TextEncoderConfig
from sd_cli.model.unet import UNetConfig
from sd_cli.model.vae import VAEConfig

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
INPAINTING_CONFIG = "configs/stable-diffusion/v1-inpainting-inference.yaml"  # sd-v1-5-inpainting (9-channel UNet)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("full", "autocast")

# CompVis class paths that describe an SD v1.x model; anything else in a `target:` is refused.
_COMPVIS_TARGETS = {
    "model": {"ldm.models.diffusion.ddpm.LatentDiffusion"},
    "unet": {"ldm.modules.diffusionmodules.openaimodel.UNetModel"},
    "vae": {"ldm.models.autoencoder.AutoencoderKL"},
    "text": {"ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
}


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"
    precision: str = "autocast"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    source: str = "<built-in>"


def _bundled(name: str) -> Path | None:
    """The shipped config `name` (sd_cli/weights/configs; a checkout links configs/stable-diffusion there)."""
    try:
        path = resources.files("sd_cli.weights.configs") / name
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def resolve_config_path(path: str | Path) -> Path:
    """The file to read: `path` itself, or the packaged copy when a shipped config's path is relative
    and the current folder isn't a checkout (so `sd-txt2img` works from any folder)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute() and (bundled := _bundled(p.name)) is not None:
        return bundled
    if p.is_dir():
        raise ConfigError(f"config {p} is a folder, not a YAML file")
    raise ConfigError(f"config file {p} not found (shipped configs: v1-inference.yaml, v1-inference-cpu.yaml)")


def load_config(path: str | Path = DEFAULT_CONFIG) -> Config:
    from omegaconf import OmegaConf

    real = resolve_config_path(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(real), resolve=True)
    except Exception as err:  # omegaconf/yaml raise many types; all mean "not a usable YAML file"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"config {path} is not valid YAML: {first}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ConfigError(f"config {path} has no 'model' section; is it a Stable Diffusion v1 inference config?")
    try:
        if "target" in raw["model"] or "params" in raw["model"]:
            model = _from_compvis(raw["model"])
            runtime = RuntimeConfig()
        else:
            model = _from_ours(raw["model"])
            runtime = _build(RuntimeConfig, raw.get("runtime") or {}, "runtime")
    except ConfigError as err:
        raise ConfigError(f"config {path}: {err}") from None
    if runtime.device not in DEVICES:
        raise ConfigError(f"config {path}: runtime.device must be one of {', '.join(DEVICES)}, not {runtime.device!r}")
    if runtime.precision not in PRECISIONS:
        raise ConfigError(f"config {path}: runtime.precision must be full or autocast, not {runtime.precision!r}")
    return Config(model=model, runtime=runtime, source=str(real))


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """cls(**values) with unknown keys and wrong kinds reported as one ConfigError line."""
    if not isinstance(values, dict):
        raise ConfigError(f"'{where}' must be a mapping")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) in '{where}': {', '.join(unknown)}")
    kwargs = {}
    for key, value in values.items():
        default = names[key].default
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"'{where}.{key}' must be a list")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"'{where}.{key}' must be true or false")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"'{where}.{key}' must be a number, not {value!r}")
            value = type(default)(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"'{where}.{key}' must be a string")
        kwargs[key] = value
    return cls(**kwargs)


def _from_ours(m: dict[str, Any]) -> ModelConfig:
    family = m.get("family", "sd1")
    if family != "sd1":
        raise ConfigError(f"model.family {family!r} is not supported (sd-txt2img runs sd1)")
    return ModelConfig(
        unet=_build(UNetConfig, m.get("unet") or {}, "model.unet"),
        vae=_build(VAEConfig, m.get("vae") or {}, "model.vae"),
        text=_build(TextEncoderConfig, m.get("text_encoder") or {}, "model.text_encoder"),
        schedule=_build(ScheduleConfig, m.get("schedule") or {}, "model.schedule"),
        scale_factor=float(m.get("scale_factor", SD_SCALE_FACTOR)),
        norm_groups=_norm_groups(m.get("norm_groups", 32)),
    )


def _norm_groups(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"'model.norm_groups' must be a positive integer, not {value!r}")
    return value


def _check_target(section: dict[str, Any], kind: str, where: str) -> None:
    target = section.get("target")
    if target is not None and target not in _COMPVIS_TARGETS[kind]:
        raise ConfigError(f"{where}.target {target!r} is not a Stable Diffusion v1 component (nothing is imported)")


def _pick(params: dict[str, Any], cls: type, where: str, rename: dict[str, str] | None = None) -> Any:
    """Take the keys of `params` that `cls` knows (CompVis params carry training-only extras)."""
    rename = rename or {}
    known = {f.name for f in dataclasses.fields(cls)}
    values = {rename.get(k, k): v for k, v in params.items() if rename.get(k, k) in known}
    return _build(cls, values, where)


def _from_compvis(m: dict[str, Any]) -> ModelConfig:
    _check_target(m, "model", "model")
    p = m.get("params") or {}
    unet_sec = p.get("unet_config") or {}
    vae_sec = p.get("first_stage_config") or {}
    text_sec = p.get("cond_stage_config") or {}
    _check_target(unet_sec, "unet", "unet_config")
    _check_target(vae_sec, "vae", "first_stage_config")
    _check_target(text_sec, "text", "cond_stage_config")
    up = unet_sec.get("params") or {}
    if not up.get("use_spatial_transformer", True):
        raise ConfigError("unet_config without spatial transformers is not an SD v1 text-to-image model")
    if p.get("parameterization", "eps") != "eps":
        raise ConfigError(f"parameterization {p['parameterization']!r} is not supported (SD v1 predicts eps)")
    vp = vae_sec.get("params") or {}
    dd = dict(vp.get("ddconfig") or {})
    if "embed_dim" in vp:
        dd["embed_dim"] = vp["embed_dim"]
    return ModelConfig(
        unet=_pick(up, UNetConfig, "unet_config.params"),
        vae=_pick(dd, VAEConfig, "first_stage_config.params.ddconfig"),
        text=TextEncoderConfig(),
        schedule=_pick(p, ScheduleConfig, "model.params"),
        scale_factor=float(p.get("scale_factor", SD_SCALE_FACTOR)),
    )
