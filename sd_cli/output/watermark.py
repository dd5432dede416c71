"""The invisible watermark: imwatermark's "dwtDct" with "StableDiffusionV1", as CompVis' put_watermark."""

from __future__ import annotations

import numpy as np

from sd_cli.output.pixels import check_rgb_uint8

WATERMARK_TEXT = "StableDiffusionV1"
#: imwatermark's own rule (WatermarkEncoder.encode): rows * cols must be at least 256 * 256.
WATERMARK_MIN_PIXELS = 256 * 256

class WatermarkSkipped(Exception):
    """Raised by ``apply_watermark`` when the image is too small for imwatermark.

    Nothing was changed: the caller keeps its original array and saves it unmarked.
    ``str(exc)`` is one line fit for a warning.
    """


def apply_watermark(img: np.ndarray, text: str = WATERMARK_TEXT) -> np.ndarray:
    """Embed ``text`` (UTF-8 bytes) with imwatermark's 'dwtDct' method, as CompVis does.

    ``img`` is (H, W, 3) uint8 RGB; a new RGB array is returned (the input is not modified).
    imwatermark works on BGR, so the channels are flipped in and out.

    Raises ``WatermarkSkipped`` (and changes nothing) when H * W < 256 * 256, the library's own
    limit; the caller turns that into a one-line warning and saves the unmarked image.
    """
    img = check_rgb_uint8(img, "apply_watermark")
    payload = text.encode("utf-8")
    if not payload:
        raise ValueError("watermark text must not be empty")
    h, w = img.shape[:2]
    if h * w < WATERMARK_MIN_PIXELS:
        raise WatermarkSkipped(
            f"image {w}x{h} is too small for the invisible watermark "
            f"(needs at least 256x256 pixels); saved without it"
        )
    from imwatermark import WatermarkEncoder  # slow import (pulls in cv2, pywt, torch)

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    bgr = np.ascontiguousarray(img[:, :, ::-1])
    marked = encoder.encode(bgr, "dwtDct")
    return np.ascontiguousarray(np.asarray(marked, dtype=np.uint8)[:, :, ::-1])


def read_watermark(img: np.ndarray, n_bytes: int = len(WATERMARK_TEXT)) -> bytes:
    """Decode an ``n_bytes``-long 'dwtDct' watermark from an (H, W, 3) uint8 RGB image.

    Note: imwatermark's dwtDct decoder is only reliable on images with some colour texture;
    flat or very smooth images often decode to garbage even right after encoding.
    """
    img = check_rgb_uint8(img, "read_watermark")
    h, w = img.shape[:2]
    if h * w < WATERMARK_MIN_PIXELS:
        raise ValueError(f"image {w}x{h} is too small to carry a watermark (needs 256x256 pixels)")
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", int(n_bytes) * 8)
    return bytes(decoder.decode(np.ascontiguousarray(img[:, :, ::-1]), "dwtDct"))
