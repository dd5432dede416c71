"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598), in one place.

    eps = eps_uncond + scale * (eps_cond - eps_uncond)

computed from ONE batched UNet call on [uncond; cond] (CompVis order: unconditional half
first), so guidance costs one call per sampler evaluation, at twice the batch.

Guidance in a limited interval (Kynkaanniemi et al. 2024, arXiv:2404.07724): with `cfg_interval`
(LO, HI) the guided call is made only while LO <= sigma <= HI, and eps = eps_cond (one call at
batch B) outside. The eps-model sees the timestep t, not sigma: sigma is read back from t with the
samplers' own map (`schedule.t_to_sigma`, log-linear between the model's discrete sigmas
sqrt((1 - a_t) / a_t), the inverse of the `sigma_to_t` the k-samplers call with; DDIM, PLMS and LCM
call at integer t, where it is the discrete sigma itself).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from torch import Tensor

from sd_cli.errors import UsageError
from sd_cli.sampling import schedule
from sd_cli.sampling.samplers import EpsModel

# unet(x (N,C,h,w), t (N,) float, context (N,77,D)) -> eps (N,C,h,w)
ConditionalUNet = Callable[[Tensor, Tensor, Tensor], Tensor]


def _match_batch(ctx: Tensor, batch: int, what: str) -> Tensor:
    """Context for `batch` images: as is, or a single (1,77,D) row repeated."""
    if ctx.shape[0] == batch:
        return ctx
    if ctx.shape[0] == 1:
        return ctx.expand(batch, *ctx.shape[1:])
    raise ValueError(f"{what} has batch {ctx.shape[0]}, latents have batch {batch}")


def _at(ctx, call: int) -> Tensor:
    """The context of UNet call `call`: a fixed tensor, or a prompt-editing schedule's rows."""
    return ctx if isinstance(ctx, Tensor) else ctx.at(call)


def sigma_at(t: Tensor, sigmas: Tensor) -> float:
    """The noise level of a call at timesteps t (N,) (all equal, as the samplers call): `t_to_sigma` of
    t[0] over the model's discrete sigmas (n,) ascending."""
    return float(schedule.t_to_sigma(t[0].item(), sigmas))


def guided_eps_model(unet: ConditionalUNet, cond, uncond, scale: float, *,
                     cfg_interval: tuple[float, float] | None = None, sigmas: Tensor | None = None,
                     uncond_unet: ConditionalUNet | None = None) -> EpsModel:
    """An `EpsModel` for the samplers: the UNet with the prompt context and guidance folded in.

    cond, uncond: (B,77,D) text embeddings (or (1,77,D), repeated over the batch), or a
        `conditioning.Scheduled` (prompt editing) whose context depends on how many calls came before.
    scale != 1 with an uncond: one call on cat([x, x]), cat([t, t]), cat([uncond, cond]),
        eps = e_u + scale * (e_c - e_u);
    scale == 1 or uncond None: one call on cond alone (batch B), the guidance term vanishes.
    cfg_interval (LO, HI) with `sigmas` (the model's discrete sigmas (n,), ascending): the guided call
        only while LO <= sigma(t) <= HI, else one call on cond alone, eps = e_c (module docstring).
    uncond_unet: the guided call as two calls at batch B, uncond through `uncond_unet`, cond through `unet`
        (DeepCache with an interval: one cache stream each, the cond one called at every evaluation).
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise UsageError(f"guidance scale must be a finite number, got {scale}")
    if cfg_interval is not None and sigmas is None:
        raise ValueError("a guidance interval needs the model's sigmas")
    guided = uncond is not None and scale != 1.0
    lo, hi = cfg_interval if cfg_interval is not None else (0.0, math.inf)
    calls = itertools.count()  # A1111's step counter: one per model evaluation, from 0

    def eps_model(x: Tensor, t: Tensor) -> Tensor:
        b, call = x.shape[0], next(calls)
        c = _match_batch(_at(cond, call), b, "cond")
        if not guided or cfg_interval is not None and not lo <= sigma_at(t, sigmas) <= hi:
            return unet(x, t, c)
        u = _match_batch(_at(uncond, call), b, "uncond")
        if uncond_unet is not None or u.shape[1] != c.shape[1]:  # (different chunk counts: two calls, as A1111)
            e_u, e_c = (uncond_unet or unet)(x, t, u), unet(x, t, c)
            return e_u + scale * (e_c - e_u)
        out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c]))  # (2B,C,h,w)
        e_u, e_c = out.chunk(2)  # (B,C,h,w) each
        return e_u + scale * (e_c - e_u)

    return eps_model
