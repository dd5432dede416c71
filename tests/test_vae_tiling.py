"""Tiled VAE decode on the tiny model: the banded decode equals the untiled one (same GroupNorm statistics),
the auto rule, and the pipeline/CLI wiring."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_YAML, load_config_from_text, make_tiny_state_dict
from sd_cli.pipeline import vae_tiling as vt
from sd_cli.model.layers import use_channels_last


@pytest.fixture(scope="module")
def vae():
    from sd_cli.model.ldm import LatentDiffusion

    model = LatentDiffusion(load_config_from_text(TINY_YAML).model)
    model.load_state_dict(make_tiny_state_dict())
    return model.first_stage_model.eval().requires_grad_(False)


def _latents(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / 0.18215


@pytest.fixture
def small_bands(monkeypatch):
    """Bands of 8-32 rows, so a 24x32 latent crosses band edges at every level (few enough bands that the
    test stays quick: each op has a fixed cost)."""
    monkeypatch.setattr(vt, "BAND_ELEMENTS", 1 << 18)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_banded_decode_equals_untiled(vae, small_bands, channels_last):
    """Max |banded - untiled| relative to max |untiled|: measured 1.0e-6 (NCHW) and ~2e-6 (NHWC) in
    float32, the same size as float32's own disagreement with a float64 decode (1.1e-6); bound 1e-5."""
    use_channels_last(vae, channels_last)
    try:
        z = _latents((2, 4, 24, 32))  # 192x256 px, two images
        with torch.inference_mode():
            ref = vae.decode(z)
            out = vt.decode_banded(vae, z)
            ref64 = vae.double().decode(z.double()).float()
    finally:
        vae.float()
        use_channels_last(vae, False)
    scale = ref64.abs().max().item()
    rel = (out - ref64).abs().max().item() / scale
    print(f"banded vs float64: {rel:.2e}; untiled vs float64: {(ref - ref64).abs().max().item() / scale:.2e}")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel < 1e-5
    assert (out - ref).abs().max().item() / scale < 1e-5


def test_banded_decode_bf16_is_as_close_as_untiled_bf16(vae, small_bands):
    z = _latents((1, 4, 16, 24), seed=1)
    with torch.inference_mode():
        ref = vae.decode(z)  # float32 reference
        vae16 = vae.to(torch.bfloat16)
        try:
            plain = vae16.decode(z.bfloat16()).float()
            banded = vt.decode_banded(vae16, z.bfloat16()).float()
        finally:
            vae.float()
    e_plain = (plain - ref).abs().mean().item()
    e_banded = (banded - ref).abs().mean().item()
    print(f"bf16 mean error: untiled {e_plain:.4f}, banded {e_banded:.4f}")
    assert e_banded < 1.5 * e_plain + 1e-3


def test_no_band_sees_the_whole_image(vae, monkeypatch):
    """The memory claim, structurally: with small bands, no conv in the upsampling levels runs on a
    full-height input."""
    monkeypatch.setattr(vt, "BAND_ELEMENTS", 1 << 17)
    heights = []
    real = torch.nn.functional.conv2d

    def spy(x, *args, **kwargs):
        heights.append(x.shape[-2])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(vt.F, "conv2d", spy)
    with torch.inference_mode():
        vt.decode_banded(vae, _latents((1, 4, 32, 32)))
    assert heights and max(heights) < 64  # the image is 256 px high; mid-level convs are not banded


@pytest.mark.parametrize(
    "mode, h, w, method",
    [("auto", 512, 512, "whole"), ("auto", 512, 520, "bands"), ("auto", 1024, 1024, "bands"),
     ("auto", 64, 64, "whole"), ("on", 64, 64, "bands"), ("tiles", 64, 64, "tiles"), ("off", 2048, 2048, "whole")],
)
def test_auto_rule(mode, h, w, method):
    assert vt.decode_method(mode, h, w) == method
    assert vt.use_tiling(mode, h, w) is (method != "whole")


def test_decoder_routes_by_size(tiny_files, monkeypatch):
    from sd_cli.weights.loading import load_model

    model = load_model(load_config_from_text(TINY_YAML).model, tiny_files["safetensors"])
    calls = []
    monkeypatch.setattr(vt, "decode_banded", lambda vae, z: calls.append(tuple(z.shape)) or vae.decode(z))
    vt.LatentDecoder(model, "auto")(torch.zeros(1, 4, 8, 8))
    assert calls == []
    vt.LatentDecoder(model, "auto")(torch.zeros(1, 4, 72, 64))  # 576x512 px > 512x512
    vt.LatentDecoder(model, "on")(torch.zeros(1, 4, 8, 8))
    assert calls == [(1, 4, 72, 64), (1, 4, 8, 8)]
    monkeypatch.setattr(vt, "decode_tiled", lambda vae, z: calls.append("tiles") or vae.decode(z))
    vt.LatentDecoder(model, "tiles")(torch.zeros(1, 4, 8, 8))
    assert calls[-1] == "tiles"


def test_cli_vae_tiling_flag(tiny_files, tmp_path):
    """--vae-tiling on gives the same picture as off (up to float32 rounding of the uint8 values) and
    is recorded in the metadata."""
    import numpy as np
    from PIL import Image

    from sd_cli.cli import main
    from sd_cli.output.png import read_png_metadata

    def run(out, *extra):
        argv = ["--ckpt", str(tiny_files["safetensors"]), "--config", str(tiny_files["config"]), "--outdir",
                str(out), "--H", "96", "--W", "64", "--steps", "2", "--n_samples", "1", "--n_iter", "1",
                "--no-watermark", "-q", "--skip_grid", *extra]
        assert main(argv) == 0
        return np.asarray(Image.open(out / "samples/00000.png").convert("RGB")).astype(int)

    plain = run(tmp_path / "off", "--vae-tiling", "off")
    tiled = run(tmp_path / "on", "--vae-tiling")
    assert np.abs(plain - tiled).max() <= 1
    assert read_png_metadata(tmp_path / "on/samples/00000.png")[1]["vae_decode"] == "bands"
    assert read_png_metadata(tmp_path / "off/samples/00000.png")[1]["vae_decode"] == "whole"


# --- overlapping tiles (the least-memory mode; GroupNorm statistics per tile) ------------------------


@pytest.mark.parametrize("length, tile, overlap", [(64, 64, 16), (65, 64, 16), (128, 64, 16), (96, 64, 16),
                                                   (513, 64, 16), (40, 24, 8), (48, 24, 8)])
def test_axis_tiles_cover_with_overlap(length, tile, overlap):
    tiles = vt.axis_tiles(length, tile, overlap)
    sizes = {size for _, size in tiles}
    assert len(sizes) == 1 and sizes.pop() <= tile
    assert tiles[0][0] == 0 and tiles[-1][0] + tiles[-1][1] == length
    for (s0, n0), (s1, _) in zip(tiles, tiles[1:]):
        assert s0 < s1 and s0 + n0 - s1 >= overlap  # neighbours share at least `overlap` cells
    if length > tile:  # as few tiles as the overlap allows
        assert len(tiles) == -(-(length - overlap) // (tile - overlap))


@pytest.mark.parametrize("length", [65, 128, 200])
def test_axis_weights_sum_to_one(length):
    tiles = vt.axis_tiles(length, 64, 16)
    weights = vt.axis_weights(tiles, 8)
    total = torch.zeros(length * 8)
    for (start, size), w in zip(tiles, weights):
        assert w.shape == (size * 8,) and (w >= 0).all() and (w <= 1).all()
        total[start * 8 : (start + size) * 8] += w
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_one_tile_is_the_untiled_decode(vae):
    z = _latents((1, 4, 24, 16), seed=2)
    with torch.inference_mode():
        assert torch.equal(vt.decode_tiled(vae, z, tile=24, overlap=8), vae.decode(z))


def test_tiles_cross_fade_without_edges(vae, monkeypatch):
    """Give every tile a flat value (its index): the blend must ramp between neighbours, never jump.
    Steps between adjacent pixels stay <= (value gap) / (ramp width in px)."""
    counter = iter(range(100))
    monkeypatch.setattr(vae.decoder, "upsample_to_pixels",
                        lambda h: torch.full((h.shape[0], 3, 8 * h.shape[2], 8 * h.shape[3]), float(next(counter))))
    z = _latents((1, 4, 40, 48))
    out = vt.decode_tiled(vae, z, tile=24, overlap=8, margin=2)
    ramp_px = 8 * (8 - 2 * 2)  # the narrowest overlap, less both margins
    n_x = len(vt.axis_tiles(48, 24, 8))
    steps_x = (out[..., 1:] - out[..., :-1]).abs().max().item()
    steps_y = (out[..., 1:, :] - out[..., :-1, :]).abs().max().item()
    assert steps_x <= 1 / ramp_px + 1e-5
    assert steps_y <= n_x / ramp_px + 1e-5  # vertical neighbours differ by a whole row of tiles


def test_tiles_approximate_the_untiled_decode(vae):
    """Per-tile GroupNorm statistics: an approximation. Measured on the tiny random model (which
    is more sensitive to them than a trained VAE): mean |diff| 0.024, max 0.46, for an image whose
    values spread with std 0.36; bounds at ~2x so a regression (e.g. a misplaced tile) fails."""
    z = _latents((1, 4, 40, 48))
    with torch.inference_mode():
        ref = vae.decode(z)
        out = vt.decode_tiled(vae, z, tile=24, overlap=8)
    d = (out - ref).abs()
    print(f"tiles vs untiled: mean {d.mean().item():.4f}, max {d.max().item():.3f}, image std {ref.std().item():.3f}")
    assert d.mean().item() < 0.05
    assert d.max().item() < 1.0
