"""Decoder output to uint8 pixels, and the grid of a run's images (as torchvision's make_grid).

`to_uint8` rounds to the nearest level; CompVis truncated (`astype(np.uint8)`), which made every
pixel up to one level darker (mid-grey 0.0 gives 128 here, 127 there).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) in [-1, 1], any dtype/device -> (B, H, W, 3) uint8 on the CPU.

    value = round(clamp((x + 1) / 2, 0, 1) * 255), computed in float32 on ``x``'s device and
    rounded half-to-even (``torch.round``). CompVis truncated instead; see the module docstring.
    NaN (e.g. an fp16 VAE overflow) becomes 0 (black) so the result is defined; +/-inf clamp
    to 255 / 0.
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"to_uint8 expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"to_uint8 expects a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    with torch.no_grad():
        y = (x.detach().to(torch.float32) + 1.0) / 2.0
        y = torch.nan_to_num(y, nan=0.0)
        y = y.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def make_grid(images: np.ndarray, n_rows: int, padding: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images like ``torchvision.utils.make_grid(nrow=n_rows, padding,
    pad_value=0)``.

    As in torchvision (and CompVis's ``--n_rows``), ``n_rows`` is the number of images per
    *row*: columns = min(n_rows, N), rows = ceil(N / columns). Every cell is (H + padding) x
    (W + padding) with one extra ``padding`` strip on the right and bottom, so the result is
    (rows * (H + padding) + padding, columns * (W + padding) + padding, C), black where no
    image is. Like torchvision, a single image (N == 1) is returned as it is, without padding.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"make_grid expects (N, H, W, C) images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"make_grid expects uint8 images, got {images.dtype}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if int(n_rows) < 1:
        raise ValueError(f"n_rows must be at least 1, got {n_rows}")
    if int(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n_rows, padding = int(n_rows), int(padding)
    if n == 1:
        return images[0].copy()
    cols = min(n_rows, n)
    rows = int(math.ceil(n / cols))
    cell_h, cell_w = h + padding, w + padding
    grid = np.zeros((rows * cell_h + padding, cols * cell_w + padding, c), dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, cols)
        top, left = r * cell_h + padding, col * cell_w + padding
        grid[top : top + h, left : left + w] = images[k]
    return grid


def check_rgb_uint8(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{what} expects an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
    return img
