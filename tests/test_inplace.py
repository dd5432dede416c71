"""In-place ops on fresh layer outputs (`layers.inplace_ok`): for speed only, so they must not change a
single number, nor the caller's tensors, nor what autograd needs."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_YAML, load_config_from_text, make_tiny_state_dict

from sd_cli.model import layers
from sd_cli.weights.loading import prepare_for_inference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_helpers_write_in_place_only_without_autograd():
    x = torch.randn(2, 3)
    with torch.inference_mode():
        y = x.clone()
        assert layers.silu_fresh(y) is y
        assert layers.add_fresh(y, 1.0) is y and layers.mul_fresh(y, 2.0) is y
    z = torch.randn(2, 3, requires_grad=True)
    w = z * 1.0  # a fresh non-leaf, as a norm's output is in training
    for out in (layers.silu_fresh(w), layers.add_fresh(w, 1.0), layers.mul_fresh(w, 2.0)):
        assert out is not w
    (layers.silu_fresh(w) * layers.add_fresh(w, 1.0)).sum().backward()  # autograd has what it needs
    assert torch.isfinite(z.grad).all()


def _tiny_model(channels_last: bool):
    from sd_cli.model.ldm import LatentDiffusion

    model = LatentDiffusion(load_config_from_text(TINY_YAML).model)
    model.load_state_dict(make_tiny_state_dict(), strict=True)
    model.eval().requires_grad_(False)
    prepare_for_inference(model, channels_last=channels_last)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_in_place_inference_gives_the_same_numbers_and_keeps_the_inputs(channels_last, dtype, monkeypatch):
    model = _tiny_model(channels_last).to(dtype)
    gen = torch.Generator().manual_seed(0)
    # 16 to 2 px over the 4 levels. Not 8: a (B, C, 1, 1) map is both NCHW and NHWC, an in-place op hands on
    # other (equally valid) strides than a new tensor, and oneDNN then takes another fp32 conv kernel (1e-7 off).
    x = torch.randn(2, 4, 16, 16, generator=gen).to(dtype)
    t = torch.tensor([10.0, 900.0])
    ctx = torch.randn(2, 77, 32, generator=gen).to(dtype)
    kept = [x.clone(), ctx.clone()]

    def run():
        with torch.inference_mode():
            return model.unet(x, t, ctx), model.decode(x)

    asked = []  # every use of the in-place helpers asks inplace_ok: proof that the model goes through them
    real = layers.inplace_ok
    monkeypatch.setattr(layers, "inplace_ok", lambda: asked.append(1) or real())
    eps, img = run()
    assert len(asked) > 150  # measured: 169 uses in the tiny UNet, 44 in its VAE decoder
    assert torch.equal(x, kept[0]) and torch.equal(ctx, kept[1])  # the caller's tensors are untouched
    monkeypatch.setattr(layers, "inplace_ok", lambda: False)
    eps_ref, img_ref = run()
    assert torch.equal(eps, eps_ref) and torch.equal(img, img_ref)  # bit for bit
    assert eps.abs().max() > 0 and img.abs().max() > 0
