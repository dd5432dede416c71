"""Does imwatermark's dwtDct read "StableDiffusionV1" back, by image size and content? (issue 13, item 11)

For each image family, size and seed: embed with imwatermark exactly as sd_cli does (RGB -> BGR,
WatermarkEncoder "bytes", "dwtDct"), decode with WatermarkDecoder, and count an exact read-back of all
17 bytes as a success; the mean fraction of wrong bits is kept as the margin. imwatermark is called
directly (not through sd_cli.output.watermark) so that the measurement does not depend on the threshold
it is used to choose.

Families:
  field   1/f-spectrum random colour field (the power spectrum of natural photographs), luminance plus
          weaker chroma, plus fine grain; what a generated photo or painting looks like statistically.
  texture the test suite's "natural image": smooth colour gradients plus colour texture in 2x2 cells
          plus grey noise (tests/test_images.py `_natural_image`).
  demo    the built-in demo model's 64x64 outputs (a flat shape on a flat background), resized with
          Pillow's bicubic filter; flat content, the worst case for dwtDct.

Usage: python bench/watermark_readback.py [--seeds 30] [--sizes 256,320,...] [--shapes] [--out FILE]
Single-threaded; about 0.1 s per encode+decode at 512x512.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

TEXT = b"StableDiffusionV1"
SIZES = (256, 320, 384, 448, 512, 640, 768)


def field_image(seed: int, h: int, w: int) -> np.ndarray:
    """Random colour field with a 1/f amplitude spectrum (natural-image statistics) plus fine grain."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    amp = 1.0 / f
    amp[0, 0] = 0.0

    def channel() -> np.ndarray:
        spec = amp * (rng.normal(size=amp.shape) + 1j * rng.normal(size=amp.shape))
        x = np.fft.irfft2(spec, s=(h, w))
        return x / x.std()

    lum = 128 + 45 * channel()
    u, v = 14 * channel(), 14 * channel()
    rgb = np.stack([lum + 1.40 * v, lum - 0.34 * u - 0.71 * v, lum + 1.77 * u], -1)
    rgb += rng.normal(0, 3, (h, w, 1))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def texture_image(seed: int, h: int, w: int) -> np.ndarray:
    """tests/test_images.py `_natural_image`, generalised to h x w."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy / (h - 1), xx / (w - 1)
    base = np.stack(
        [128 + 60 * np.sin(3 * xx + 1 + 2 * yy), 128 + 96 * (yy - 0.5), 128 + 60 * np.cos(5 * xx * yy)], -1
    )
    chroma = rng.normal(0, 24, ((h + 1) // 2, (w + 1) // 2, 3)).repeat(2, 0).repeat(2, 1)[:h, :w]
    grey = rng.normal(0, 6, (h, w, 1))
    return np.clip(np.rint(base + chroma + grey), 0, 255).astype(np.uint8)


_DEMO_CACHE: dict[int, np.ndarray] = {}


def demo_image(seed: int, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if seed not in _DEMO_CACHE:
        import sd_cli
        from sd_cli.demo.scenes import COLOR_NAMES, SHAPES

        if "sd" not in _DEMO_CACHE:
            _DEMO_CACHE["sd"] = sd_cli.StableDiffusion.load(threads=1)  # type: ignore[assignment]
        shape = SHAPES[seed % len(SHAPES)]
        color = COLOR_NAMES[seed % len(COLOR_NAMES)]
        bg = COLOR_NAMES[(seed // len(COLOR_NAMES) + seed + 1) % len(COLOR_NAMES)]
        if bg == color:
            bg = COLOR_NAMES[(COLOR_NAMES.index(color) + 1) % len(COLOR_NAMES)]
        prompt = f"a {color} {shape} on a {bg} background"
        img = _DEMO_CACHE["sd"].txt2img(prompt, seed=seed, watermark=False)[0]  # type: ignore[attr-defined]
        _DEMO_CACHE[seed] = np.asarray(img.convert("RGB"))
    small = Image.fromarray(_DEMO_CACHE[seed])
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


FAMILIES = {"field": field_image, "texture": texture_image, "demo": demo_image}


def readback(img: np.ndarray) -> tuple[bool, float]:
    """(exact read-back, fraction of wrong bits) after embedding TEXT the way sd_cli does."""
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bytes", TEXT)
    marked = enc.encode(np.ascontiguousarray(img[:, :, ::-1]), "dwtDct")  # BGR in, BGR out
    got = bytes(WatermarkDecoder("bytes", len(TEXT) * 8).decode(marked, "dwtDct"))
    want_bits = np.unpackbits(np.frombuffer(TEXT, np.uint8))
    got_bits = np.unpackbits(np.frombuffer(got.ljust(len(TEXT), b"\0")[: len(TEXT)], np.uint8))
    return got == TEXT, float((want_bits != got_bits).mean())


def measure(family: str, h: int, w: int, seeds: int) -> dict:
    make = FAMILIES[family]
    ok, errs = 0, []
    for seed in range(seeds):
        good, err = readback(make(seed, h, w))
        ok += good
        errs.append(err)
    return {"family": family, "h": h, "w": w, "seeds": seeds, "ok": ok, "mean_bit_error": float(np.mean(errs)),
            "max_bit_error": float(np.max(errs))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--families", default="field,texture,demo")
    ap.add_argument("--shapes", default="", help="extra HxW shapes, comma-separated, e.g. 192x768,768x192")
    ap.add_argument("--out", default="", help="append JSON lines here")
    args = ap.parse_args(argv)
    shapes = [(int(s), int(s)) for s in args.sizes.split(",") if s]
    shapes += [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]  # type: ignore[misc]
    for family in args.families.split(","):
        for h, w in shapes:
            t0 = time.perf_counter()
            row = measure(family, h, w, args.seeds)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
