"""Variation seeds (A1111's --subseed / --subseed-strength): the start noise is slerp of the image's own
noise and the variation seed's, with A1111's formula, recorded so --params, --replay and --resume know it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from micro_model import micro_argv
from sd_cli.cli import main
from sd_cli.pipeline.generate import slerp


def a1111_slerp(val, low, high):
    """A1111 modules/processing.py slerp, written out: vectors along dim 1 of (C, h, w) noise."""
    low_norm = low / np.linalg.norm(low, axis=1, keepdims=True)
    high_norm = high / np.linalg.norm(high, axis=1, keepdims=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = np.arccos(dot)
    so = np.sin(omega)
    return (np.sin((1.0 - val) * omega) / so)[:, None] * low + (np.sin(val * omega) / so)[:, None] * high


@pytest.mark.parametrize("val", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_slerp_is_a1111s(val):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 8, 6, generator=g), torch.randn(4, 8, 6, generator=g)
    got = slerp(val, a, b)[0]
    want = a1111_slerp(val, a.double().numpy(), b.double().numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    near = slerp(0.3, a, a * 1.0000001)[0]  # parallel: A1111's linear fallback (weights as A1111 has them)
    np.testing.assert_allclose(near.numpy(), (a * 0.3 + a * 1.0000001 * 0.7).numpy(), rtol=1e-6)


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.info["sd_cli"]), im.info["parameters"]


def _run(micro, out, *extra):
    argv = micro_argv(micro, out, "--skip_grid", *extra)
    i = argv.index("--ddim_steps")
    return main(argv[:i] + argv[i + 2:] + ["--sampler", "dpmpp_2m", "--steps", "3"])


def test_variation_seed_end_to_end(micro, tmp_path, capsys):
    assert _run(micro, tmp_path / "base", "--seed", "5") == 0
    assert _run(micro, tmp_path / "other", "--seed", "9") == 0
    assert _run(micro, tmp_path / "zero", "--seed", "5", "--subseed", "9", "--subseed-strength", "0") == 0
    assert _run(micro, tmp_path / "one", "--seed", "5", "--subseed", "9", "--subseed-strength", "1") == 0
    assert _run(micro, tmp_path / "mid", "--seed", "5", "--subseed", "9", "--subseed-strength", "0.4") == 0
    base, _, _ = _png(tmp_path / "base" / "samples" / "00000.png")
    other, _, _ = _png(tmp_path / "other" / "samples" / "00000.png")
    zero, zmeta, ztext = _png(tmp_path / "zero" / "samples" / "00000.png")
    one, _, _ = _png(tmp_path / "one" / "samples" / "00000.png")
    mid, meta, text = _png(tmp_path / "mid" / "samples" / "00000.png")
    assert (zero == base).all() and "subseed" not in zmeta and "Variation" not in ztext  # strength 0: nothing
    assert (one == other).all()  # strength 1: the variation seed's own noise (a deterministic sampler)
    assert not (mid == base).all() and not (mid == other).all()
    assert (meta["subseed"], meta["subseed_strength"]) == (9, 0.4)
    assert "Variation seed: 9, Variation seed strength: 0.4" in text
    mid_png = tmp_path / "mid" / "samples" / "00000.png"
    assert main(["--replay", str(mid_png), "--ckpt", str(micro["safetensors"]), "--config", str(micro["config"]),
                 "-q"]) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["--params", str(mid_png), "--ckpt", str(micro["safetensors"]), "--config", str(micro["config"]),
                 "--outdir", str(again), "--skip_grid", "-q", "--threads", "1", "--n_iter", "1",
                 "--no-watermark"]) == 0
    assert (again / "samples" / "00000.png").read_bytes() == mid_png.read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--subseed-strength", "0.5"], "give the variation seed too"),
    (["--subseed", "3", "--subseed-strength", "1.5"], "--subseed-strength 1.5: must be between 0 and 1"),
    (["--subseed", "-1", "--subseed-strength", "0.5"], "--subseed -1: must be between 0 and 2**63-1"),
])
def test_bad_variation_flags(micro, tmp_path, capsys, flags, message):
    assert main(micro_argv(micro, tmp_path / "out", *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_variation_seed_with_hires_fix(micro, tmp_path, capsys):
    """The hires pass draws its noise as A1111 does, variation included: slerp at the hires size."""
    out = tmp_path / "hr"
    assert _run(micro, out, "--seed", "5", "--subseed", "9", "--subseed-strength", "0.4", "--hr-scale", "2") == 0
    img, meta, text = _png(out / "samples" / "00000.png")
    assert img.shape == (128, 128, 3) and meta["subseed"] == 9 and "Hires upscale: 2.0" in text
    assert main(["--replay", str(out / "samples" / "00000.png"), "--ckpt", str(micro["safetensors"]),
                 "--config", str(micro["config"]), "-q"]) == 0
    assert "identical" in capsys.readouterr().out
