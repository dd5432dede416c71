"""Image to image (sd-img2img): CompVis' own math for DDIM, A1111's sigma slice for the k-samplers, the
init image's handling, the CLI end to end on the demo model, bad input, --replay and --resume."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from micro_model import micro_argv
from sd_cli.cli import main
from sd_cli.demo import scenes as D
from sd_cli.sampling import schedule
from sd_cli.sampling.samplers import denoising_steps, get_sampler, img2img_start


def img2img(argv: list[str]) -> int:
    return main(argv, command="img2img")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def meta(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.info["sd_cli"]), im.info["parameters"]


def _argv(micro, outdir: Path, *extra: str) -> list[str]:
    """micro_argv without its --ddim_steps 2 (so a sampler and --steps can be given)."""
    argv = micro_argv(micro, outdir, "--skip_grid", *extra)
    i = argv.index("--ddim_steps")
    return argv[:i] + argv[i + 2:]


def _micro_pipeline(micro):
    from sd_cli import StableDiffusion

    return StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32", threads=1)


def _eps_model(pipe, prompt="a cat", scale=5.0):
    """The guided eps-model of the micro model for one prompt (as the pipeline builds it)."""
    from sd_cli.pipeline.guidance import guided_eps_model

    cond = pipe._encode([prompt], "prompt", "a1111")
    uncond = pipe._encode([""], "negative prompt", "a1111")
    return guided_eps_model(pipe.model.unet, cond, uncond, scale)


# --------------------------------------------------------------------------------------------------
# The math: CompVis' DDIMSampler.stochastic_encode + decode, written out here from scripts/img2img.py
# --------------------------------------------------------------------------------------------------


def compvis_img2img_ddim(eps_model, x0, noise, ac, steps, t_enc):
    """CompVis: ddim_timesteps = range(0, 1000, 1000 // steps) + 1; z = sqrt(ddim_alphas[t_enc]) x0 +
    sqrt(1 - ddim_alphas[t_enc]) noise; then for index = t_enc - 1 .. 0 at timestep ddim_timesteps[index]:
    pred_x0 = (x - sqrt(1 - a) e) / sqrt(a), x = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev) e (eta 0),
    a = ddim_alphas[index], a_prev = alphas_cumprod[ddim_timesteps[index - 1]] (alphas_cumprod[0] at 0)."""
    c = 1000 // steps
    ts = np.arange(0, 1000, c) + 1
    acd = ac.double().numpy()
    alphas = acd[ts]
    prev = np.concatenate([acd[:1], alphas[:-1]])
    x = (np.sqrt(alphas[t_enc]) * x0.double() + np.sqrt(1 - alphas[t_enc]) * noise.double())
    for index in range(t_enc - 1, -1, -1):
        t = torch.full((x.shape[0],), float(ts[index]))
        e = eps_model(x.float(), t).double()
        a, a_prev = alphas[index], prev[index]
        pred_x0 = (x - np.sqrt(1 - a) * e) / np.sqrt(a)
        x = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev) * e
    return x


@pytest.mark.parametrize("steps, strength", [(10, 0.75), (20, 0.3), (8, 0.5)])
def test_ddim_img2img_is_compvis(micro, steps, strength):
    sd = _micro_pipeline(micro)
    pipe = sd.pipeline()
    gen = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (1, 64, 64, 3), generator=gen, dtype=torch.uint8).numpy()
    x0 = pipe.encode_images(img)  # (1, 4, 8, 8): the posterior mean x the scale factor
    with torch.no_grad():  # the posterior mean, computed here from the VAE's layers
        vae = pipe.model.first_stage_model
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
        mean = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]
    torch.testing.assert_close(x0, mean * pipe.model.cfg.scale_factor, rtol=0, atol=1e-6)
    noise = torch.randn(x0.shape, generator=gen)
    eps_model = _eps_model(pipe)
    ac = pipe.model.alphas_cumprod
    t_enc = denoising_steps(strength, steps)
    assert t_enc == int(strength * steps)
    with torch.no_grad():
        want = compvis_img2img_ddim(eps_model, x0, noise, ac, steps, t_enc)
        info = get_sampler("ddim")
        x_T, start = img2img_start(info, x0, noise, ac, steps, None, t_enc)
        seen = []
        got = info.fn(eps_model, x_T, ac, steps, start=start, callback=lambda i, n, x: seen.append(n))
    assert len(seen) == t_enc  # t_enc denoising steps, as CompVis
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_k_samplers_start_on_a1111s_sigma_slice(micro):
    """A1111: sigmas for `steps`, from index steps - t_enc - 1, x = x0 + sigma * noise; then the Euler
    loop over the rest (written out here) is what our euler with `start` computes."""
    sd = _micro_pipeline(micro)
    pipe = sd.pipeline()
    eps_model = _eps_model(pipe)
    ac = pipe.model.alphas_cumprod
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    steps, t_enc = 12, 6
    discrete = schedule.sigmas_from_alphas_cumprod(ac)
    sigmas = schedule.scheduler_sigmas("normal", steps, discrete).tolist()[steps - t_enc - 1:]
    x = x0 + sigmas[0] * noise
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = schedule.sigma_to_t(s, discrete).item()
            eps = eps_model(x / (s * s + 1) ** 0.5, torch.full((1,), t))
            d = eps  # (x - D) / sigma with D = x - sigma * eps
            x = x + d * (s_next - s)
        info = get_sampler("euler")
        x_T, start = img2img_start(info, x0, noise, ac, steps, None, t_enc)
        seen = []
        got = info.fn(eps_model, x_T, ac, steps, start=start, callback=lambda i, n, y: seen.append(n))
    assert start == steps - t_enc - 1 and len(seen) == t_enc + 1  # A1111 runs t_enc + 1 steps
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ddim", "plms", "dpmpp_2m", "euler_a", "dpmpp_2m_sde", "heun", "dpm_2", "lcm"])
def test_every_sampler_denoises_from_the_init(micro, name):
    """Every sampler starts at the matching level and runs int(strength x steps) steps (+1 for the
    k-samplers, as A1111): less strength leaves the result nearer the init latent."""
    sd = _micro_pipeline(micro)
    pipe = sd.pipeline()
    eps_model = _eps_model(pipe)
    ac = pipe.model.alphas_cumprod
    gen = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    info = get_sampler(name)
    steps = 8
    dist = []
    for strength in (0.25, 0.5, 0.875):
        t_enc = denoising_steps(strength, steps)
        x_T, start = img2img_start(info, x0, noise, ac, steps, None, t_enc)
        seen = []
        with torch.no_grad():
            out = info.fn(eps_model, x_T, ac, steps, start=start, generator=torch.Generator().manual_seed(1),
                          callback=lambda i, n, y: seen.append(n), eta=info.resolve_eta(None))
        own_grid = info.schedule in ("uniform", "lcm")
        assert seen[-1] == (t_enc if own_grid else t_enc + 1), (strength, seen[-1])
        dist.append(float((out - x0).pow(2).mean().sqrt()))
    assert dist[0] < dist[2], dist


def test_strength_zero_and_one(micro, tmp_path):
    """0: the init image through the VAE and nothing else; 1: the init image is ignored (txt2img)."""
    src = tmp_path / "init.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src)
    assert main(_argv(micro, tmp_path / "t", "--sampler", "euler", "--steps", "4")) == 0
    assert img2img([*_argv(micro, tmp_path / "one", "--sampler", "euler", "--steps", "4"), "--init-img", str(src),
                    "--strength", "1", "--scale", "7.5"]) == 0
    zero = tmp_path / "zero"
    assert img2img([*micro_argv(micro, zero, "--skip_grid"), "--init-img", str(src), "--strength", "0"]) == 0
    got_one = pixels(tmp_path / "one" / "samples" / "00000.png")
    assert (got_one == pixels(tmp_path / "t" / "samples" / "00000.png")).all()
    sd = _micro_pipeline(micro)
    pipe = sd.pipeline()
    img = np.asarray(Image.open(src).convert("RGB"))[None]
    with torch.no_grad():
        want = (pipe.decoder(pipe.encode_images(img)).clamp(-1, 1) + 1) * 127.5
    assert np.abs(pixels(zero / "samples" / "00000.png") - want[0].permute(1, 2, 0).numpy()).max() <= 1.0
    record, text = meta(zero / "samples" / "00000.png")
    assert record["strength"] == 0 and record["init_image"]["sha256"] and "Denoising strength: 0" in text


# --------------------------------------------------------------------------------------------------
# The demo model end to end, through the CLI
# --------------------------------------------------------------------------------------------------


def _centre(path: Path) -> np.ndarray:
    return pixels(path)[24:40, 24:40].reshape(-1, 3).mean(0)


@pytest.fixture(scope="module")
def red_circle(tmp_path_factory):
    """'a red circle on a blue background' from the demo model itself."""
    out = tmp_path_factory.mktemp("red")
    assert main(["--prompt", "a red circle on a blue background", "--outdir", str(out), "--n_samples", "1",
                 "--n_iter", "1", "--skip_grid", "-q", "--threads", "1", "--steps", "12"]) == 0
    path = out / "samples" / "00000.png"
    r, g, b = _centre(path)
    assert r > 150 and g < 90 and b < 90, (r, g, b)
    return path


def test_demo_recolours_at_high_strength_and_keeps_at_low(red_circle, tmp_path):
    green = "a green circle on a blue background"
    common = ["--prompt", green, "--init-img", str(red_circle), "--n_samples", "1", "--skip_grid", "-q",
              "--threads", "1", "--steps", "20"]
    assert img2img([*common, "--strength", "0.8", "--outdir", str(tmp_path / "hi")]) == 0
    r, g, b = _centre(tmp_path / "hi" / "samples" / "00000.png")
    assert g > 120 and r < 90, (r, g, b)
    # Almost no noise: the picture itself comes back (0.15 keeping the colour is the test below).
    assert img2img([*common, "--strength", "0.02", "--outdir", str(tmp_path / "lo")]) == 0
    kept = pixels(tmp_path / "lo" / "samples" / "00000.png")
    assert np.abs(kept - pixels(red_circle)).mean() < 6
    record, text = meta(tmp_path / "hi" / "samples" / "00000.png")
    assert (record["sampler"], record["steps"], record["strength"], record["encode"]) == ("ddim", 20, 0.8, "mean")
    assert record["init_image"]["width"] == 64 and "Denoising strength: 0.8" in text


def test_demo_keeps_the_colour_at_low_strength(red_circle, tmp_path):
    """At 0.15 the circle stays red: with CompVis' 50 DDIM steps (7 steps from t = 121) and with 20."""
    for steps in ("50", "20"):
        lo = tmp_path / f"lo{steps}"
        assert img2img(["--prompt", "a green circle on a blue background", "--init-img", str(red_circle),
                        "--n_samples", "1", "--skip_grid", "-q", "--threads", "1", "--steps", steps,
                        "--strength", "0.15", "--outdir", str(lo)]) == 0
        r, g, b = _centre(lo / "samples" / "00000.png")
        assert r > 150 and g < 90 and b < 90, (steps, r, g, b)


def test_demo_inpaints_the_new_background_colour(red_circle, tmp_path):
    """Inpainting the left half "on a yellow background" paints the left yellow (nearest palette colour of
    the left 12 columns, away from the circle)."""
    path, _, _ = _inpaint_left_yellow(red_circle, tmp_path)
    left = pixels(path)[:, :12].reshape(-1, 3).mean(0)
    palette = {name: np.array(rgb, float) for name, rgb in D.COLORS.items()}
    assert min(palette, key=lambda c: ((left - palette[c]) ** 2).sum()) == "yellow", left


def test_replay_and_resume_of_img2img(red_circle, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--prompt", "a yellow square", "--init-img", str(red_circle), "--strength", "0.5", "--n_samples", "2",
            "--outdir", str(out), "--skip_grid", "-q", "--threads", "1", "--sampler", "euler_a", "--steps", "8",
            "--encode", "sample"]
    assert img2img(argv) == 0
    files = sorted((out / "samples").iterdir())
    assert len(files) == 2
    assert img2img(["--replay", str(files[1]), "--init-img", str(red_circle), "-q"]) == 0
    assert "identical" in capsys.readouterr().out
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(other)
    assert img2img(["--replay", str(files[1]), "--init-img", str(other), "-q"]) == 1
    assert "is not the image" in capsys.readouterr().err
    assert main(["--replay", str(files[1]), "-q"]) == 1  # sd-txt2img: says how to replay it
    assert "sd-img2img --replay IMAGE --init-img" in capsys.readouterr().err
    before = [f.read_bytes() for f in files]
    files[0].unlink()
    assert img2img([*argv, "--resume"]) == 0
    assert sorted(f.read_bytes() for f in (out / "samples").iterdir()) == sorted(before)  # the same two again


# --------------------------------------------------------------------------------------------------
# The init image: modes, orientation, size; bad input
# --------------------------------------------------------------------------------------------------


def test_init_image_modes_and_orientation(tmp_path):
    from sd_cli.output.init_image import load_init_image

    rgba = tmp_path / "a.png"
    Image.new("RGBA", (70, 50), (255, 0, 0, 0)).save(rgba)  # fully transparent red: white
    im = load_init_image(rgba)
    assert im.size == (64, 48) and im.source_size == (70, 50) and (im.pixels == 255).all()
    grey16 = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 65535], [32768, 1000]] * 4, dtype=np.uint16).repeat(4, 1)).save(grey16)
    g = load_init_image(grey16)
    assert g.pixels.shape == (8, 8, 3) and g.pixels.min() == 0 and g.pixels.max() == 255
    pal = tmp_path / "p.png"
    Image.new("P", (16, 16), 3).save(pal)
    assert load_init_image(pal).pixels.shape == (16, 16, 3)
    photo = tmp_path / "o.jpg"
    base = Image.new("RGB", (32, 16), (0, 0, 255))
    base.paste((255, 0, 0), (0, 0, 16, 16))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    base.save(photo, exif=exif, quality=95)
    turned = load_init_image(photo)
    assert turned.size == (16, 32) and turned.pixels[2, 8, 0] > 200 and turned.pixels[-3, 8, 2] > 200
    red, blue, white = (255, 0, 0), (0, 0, 255), (255, 255, 255)
    # 16x32 (red over blue) into 64x64: crop scales by 4 and keeps rows 32..96 of 128, fill scales by 2
    # and centres 32x64 on white, stretch scales 4 x 2.
    for mode, checks in (("crop", {(1, 32): red, (62, 32): blue, (32, 1): None}),
                         ("fill", {(32, 1): white, (1, 32): red, (62, 32): blue}),
                         ("stretch", {(1, 32): red, (62, 32): blue, (32, 1): None})):
        fitted = load_init_image(photo, 64, 64, mode)
        assert fitted.size == (64, 64)
        for (y, x), want in checks.items():
            if want is not None:
                assert np.abs(fitted.pixels[y, x].astype(int) - want).max() < 40, (mode, y, x, fitted.pixels[y, x])
    assert not (load_init_image(photo, 64, 64, "crop").pixels[32, 1] == 255).all()  # crop: no white border


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height (its data is one short row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("make, flags, message", [
    (lambda p: p.write_bytes(b"not an image at all"), [], "not a readable image"),
    (lambda p: p.write_bytes(Path(p).with_name("good.png").read_bytes()[:60]), [], "not a readable image"),
    (lambda p: _png_claiming(p, 30000, 30000), [], "more than 16,777,216"),
    (None, ["--strength", "1.5"], "--strength 1.5: must be between 0 and 1"),
    (None, ["--strength", "-0.1"], "must be between 0 and 1"),
])
def test_bad_init_input_is_one_clear_error(micro, tmp_path, capsys, make, flags, message):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    path = good
    if make is not None:
        path = tmp_path / "bad.png"
        make(path)
    out = tmp_path / "out"
    assert img2img([*micro_argv(micro, out), "--init-img", str(path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_w_without_h_is_refused(micro, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    argv = micro_argv(micro, tmp_path / "out")
    i = argv.index("--H")
    assert img2img([*argv[:i], *argv[i + 2:], "--init-img", str(good)]) == 2
    assert "--W and --H: give both" in capsys.readouterr().err


def test_init_image_is_required(micro, tmp_path, capsys):
    assert img2img(micro_argv(micro, tmp_path / "out")) == 2
    assert "--init-img IMAGE: sd-img2img needs the image" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Inpainting with an ordinary checkpoint (--mask)
# --------------------------------------------------------------------------------------------------


def test_masked_eps_model_keeps_x0_where_the_mask_keeps():
    from sd_cli.pipeline.inpaint import masked_eps_model

    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float32)
    model = lambda x, t: 0.3 * x + 0.1  # noqa: E731  any eps-model
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 123.4])
    init = torch.randn(2, 4, 8, 8)
    repaint = torch.zeros(1, 1, 8, 8)
    repaint[..., :4] = 1  # the left half is repainted
    eps = masked_eps_model(model, init, repaint, ac)(x, t)
    sigma = schedule.t_to_sigma(t, schedule.sigmas_from_alphas_cumprod(ac))
    a = (1 / (1 + sigma**2)).float().view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    plain_x0 = (x - (1 - a).sqrt() * model(x, t)) / a.sqrt()
    torch.testing.assert_close(x0[..., 4:], init[..., 4:], rtol=1e-4, atol=1e-4)  # kept: the init's x0
    torch.testing.assert_close(x0[..., :4], plain_x0[..., :4], rtol=1e-4, atol=1e-4)  # repainted: the model's


def _inpaint_left_yellow(red_circle: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """The demo's red circle with its left half inpainted "on a yellow background" (strength 0.8, 20
    steps): (the image, the mask, the sd-img2img arguments that made it)."""
    mask = tmp_path / "left.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 0, 32, 64))
    m.save(mask)
    out = tmp_path / "inp"
    argv = ["--prompt", "a red circle on a yellow background", "--init-img", str(red_circle), "--mask", str(mask),
            "--strength", "0.8", "--n_samples", "1", "--outdir", str(out), "--skip_grid", "-q", "--threads", "1",
            "--steps", "20"]
    assert img2img(argv) == 0
    return out / "samples" / "00000.png", mask, argv


def test_demo_inpaint_keeps_the_unmasked_part(red_circle, tmp_path, capsys):
    path, mask, argv = _inpaint_left_yellow(red_circle, tmp_path)
    out = path.parent.parent
    got, before = pixels(path), pixels(red_circle)
    assert np.abs(got[:, 43:] - before[:, 43:]).max() <= 2  # the right third: the original's pixels
    assert np.abs(got[:, :16] - before[:, :16]).mean() > 30  # the left is repainted
    # (The shipped demo model, trained on one background colour per picture, paints the left near white
    # rather than yellow: test_demo_inpaints_the_new_background_colour, README "Image to image".)
    record, text = meta(path)
    assert record["mask"]["blur"] == 4 and record["mask"]["fill"] == "original" and "Mask blur: 4" in text
    assert img2img(["--replay", str(path), "--init-img", str(red_circle), "--mask", str(mask), "-q"]) == 0
    assert "identical" in capsys.readouterr().out
    assert img2img(["--replay", str(path), "--init-img", str(red_circle), "-q"]) == 1
    assert "give it as --mask" in capsys.readouterr().err
    before = path.read_bytes()
    path.unlink()
    assert img2img([*argv, "--resume"]) == 0  # made again, the same file
    assert path.read_bytes() == before
    assert img2img([*argv, "--resume", "--mask-blur", "2"]) == 0  # another blur: another image
    assert len(list((out / "samples").iterdir())) == 2


def test_mask_problems(micro, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    black = tmp_path / "black.png"
    Image.new("L", (64, 64), 0).save(black)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"nope")
    for mask, message in ((black, "it is all black"), (junk, "--mask")):
        assert img2img([*micro_argv(micro, tmp_path / "out"), "--init-img", str(good), "--mask", str(mask)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists()
    small = tmp_path / "small.png"
    Image.new("L", (16, 16), 255).save(small)
    assert img2img([*micro_argv(micro, tmp_path / "ok"), "--init-img", str(good), "--mask", str(small)]) == 0
    assert "resized to the image" in capsys.readouterr().err
    assert main([*micro_argv(micro, tmp_path / "t2i"), "--mask", str(small)]) == 2  # not a txt2img flag


# --------------------------------------------------------------------------------------------------
# Fuzz: init images and masks are untrusted input
# --------------------------------------------------------------------------------------------------


def _seed_files(tmp_path: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(4)
    out = {}
    for fmt, mode in (("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("BMP", "L"), ("GIF", "P")):
        im = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).convert(mode)
        path = tmp_path / f"seed.{fmt.lower()}"
        im.save(path, format=fmt)
        out[fmt] = path.read_bytes()
    return out


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_init_images_and_masks_load_or_say_why(tmp_path, data):
    """Truncated, bit-flipped or spliced picture files: each loads (as (H, W, 3) / (H, W) uint8 of a size the
    model can take) or raises one UsageError; nothing else, and never an image larger than allowed."""
    from sd_cli.errors import UsageError
    from sd_cli.output.init_image import MAX_PIXELS, load_init_image, load_mask

    seeds = _seed_files(tmp_path)
    raw = bytearray(seeds[data.draw(st.sampled_from(sorted(seeds)))])
    action = data.draw(st.sampled_from(["truncate", "flip", "splice", "header"]))
    if action == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif action == "splice":
        raw += data.draw(st.binary(max_size=64))
    else:  # a header byte region overwritten (sizes, modes)
        i = data.draw(st.integers(0, min(40, len(raw) - 1)))
        raw[i:i + 4] = data.draw(st.binary(min_size=4, max_size=4))
    path = tmp_path / "fuzzed.img"
    path.write_bytes(bytes(raw))
    for load in (lambda: load_init_image(path), lambda: load_init_image(path, 32, 16, "fill"),
                 lambda: load_mask(path, (40, 24))):
        try:
            got = load()
        except UsageError as err:
            assert "\n" not in str(err)
            continue
        pixels = got.pixels
        assert pixels.dtype == np.uint8 and pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS
        assert pixels.ndim in (2, 3) and (pixels.ndim == 2 or pixels.shape[2] == 3)
