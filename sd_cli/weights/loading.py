"""Checkpoint file -> ready LatentDiffusion on a device, with a strict key check.

1. read the tensors (safely: checkpoint.read_state_dict never runs code from the file)
2. refuse other model families (detect.require_sd1)
3. build the module tree on the meta device (no memory, no random init)
4. match keys: the file's tensors + derived schedule buffers + position_ids must equal the model's
   keys exactly; missing/unexpected/mis-shaped keys are one clear error listing some of them
5. convert tensor by tensor to the compute dtype/device and assign (never two full copies); a tensor with
   NaN/inf values (in the file, or overflowing the compute dtype) is one clear error naming it
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sd_cli.weights.checkpoint import read_state_dict
from sd_cli.weights.detect import require_sd1
from sd_cli.weights.keys import key_differences
from sd_cli.errors import CheckpointError
from sd_cli.model.ldm import SCHEDULE_KEYS, LatentDiffusion, ModelConfig
from sd_cli.sampling.schedule import ldm_buffers
from sd_cli.weights.precision import dtype_name

log = logging.getLogger(__name__)

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def build_meta_model(cfg: ModelConfig) -> LatentDiffusion:
    """The full module tree with no storage: parameters and buffers live on the meta device."""
    with torch.device("meta"):
        return LatentDiffusion(cfg)


def match_state_dict(model: LatentDiffusion, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise CheckpointError unless `sd` has exactly the model's learned tensors with the right shapes."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    derived = set(SCHEDULE_KEYS) | {POSITION_IDS}
    differences = key_differences(expected, sd, frozenset(derived))
    if differences:
        raise CheckpointError(f"{path} does not fit the SD v1 model of this config: keys {differences}")
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs config {tuple(shape)}"
        for k, shape in expected.items()
        if k in sd and k not in derived and tuple(sd[k].shape) != tuple(shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{path} does not match the config's model sizes ({len(wrong)} tensors differ, e.g. {wrong[0]}); "
            "is --config the right one for this checkpoint?"
        )


def all_finite(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """No NaN or inf in float tensor `t`, and every value within `dtype`'s range (default: t's own).
    One min/max pass (NaN propagates through it): about 10x faster than isfinite().all() on the CPU,
    and no mask of t's size."""
    if t.numel() == 0:
        return True
    big = torch.finfo(dtype or t.dtype).max
    lo, hi = torch.aminmax(t)
    return bool(lo >= -big) and bool(hi <= big)


def _non_finite_message(path: str | Path, key: str, source: torch.Tensor, dtype: torch.dtype) -> str:
    """Why tensor `key` is not finite after conversion: bad values in the file, or too big for `dtype`."""
    values = source.to(torch.float32)
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        n_nan = int(torch.isnan(values).sum())
        what = ", ".join(part for part in (f"{n_nan} NaN" if n_nan else "", f"{bad - n_nan} inf" if bad - n_nan else "") if part)
        return (f"checkpoint {path}: tensor {key} holds {what} value(s) of {values.numel()}; "
                "the file is corrupt or was badly converted")
    biggest = float(values.abs().max())
    name = dtype_name(dtype)
    return (f"checkpoint {path}: tensor {key} has values up to {biggest:.3g}, too large for {name}; "
            "use --precision full (float32)")


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (never discards data: a later read refetches)


def _libc_madvise():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()
_PAGE = 4096


def release_pages(t: torch.Tensor) -> None:
    """Hint the kernel that the CPU memory under `t` (a tensor already converted and about to be dropped)
    is no longer needed, so the file pages of a memory-mapped checkpoint leave this process's resident
    set tensor by tensor instead of all at the end of loading. Only whole pages inside `t`'s bytes are
    advised, with MADV_PAGEOUT, which reclaims clean file pages and never changes what a later read sees
    (anonymous memory without swap just stays). A no-op where unsupported."""
    if _MADVISE is None or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = -(-start // _PAGE) * _PAGE
    last = end // _PAGE * _PAGE
    if last > first:
        _MADVISE(first, last - first, _MADV_PAGEOUT)


def load_model(
    cfg: ModelConfig, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    channels_last: bool | None = None, vae: str | Path | None = None,
) -> LatentDiffusion:
    """The model of `cfg` with the weights of checkpoint `path`, in `dtype` on `device`, ready for
    inference (see `prepare_for_inference`: channels-last layout per `channels_last`, default `CHANNELS_LAST`).
    Peak memory: the converted model plus about one tensor (file pages are released as we go).
    `vae`: a VAE file whose tensors replace the checkpoint's (`vae_file`)."""
    device = torch.device(device)
    sd = read_state_dict(path)  # 1.
    require_sd1(sd, str(path), cfg.inpainting)  # 2.
    model = build_meta_model(cfg)  # 3.
    if vae is not None:
        sd = _with_vae(sd, model, vae)
    match_state_dict(model, sd, path)  # 4.

    # 5. One tensor at a time: the file's (mmap'd or unpickled) copy is dropped as soon as it's converted.
    derived = {k: v for k, v in ldm_buffers(cfg.schedule.linear_start, cfg.schedule.linear_end, cfg.schedule.timesteps).items()}
    n_pos = cfg.text.max_position_embeddings
    derived[POSITION_IDS] = torch.arange(n_pos, dtype=torch.int64).unsqueeze(0)  # files may lack or corrupt it
    full: dict[str, torch.Tensor] = {}
    nhwc = CHANNELS_LAST if channels_last is None else channels_last
    nhwc_prefixes = ("model.diffusion_model.", "first_stage_model.") if nhwc else ()
    for key in list(model.state_dict().keys()):
        if key in derived:
            full[key] = derived[key].to(device)
            sd.pop(key, None)
            continue
        t = sd.pop(key)
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key} has dtype {t.dtype}, expected floating point")
        # copy=True: a fresh, aligned tensor. Tensors memory-mapped from a file can sit at any byte
        # offset, and CPU kernels take other (numerically different) paths on unaligned data, which
        # would make .ckpt and .safetensors copies of one model give different images.
        # Conv kernels of a channels-last part are laid out NHWC right here: converting after loading
        # would hold both layouts at once (bench/results/NOTES.md).
        fmt = torch.channels_last if t.dim() == 4 and key.startswith(nhwc_prefixes) else torch.preserve_format
        converted = t.to(device=device, dtype=dtype, copy=True, memory_format=fmt)
        if not all_finite(converted):  # NaN/inf weights: refuse, naming the tensor
            raise CheckpointError(_non_finite_message(path, key, t, dtype))
        full[key] = converted
        if t.is_contiguous():
            release_pages(t)
        del t
    model.load_state_dict(full, strict=True, assign=True)
    model.eval().requires_grad_(False)
    prepare_for_inference(model, nhwc)
    log.debug("loaded %s: %d tensors as %s on %s", path, len(full), dtype, device)
    return model


def _with_vae(sd: dict[str, torch.Tensor], model: LatentDiffusion, vae: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with its VAE replaced by the file `vae`'s (checked against the model)."""
    from sd_cli.weights.vae_file import PREFIX, vae_tensors

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(PREFIX)}
    replacement = vae_tensors(vae, expected)
    return {**{k: v for k, v in sd.items() if not k.startswith(PREFIX)}, **replacement}


# The UNet and the VAE run channels-last (NHWC) unless `channels_last=False` says otherwise: faster for both
# on the CPU (the VAE only because layers.GroupNorm32 keeps torch's native NHWC kernel) and cuDNN's
# tensor-core convs are NHWC-native (figures: bench/results/NOTES.md).
CHANNELS_LAST = True


def prepare_for_inference(model: torch.nn.Module, channels_last: bool | None = None):
    """Runtime layout on a loaded model (or a bare UNet/VAE): channels-last activations per
    `channels_last` (True/False for both parts; None: `CHANNELS_LAST`). Values are unchanged up to float
    rounding (different conv kernels)."""
    from sd_cli.model.layers import use_channels_last
    from sd_cli.model.unet import UNetModel
    from sd_cli.model.vae import AutoencoderKL

    for m in model.modules():
        if isinstance(m, (UNetModel, AutoencoderKL)):
            use_channels_last(m, CHANNELS_LAST if channels_last is None else channels_last)
    return model
