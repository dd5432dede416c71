"""Init images for image to image: any picture file in, (H, W, 3) uint8 RGB out, checked before decoding.

* The size in the file's header is checked before the pixels are decoded: at most MAX_PIXELS (16.7 MP,
  4096 x 4096), so a small file that claims 30000 x 30000 is refused without allocating it.
* EXIF orientation is applied (a phone photo stands the right way up).
* Modes: RGB as is; RGBA/LA/P with transparency composited over white; L, P, CMYK, YCbCr converted;
  16-bit and 32-bit greys (I;16, I, F) scaled to 8 bits by their range.
* Size: kept, rounded down to a multiple of 8 (the model needs it; CompVis rounded to 32), unless a
  width and height are given, then fitted by `resize`: crop (scale to cover, centre crop), fill (scale
  to fit, centred on white), stretch (ignore the aspect ratio); Lanczos resampling.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sd_cli.errors import UsageError

MAX_PIXELS = 4096 * 4096
MAX_FILE_BYTES = 256 * 1024 * 1024
RESIZE_MODES = ("crop", "fill", "stretch")


@dataclass(frozen=True, eq=False)
class InitImage:
    """A decoded init image and where it came from (the metadata records file, sha256 and size)."""

    file: str  # the path as given, as text
    sha256: str  # of the file's bytes
    source_size: tuple[int, int]  # (width, height) in the file, after EXIF orientation
    pixels: np.ndarray = field(repr=False)  # (H, W, 3) uint8, the size the model sees

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


def _to_rgb(im):
    """Any Pillow mode -> RGB (transparency over white, deep greys scaled by their range)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        im = Image.fromarray(np.round(scaled).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def _fit(im, width: int | None, height: int | None, resize: str):
    from PIL import Image

    w, h = im.size
    if width is None or height is None:
        width, height = w // 8 * 8, h // 8 * 8
        if width < 8 or height < 8:
            raise UsageError(f"--init-img: {w}x{h} is smaller than 8x8")
        return im.crop((0, 0, width, height)) if (width, height) != (w, h) else im
    if resize == "stretch":
        return im.resize((width, height), Image.LANCZOS)
    cover = resize == "crop"
    k = max(width / w, height / h) if cover else min(width / w, height / h)
    sw, sh = max(1, round(w * k)), max(1, round(h * k))
    scaled = im.resize((sw, sh), Image.LANCZOS)
    if cover:
        left, top = (sw - width) // 2, (sh - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(scaled, ((width - sw) // 2, (height - sh) // 2))
    return canvas


def load_init_image(path: str | Path, width: int | None = None, height: int | None = None,
                    resize: str = "crop") -> InitImage:
    """The picture at `path` as the model's input (module docstring); UsageError with the reason otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if resize not in RESIZE_MODES:
        raise UsageError(f"--resize {resize}: choose one of {', '.join(RESIZE_MODES)}")
    try:
        data = _read(path)
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UsageError(f"--init-img {path}: {w}x{h} is more than {MAX_PIXELS:,} pixels (4096x4096); "
                                 "make it smaller first")
            im.load()
            im = ImageOps.exif_transpose(im)
            source = im.size
            rgb = _fit(_to_rgb(im), width, height, resize)
            pixels = np.asarray(rgb, dtype=np.uint8).copy()
    except UsageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit (far above ours), also before decoding
        raise UsageError(f"--init-img {path}: more than {MAX_PIXELS:,} pixels (4096x4096); make it smaller first"
                         ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UsageError(f"--init-img {path}: not a readable image ({str(err).splitlines()[0][:80] or type(err).__name__})"
                         ) from None
    return InitImage(str(path), hashlib.sha256(data).hexdigest(), source, pixels)


def _read(path: Path, flag: str = "--init-img") -> bytes:
    try:
        size = path.stat().st_size
    except OSError as err:
        raise UsageError(f"{flag} {path}: {err.strerror or err}") from None
    if not path.is_file():
        raise UsageError(f"{flag} {path}: not a file")
    if size > MAX_FILE_BYTES:
        raise UsageError(f"{flag} {path}: {size:,} bytes, more than {MAX_FILE_BYTES:,}")
    return path.read_bytes()


@dataclass(frozen=True, eq=False)
class MaskImage:
    """An inpainting mask: white repaints, black keeps; (H, W) uint8 at the init image's size."""

    file: str
    sha256: str
    pixels: np.ndarray = field(repr=False)  # (H, W) uint8
    resized: bool = False  # it was another size and was resized to the image's


def load_mask(path: str | Path, size: tuple[int, int]) -> MaskImage:
    """The mask at `path` as a grey (H, W) uint8 of the image's `size` (width, height); transparency
    counts as black (keep). A mask of another size is resized (Lanczos; `resized` says so for a
    warning). A mask with nothing white (no pixel >= 128) is an error: there would be nothing to do."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        data = _read(path, "--mask")
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UsageError(f"--mask {path}: {w}x{h} is more than {MAX_PIXELS:,} pixels (4096x4096)")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            grey = _to_rgb(im).convert("L")
            resized = grey.size != tuple(size)
            if resized:
                grey = grey.resize(tuple(size), Image.LANCZOS)
            pixels = np.asarray(grey, dtype=np.uint8).copy()
    except UsageError:
        raise
    except Image.DecompressionBombError:
        raise UsageError(f"--mask {path}: more than {MAX_PIXELS:,} pixels (4096x4096)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UsageError(f"--mask {path}: not a readable image ({str(err).splitlines()[0][:80] or type(err).__name__})"
                         ) from None
    if not (pixels >= 128).any():
        raise UsageError(f"--mask {path}: it is all black, so nothing would be repainted (white marks what to change)")
    return MaskImage(str(path), hashlib.sha256(data).hexdigest(), pixels, resized)
