"""Small building blocks shared by the UNet and the VAE.

Names of submodules follow the LDM checkpoint (`norm`, `proj_in`, `to_q`, ...) so that
`state_dict()` keys equal the keys in a Stable Diffusion v1.x file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as LDM does), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """32 groups, affine, as everywhere in SD v1 (UNet uses eps 1e-5, VAE and attention norms 1e-6)."""
    return GroupNorm32(32, channels, eps=eps, affine=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, N, heads*d) inputs -> (B, N, heads*d).

    Scale 1/sqrt(d) (SDPA's default, the same as LDM's `dim_head ** -0.5`). SDPA picks a fused
    kernel, so the (N x M) score matrix is never materialised in full where a kernel allows it.
    """
    b, n, inner = q.shape
    d = inner // heads
    q = q.view(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)  # (B, heads, M, d)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)  # (B, heads, M, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(b, n, inner)
