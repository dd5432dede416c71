"""Small building blocks shared by the UNet and the VAE.

Names of submodules follow the LDM checkpoint (`norm`, `proj_in`, `to_q`, ...) so that
`state_dict()` keys equal the keys in a Stable Diffusion v1.x file.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn


def inplace_ok() -> bool:
    """Whether an op may overwrite a tensor that nothing else holds (a layer's fresh output).

    Without autograd recording (inference) it always may, and that saves one full-size allocation per
    op: on the CPU every large allocation is fresh pages from the kernel, and faulting them in can cost more
    than the op itself (figures: bench/results/NOTES.md). While autograd records (training), never: backward may need the old values.
    """
    return not torch.is_grad_enabled()


def silu_fresh(x: torch.Tensor) -> torch.Tensor:
    """silu(x) for an `x` nothing else holds (a norm's output): in place where `inplace_ok`."""
    return F.silu(x, inplace=inplace_ok())


def add_fresh(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, written into `fresh` (a layer's output nothing else holds) where `inplace_ok`.
    The same numbers either way; `fresh` must already have the result's shape and dtype."""
    return fresh.add_(other) if inplace_ok() else fresh + other


def mul_fresh(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh * other, written into `fresh` where `inplace_ok` (as `add_fresh`)."""
    return fresh.mul_(other) if inplace_ok() else fresh * other


class FreshSiLU(nn.Module):
    """nn.SiLU for the place right after a norm (`silu_fresh`); no parameters, so checkpoint keys keep
    their indices (`in_layers.2` is still the conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_fresh(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with its statistics accumulated in float32 whatever the input dtype (as LDM's).

    LDM upcasts half-precision inputs to float32 around `F.group_norm`. torch's own CPU and CUDA
    group_norm kernels already accumulate mean and variance of bf16/fp16 inputs in float32 and
    round the result once, so the explicit upcast only adds two full-tensor copies (3x slower, outputs
    within one bf16 rounding: bench/results/NOTES.md). On channels-last CPU input see `forward`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != x.dtype:  # e.g. an fp32 norm on bf16 activations
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        if x.device.type == "cpu" and memory_format_of(x) == torch.channels_last:
            # torch's CPU kernel for channels-last input takes the variance as E[x^2] - E[x]^2 in float32,
            # which cancels when a group's mean is large against its spread (measured: 1e-2 error at
            # mean/std = 50 vs 8e-6 for the NCHW kernel), but it is 15x faster than the two layout copies
            # the NCHW kernel needs. So it is kept whenever the statistics it returns show it was precise:
            # - bf16/fp16: while |mean| / std <= HALF_NHWC_MAX_RATIO its error stays under the output's
            #   own rounding;
            # - float32: each group is first shifted by an estimate of its mean from a 1/16 subsample (a
            #   group norm is unchanged by a per-group shift), which leaves |mean| / std near 0, where the
            #   kernel is as precise as the NCHW one; past FP32_NHWC_MAX_RATIO it is not kept.
            # Anything not kept is normalised in NCHW and handed back channels-last.
            n, c = x.shape[:2]
            if x.dtype in (torch.bfloat16, torch.float16):
                xs, bound = x, HALF_NHWC_MAX_RATIO
            elif x.dtype == torch.float32:
                xs, bound = x - self._group_mean_estimate(x), FP32_NHWC_MAX_RATIO
            else:
                xs = None
            if xs is not None:
                out, mean, rstd = torch.native_group_norm(xs, weight, bias, n, c, x[0, 0].numel(), self.num_groups, self.eps)
                if float((mean.detach().float().abs() * rstd.detach().float()).amax()) <= bound:
                    return out
            out = F.group_norm(x.contiguous(), self.num_groups, weight, bias, self.eps)
            return out.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def _group_mean_estimate(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 1, 1): each group's mean over every 4th row and column (1/16 of the tensor), per channel."""
        n, c = x.shape[:2]
        sub = x[:, :, ::4, ::4].mean(dim=(2, 3))  # (N, C)
        per_group = sub.view(n, self.num_groups, c // self.num_groups).mean(dim=2)  # (N, G)
        return per_group.repeat_interleave(c // self.num_groups, dim=1)[:, :, None, None]


# Largest |group mean| / group std at which torch's channels-last CPU group_norm is used on bf16/fp16
# input. Measured error of that kernel against float64: 0.19 at ratio 50 (bf16); the variance error grows
# as ratio^2, so at 8 it is ~40x smaller, well under one bf16 rounding of the output (1/128 relative).
HALF_NHWC_MAX_RATIO = 8.0
# The same bound for float32 input after its per-group shift. Measured against float64 on (2, 320, 64, 64):
# max error 3.8e-6 at ratio 0 and 8e-6 at 1 (NCHW kernel: 1.7e-6 and 2.1e-6), 7e-5 at 3, 6e-4 at 8.
FP32_NHWC_MAX_RATIO = 0.5


_NORM_GROUPS = [32]


@contextlib.contextmanager
def norm_groups(groups: int):
    """Build models whose GroupNorms have `groups` groups (SD v1: 32; the tiny demo model uses fewer, since
    32 groups of its 32 channels would be per-channel norms that erase every flat color)."""
    _NORM_GROUPS.append(int(groups))
    try:
        yield
    finally:
        _NORM_GROUPS.pop()


def group_norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """32 groups (or those of `norm_groups`), affine, as everywhere in SD v1 (UNet uses eps 1e-5, VAE and
    attention norms 1e-6). The group count is not stored in a checkpoint; the config says it."""
    return GroupNorm32(_NORM_GROUPS[-1], channels, eps=eps, affine=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, N, heads*d) inputs -> (B, N, heads*d).

    Scale 1/sqrt(d) (SDPA's default, the same as LDM's `dim_head ** -0.5`); see `sdpa` for the kernel.
    """
    b, n, inner = q.shape
    d = inner // heads
    q = q.view(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)  # (B, heads, M, d)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)  # (B, heads, M, d)
    out = sdpa(q, k, v)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(b, n, inner)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, H, N, d), (B, H, M, d), (B, H, M, d) -> (B, H, N, d).

    torch's `scaled_dot_product_attention` (a fused kernel: the (N x M) scores never exist in full),
    except for large bf16 attentions on a CPU without AMX, where `attention_in_rows` is faster.
    """
    if _rows_pay_off(q, k, v):
        return attention_in_rows(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


# `attention_in_rows` is used for bf16 on a CPU without AMX-BF16 when N * M reaches this (the 32x32 and
# 64x64 latent self-attentions of SD at 256-512 px, the VAE's). None: never (benchmarks compare the two).
ROWS_MIN_SCORES: int | None = 1024 * 1024
# Scores per block of rows: 512 rows of 4096 keys, 2 MiB in bf16, about one core's L2.
ROWS_BLOCK_SCORES = 512 * 4096
# Every ROWS_MAX_STRIDE-th key estimates a query's largest logit (step 1 of `attention_in_rows`).
ROWS_MAX_STRIDE = 16


def _rows_pay_off(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (ROWS_MIN_SCORES is not None and q.device.type == "cpu" and q.dtype == torch.bfloat16
            and q.shape[-2] * k.shape[-2] >= ROWS_MIN_SCORES
            and not (q.requires_grad or k.requires_grad or v.requires_grad) and not _cpu_has_amx_bf16())


@functools.lru_cache(maxsize=None)
def _cpu_has_amx_bf16() -> bool:
    from sd_cli.model.cpu import cpu_features

    return cpu_features().amx_bf16


def attention_in_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention as `sdpa`, one head and one block of query rows at a time, with two bf16 GEMMs.

    Why: without AMX, torch's fused CPU kernel runs bf16 at float32 speed (its GEMMs convert), while a
    plain bf16 `mm` uses AVX512-BF16 (faster at the UNet's and the VAE's shapes: bench/results/NOTES.md).

    A bf16 GEMM rounds its output, the scores, to 8 bits, which costs precision where it matters, at a
    row's largest logits (a logit of 40 is off by up to 0.125, 13% after exp). So the GEMM subtracts an
    estimate of each row's largest logit itself, through one extra column: [q, -top] @ [k, 1]^T =
    q k^T - top, accumulated in float32 and only then rounded, so the scores that dominate the softmax
    are near 0, where bf16 is fine. Softmax does not change under a per-row shift, so the estimate need
    not be exact. Error against float64 with peaked logits (std 4): 1.25x that of the fused kernel
    (unshifted: 2.2x).
    """
    b, h, n, d = q.shape
    m = k.shape[-2]
    q = (q * d ** -0.5).reshape(b * h, n, d)
    k = k.reshape(b * h, m, d)
    v = v.reshape(b * h, m, d)
    # 1. Each query's largest logit, estimated from every ROWS_MAX_STRIDE-th key: (BH, N, 1).
    top = torch.bmm(q, k[:, ::ROWS_MAX_STRIDE].transpose(1, 2)).amax(dim=-1, keepdim=True)
    # 2. One more column and row so that the GEMM subtracts it: (BH, N, d+1) and (BH, d+1, M).
    qa = torch.cat([q, -top], dim=-1)
    ka = torch.cat([k, k.new_ones(b * h, m, 1)], dim=-1).transpose(1, 2).contiguous()
    # 3. Per head and block of rows: shifted scores (rows, M) in bf16, softmax (float32 inside), times v.
    out = v.new_empty(b * h, n, d)
    rows = max(1, ROWS_BLOCK_SCORES // m)
    for j in range(b * h):
        for i in range(0, n, rows):
            scores = torch.mm(qa[j, i:i + rows], ka[j])  # (rows, M)
            torch.mm(torch.softmax(scores, dim=-1), v[j], out=out[j, i:i + rows])
    return out.view(b, h, n, d)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-D tensor, else contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def use_channels_last(module: nn.Module, on: bool = True) -> nn.Module:
    """Store 4-D weights and run activations of `module` (a UNetModel or AutoencoderKL, which read
    their `memory_format` attribute) channels-last (NHWC) or back to contiguous NCHW.

    oneDNN (CPU) and cuDNN (CUDA, tensor cores) run convolutions natively in NHWC; in NCHW they
    reorder around every conv. Values are unchanged; only the memory layout differs.
    """
    fmt = torch.channels_last if on else torch.contiguous_format
    module.to(memory_format=fmt)
    for m in module.modules():
        if isinstance(getattr(type(m), "memory_format", None), torch.memory_format):
            m.memory_format = fmt
    return module
