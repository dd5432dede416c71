"""Brownian-tree noise for the SDE samplers (DPM++ SDE, 2M SDE, 3M SDE), as A1111 and ComfyUI use it.

The SDE samplers need, for each step sigma -> sigma_next (and for DPM++ SDE also for the half step
inside it), the increment of ONE Brownian motion W over that interval, normalized to unit variance:

    noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)

Overlapping queries (DPM++ SDE asks for [s, s_mid] and [s, s_next]) are then correlated as the SDE
needs, and the path, a function of the seed alone, does not depend on the step count's query order:
the same seed at 20 or 30 steps walks the same Brownian path. The path comes from torchsde's
BrownianTree (a Brownian bridge refined by binary search down to tol = 1e-6, its random numbers
from numpy's SeedSequence of `entropy`) on [sigma_min, sigma_max] of the sampler's sigma list, on
the CPU in float32, one tree for the whole batch tensor, seeded with the image's seed: what
k-diffusion's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed) does on a CPU tensor
(ComfyUI passes cpu=True and the KSampler seed; A1111 a per-image seed list, the same for batch 1).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from sd_cli.errors import SdCliError


def seed_of(generator):
    """The seed the Brownian tree uses: the generator's initial seed (what the image was seeded with), a
    list of them for a list of per-image generators; without a generator a random one from torch's global
    generator, as k-diffusion does."""
    if isinstance(generator, (list, tuple)):
        return [int(g.initial_seed()) for g in generator]
    if generator is not None:
        return int(generator.initial_seed())
    return int(torch.randint(0, 2**63 - 1, ()).item())


class BrownianNoise:
    """noise(sigma, sigma_next): the normalized Brownian increment over [sigma_next, sigma], shaped like x.

    x: the latents (their shape, device and dtype are used; the tree itself is CPU float32).
    sigma_min, sigma_max: the interval the tree covers (smallest nonzero and largest sigma the sampler
    visits). seed: the tree's entropy.
    """

    def __init__(self, x: Tensor, sigma_min: float, sigma_max: float, seed: int):
        try:
            import torchsde
        except ImportError:
            raise SdCliError("the SDE samplers need torchsde (pip install torchsde)") from None
        self.lo, self.hi = float(sigma_min), float(sigma_max)
        if not 0.0 < self.lo < self.hi:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.lo}, {self.hi}")
        self.shape, self.device, self.dtype = x.shape, x.device, x.dtype
        if isinstance(seed, (list, tuple)):  # one tree per image, each seeded with its own seed (A1111)
            w0 = torch.zeros((1, *x.shape[1:]), dtype=torch.float32)
            self.trees = [torchsde.BrownianTree(self.lo, w0, self.hi, entropy=int(s)) for s in seed]
        else:
            w0 = torch.zeros(x.shape, dtype=torch.float32)  # CPU float32 whatever x is
            self.trees = [torchsde.BrownianTree(self.lo, w0, self.hi, entropy=int(seed))]

    @classmethod
    def for_sigmas(cls, x: Tensor, sigmas: list[float], seed: int) -> "BrownianNoise":
        """The tree over the sampler's own sigma list (k-diffusion: sigmas[sigmas > 0].min(), max)."""
        positive = [s for s in sigmas if s > 0]
        return cls(x, min(positive), max(positive), seed)

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        a, b = float(sigma), float(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to 6 decimals (its tol) and clamps queries outside them,
            # warning each time: sigma_min = 0.0291675 lies below the rounded 0.029168. k-diffusion
            # (A1111, ComfyUI) hits the same clamp; the numbers are the reference's, the warning is noise.
            warnings.filterwarnings("ignore", message="Should have (ta|tb)", category=UserWarning)
            w = torch.cat([tree(lo, hi) for tree in self.trees])  # W(hi) - W(lo), CPU float32
        w = w * sign / math.sqrt(abs(b - a))  # (W(sigma_next) - W(sigma)) / sqrt|...|
        return w.to(self.device, self.dtype)
