"""Latents -> pixels through the VAE decoder, with bounded memory for large images, and never NaN/black.

Where the memory goes: the decoder's activations grow with the output size (at 1024x1024 its top level
holds several (B, 128..256, 1024, 1024) tensors), its latent-resolution part is small. Two ways to cap it:

* "bands" (`--vae-tiling on`, and `auto` above 512x512 px): EXACT. The decoder runs level by level; each
  3x3 conv of the upsampling levels is computed in row bands (with one halo row each side) straight from
  its normalised input, so no full-size temporary (normalised copy, SiLU output, nearest-upsampled
  input) ever exists; every GroupNorm uses the statistics of the whole image (two passes over the bands:
  mean, then centred squares). The result equals the untiled decode up to float rounding (tests:
  max |diff| / max |image| < 1e-5 in float32), so there are no seams and no colour shifts. It needs about two
  thirds of the untiled decode's memory (bench/results/NOTES.md); the floor is the few full-size
  activations a ResnetBlock needs (input, hidden, output).
* "tiles" (`--vae-tiling tiles`): LOWEST MEMORY, APPROXIMATE. The rest of the decoder after the mid block
  runs on overlapping latent tiles of at most TILE x TILE cells (512 px), blended with weights that ramp
  linearly across each overlap (after a margin dropping the tile edge), so there is no hard edge; about a
  quarter of the untiled decode's memory. Each tile's GroupNorms use the tile's own statistics, as diffusers' and
  AUTOMATIC1111's tiled decoders do, which shifts colour/contrast between tiles on some images.

conv_in and the mid block (whose self-attention is the one truly global layer) always run on the whole
latent: at latent resolution they are small.

Non-finite output: a half-precision VAE can overflow (fp16 especially). `LatentDecoder` checks the pixels;
if they are not finite while the latents are, it converts the VAE to float32 (for the rest of the run),
decodes again, and says so once through `on_warning`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from sd_cli.weights.precision import dtype_name

TILE = 64  # latent cells per tile side, at most (64 cells = 512 px)
OVERLAP = 16  # latent cells shared by neighbouring tiles, at least (128 px)
MARGIN = 2  # latent cells at each tile's inner edge that get weight 0 (16 px)
AUTO_MAX_PIXELS = 512 * 512  # auto mode tiles images larger than this
MODES = ("auto", "on", "tiles", "off")


def decode_method(mode: str, height: int, width: int) -> str:
    """How to decode an image of height x width pixels in `mode`: "whole", "bands" or "tiles"."""
    if mode not in MODES:
        raise ValueError(f"vae tiling mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "bands" if height * width > AUTO_MAX_PIXELS else "whole"
    return {"on": "bands", "tiles": "tiles", "off": "whole"}[mode]


def use_tiling(mode: str, height: int, width: int) -> bool:
    """Whether an image of height x width pixels is decoded in pieces (bands or tiles) in `mode`."""
    return decode_method(mode, height, width) != "whole"


# ------------------------------------------------------------------------------------------------
# Overlapping tiles, blended (approximate GroupNorm statistics).


def axis_tiles(length: int, tile: int = TILE, overlap: int = OVERLAP) -> list[tuple[int, int]]:
    """(start, size) of the tiles covering `length` cells: as few as possible, all the same size
    (<= tile), evenly spaced, consecutive ones sharing >= overlap cells."""
    if not 0 <= 2 * overlap < tile:
        raise ValueError(f"need 0 <= 2 * overlap < tile, got tile {tile}, overlap {overlap}")
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)
    starts = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return [(s, size) for s in starts]


def _ramp(n: int, margin: int) -> torch.Tensor:
    """(n,) weights rising from 0 to 1: 0 on the first `margin` values, linear in between, 1 at the end
    (the mirror image sums with it to exactly 1 at every position)."""
    margin = min(margin, (n - 1) // 2)
    p = torch.arange(n, dtype=torch.float64) + 0.5
    return ((p - margin) / (n - 2 * margin)).clamp(0.0, 1.0).float()


def axis_weights(tiles: list[tuple[int, int]], factor: int, margin: int = MARGIN) -> list[torch.Tensor]:
    """Per tile, (size * factor,) pixel weights along one axis; at every pixel they sum to 1."""
    out = []
    for i, (start, size) in enumerate(tiles):
        w = torch.ones(size * factor)
        if i > 0:
            prev_start, prev_size = tiles[i - 1]
            ov = (prev_start + prev_size - start) * factor
            w[:ov] = torch.minimum(w[:ov], _ramp(ov, margin * factor))
        if i + 1 < len(tiles):
            ov = (start + size - tiles[i + 1][0]) * factor
            w[size * factor - ov :] = torch.minimum(w[size * factor - ov :], _ramp(ov, margin * factor).flip(0))
        out.append(w)
    return out


def decode_tiled(
    vae, z: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP, margin: int = MARGIN
) -> torch.Tensor:
    """`vae.decode(z)` (z: (B, 4, h, w), already divided by the scale factor) in tiles -> float32
    (B, 3, 8h, 8w). A latent no larger than one tile is decoded in one piece, exactly as untiled."""
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return vae.decode(z).float()
    dec = vae.decoder
    z = z.contiguous(memory_format=vae.memory_format)
    mid = dec.mid(dec.conv_in(vae.post_quant_conv(z)))  # (B, 512, h, w): global attention and norms
    ys, xs = axis_tiles(h, tile, overlap), axis_tiles(w, tile, overlap)
    f = 2 ** (len(dec.up) - 1)  # decoder upsampling factor (8: three x2 levels)
    wy, wx = axis_weights(ys, f, margin), axis_weights(xs, f, margin)
    out = torch.zeros(b, 3, h * f, w * f, dtype=torch.float32, device=z.device)
    for (y0, th), wyi in zip(ys, wy):
        for (x0, tw), wxj in zip(xs, wx):
            crop = mid[:, :, y0 : y0 + th, x0 : x0 + tw].contiguous(memory_format=vae.memory_format)
            pix = dec.upsample_to_pixels(crop).float()  # (B, 3, 8th, 8tw)
            weight = (wyi[:, None] * wxj[None, :]).to(pix.device)  # (8th, 8tw)
            out[:, :, y0 * f : (y0 + th) * f, x0 * f : (x0 + tw) * f] += pix * weight
            del pix, crop
    return out


# ------------------------------------------------------------------------------------------------
# Exact banded decode: row bands with halos, GroupNorm statistics of the whole image.

BAND_ELEMENTS = 1 << 23  # elements (channels x rows x width x batch) of one band's float32 temporaries


def _band_rows(x: torch.Tensor) -> int:
    b, c, _, w = x.shape
    return max(1, BAND_ELEMENTS // max(1, b * c * w))


def _bands(height: int, rows: int):
    for r0 in range(0, height, rows):
        yield r0, min(height, r0 + rows)


def _gn_stats(x: torch.Tensor, gn, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, group) mean and 1/std of `x` for GroupNorm `gn`, as float64 (B, G), from two passes
    over row bands (mean first, then centred squares: no cancellation)."""
    b, c, h, w = x.shape
    g = gn.num_groups
    n = (c // g) * h * w
    s1 = torch.zeros(b, c, dtype=torch.float64, device=x.device)
    for r0, r1 in _bands(h, rows):
        s1 += x[:, :, r0:r1].float().sum(dim=(2, 3)).double()
    mean = s1.view(b, g, -1).sum(-1) / n  # (B, G)
    mean_c = mean.repeat_interleave(c // g, dim=1).float()[:, :, None, None]  # (B, C, 1, 1)
    s2 = torch.zeros(b, c, dtype=torch.float64, device=x.device)
    for r0, r1 in _bands(h, rows):
        s2 += (x[:, :, r0:r1].float() - mean_c).square().sum(dim=(2, 3)).double()
    var = s2.view(b, g, -1).sum(-1) / n
    return mean, torch.rsqrt(var + gn.eps)


def _gn_silu(xb: torch.Tensor, stats, gn) -> torch.Tensor:
    """silu(GroupNorm(xb)) for a band, with the whole image's statistics; float32 math, x's dtype out."""
    mean, rstd = stats
    b, c = xb.shape[:2]
    k = c // gn.num_groups
    scale = rstd.repeat_interleave(k, dim=1) * gn.weight.double()[None]  # (B, C)
    shift = gn.bias.double()[None] - mean.repeat_interleave(k, dim=1) * scale
    # float32 scale and shift (in bf16, x * scale and shift can be large and nearly cancel), one fused
    # multiply-add with type promotion to float32, SiLU in place, one rounding back to x's dtype.
    y = torch.addcmul(shift.float()[:, :, None, None], xb, scale.float()[:, :, None, None])
    return F.silu(y, inplace=True).to(xb.dtype)


def _conv_rows(conv, source, height: int, r0: int, r1: int, fmt) -> torch.Tensor:
    """Rows [r0, r1) of conv(input) for a 3x3, padding-1 conv; `source(a, b)` gives input rows [a, b)
    (already activated). Zero rows are added only at the image's own top/bottom edge."""
    a, b = max(r0 - 1, 0), min(r1 + 1, height)
    xb = source(a, b)
    xb = F.pad(xb, (0, 0, 1 if r0 == 0 else 0, 1 if r1 == height else 0))
    xb = xb.contiguous(memory_format=fmt)
    return F.conv2d(xb, conv.weight, conv.bias, padding=(0, conv.padding[1]))


def _resblock_banded(block, x: torch.Tensor, fmt) -> torch.Tensor:
    """`block(x)` (a VAE ResnetBlock) band by band; consumes x (its storage may be reused)."""
    b, _, h, w = x.shape
    rows = _band_rows(x)
    st1 = _gn_stats(x, block.norm1, rows)
    c_out = block.conv1.out_channels
    hid = torch.empty(b, c_out, h, w, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
    for r0, r1 in _bands(h, rows):
        hid[:, :, r0:r1] = _conv_rows(block.conv1, lambda a, e: _gn_silu(x[:, :, a:e], st1, block.norm1), h, r0, r1, fmt)
    if hasattr(block, "nin_shortcut"):
        out = torch.empty_like(hid)
        for r0, r1 in _bands(h, rows):
            out[:, :, r0:r1] = block.nin_shortcut(x[:, :, r0:r1].contiguous(memory_format=fmt))
    else:
        out = x  # the residual is added into x's storage
    del x
    rows = _band_rows(hid)
    st2 = _gn_stats(hid, block.norm2, rows)
    for r0, r1 in _bands(h, rows):
        out[:, :, r0:r1] += _conv_rows(block.conv2, lambda a, e: _gn_silu(hid[:, :, a:e], st2, block.norm2), h, r0, r1, fmt)
    return out


def _upsample_banded(up, x: torch.Tensor, fmt) -> torch.Tensor:
    """`up(x)` (nearest x2, then 3x3 conv) band by band, never holding the upsampled input in full."""
    b, c, h, w = x.shape
    height = 2 * h
    out = torch.empty(b, up.conv.out_channels, height, 2 * w, dtype=x.dtype, device=x.device)
    out = out.contiguous(memory_format=fmt)

    def source(a: int, e: int) -> torch.Tensor:  # rows [a, e) of the upsampled input
        s0, s1 = a // 2, (e - 1) // 2 + 1
        big = F.interpolate(x[:, :, s0:s1], scale_factor=2.0, mode="nearest")
        return big[:, :, a - 2 * s0 : e - 2 * s0]

    rows = max(2, _band_rows(out) // 2 * 2)
    for r0, r1 in _bands(height, rows):
        out[:, :, r0:r1] = _conv_rows(up.conv, source, height, r0, r1, fmt)
    return out


def decode_banded(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z)` computed in row bands with the whole image's GroupNorm statistics: the same
    result as the untiled decode (up to float rounding), without any full-size temporary."""
    dec = vae.decoder
    fmt = vae.memory_format
    z = z.contiguous(memory_format=fmt)
    h = dec.mid(dec.conv_in(vae.post_quant_conv(z)))  # (B, 512, h, w): global attention and norms
    for lvl in reversed(dec.up):
        for i, block in enumerate(lvl.block):
            h = _resblock_banded(block, h, fmt)
            if len(lvl.attn):
                h = lvl.attn[i](h)
        if hasattr(lvl, "upsample"):
            h = _upsample_banded(lvl.upsample, h, fmt)
    b, _, height, width = h.shape
    out = torch.empty(b, dec.conv_out.out_channels, height, width, dtype=h.dtype, device=h.device)
    rows = _band_rows(h)
    st = _gn_stats(h, dec.norm_out, rows)
    for r0, r1 in _bands(height, rows):
        out[:, :, r0:r1] = _conv_rows(dec.conv_out, lambda a, e: _gn_silu(h[:, :, a:e], st, dec.norm_out), height, r0, r1, fmt)
    return out


class LatentDecoder:
    """Decodes sampled latents with the model's VAE: tiled when asked, redone in float32 when a
    half-precision decode gives non-finite pixels (said once through `on_warning`)."""

    def __init__(self, model, mode: str = "auto", on_warning: Callable[[str], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"vae tiling mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.on_warning = on_warning or (lambda msg: None)
        self.fell_back = False  # the VAE was switched to float32 after a non-finite decode

    @property
    def vae(self):
        return self.model.first_stage_model

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        h, w = latents.shape[-2:]
        f = self.model.cfg.downscale
        method = decode_method(self.mode, f * h, f * w)
        if method == "whole":
            return self.model.decode(latents)
        z = latents.to(vae.post_quant_conv.weight.dtype) / self.model.cfg.scale_factor
        return decode_banded(vae, z) if method == "bands" else decode_tiled(vae, z)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> pixels (B, 3, 8h, 8w) in about [-1, 1]; may still be non-finite
        when the latents themselves are (the caller reports that)."""
        pixels = self._decode(latents)
        if torch.isfinite(pixels).all() or not torch.isfinite(latents).all():
            return pixels
        dtype = self.vae.post_quant_conv.weight.dtype
        if dtype == torch.float32:
            return pixels
        self.vae.float()
        self.fell_back = True
        self.on_warning(
            f"the VAE decode in {dtype_name(dtype)} gave non-finite pixels (NaN/inf); "
            "decoded again in float32, and the VAE stays float32 for the rest of this run"
        )
        return self._decode(latents)
