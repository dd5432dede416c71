"""The invisible watermark: imwatermark's "dwtDct" with "StableDiffusionV1", as CompVis' put_watermark."""

from __future__ import annotations

import numpy as np

from sd_cli.output.pixels import check_rgb_uint8

WATERMARK_TEXT = "StableDiffusionV1"
#: Textured images read back in 98/100 at 512x512, 86/100 at 448x448 (bench/results/watermark_readback.md).
WATERMARK_MIN_PIXELS = 512 * 512
_LIBRARY_MIN_PIXELS = 256 * 256  # imwatermark's own rule (WatermarkEncoder.encode / WatermarkDecoder.decode)
_BLOCK = 8  # dwtDct puts one vote for one bit in each 8x8 pixel block (4x4 of the half-size DWT band)


def can_watermark(height: int, width: int) -> bool:
    """Whether an image of ``height`` x ``width`` gets the invisible watermark (and ``watermark: true``).

    dwtDct spreads the 136 bits of "StableDiffusionV1" round-robin over the image's 8x8 blocks and reads
    each bit back by majority vote, so what counts is the number of whole blocks, rows and columns alike:
    ``(height // 8 * 8) * (width // 8 * 8) >= WATERMARK_MIN_PIXELS``. For sizes that are multiples of 8
    (all of SD's) this is just ``height * width >= 512 * 512``; 128x2048 qualifies, 1x300000 does not.
    Below it the mark does not read back reliably, so it is not embedded at all.
    """
    return (int(height) // _BLOCK * _BLOCK) * (int(width) // _BLOCK * _BLOCK) >= WATERMARK_MIN_PIXELS


def too_small_message(height: int, width: int) -> str:
    """The one-line warning for an image that `can_watermark` refuses (``WatermarkSkipped``'s text)."""
    return (f"image {width}x{height} is too small for an invisible watermark that reads back "
            "(needs at least 512x512 pixels or the same area); saved without it")


class WatermarkSkipped(Exception):
    """Raised by ``apply_watermark`` when the image is too small for a mark that reads back.

    Nothing was changed: the caller keeps its original array and saves it unmarked.
    ``str(exc)`` is one line fit for a warning.
    """


def apply_watermark(img: np.ndarray, text: str = WATERMARK_TEXT, *, force: bool = False) -> np.ndarray:
    """Embed ``text`` (UTF-8 bytes) with imwatermark's 'dwtDct' method, as CompVis does.

    ``img`` is (H, W, 3) uint8 RGB; a new RGB array is returned (the input is not modified).
    imwatermark works on BGR, so the channels are flipped in and out.

    Raises ``WatermarkSkipped`` (and changes nothing) when ``can_watermark(H, W)`` is false: the mark
    would not read back; the caller turns that into a one-line warning and saves the unmarked image.
    ``force=True`` embeds down to imwatermark's own limit (256x256 pixels): only for reproducing a file
    that an older sd_cli marked below today's threshold (its metadata says ``watermark: true``).
    """
    img = check_rgb_uint8(img, "apply_watermark")
    payload = text.encode("utf-8")
    if not payload:
        raise ValueError("watermark text must not be empty")
    h, w = img.shape[:2]
    if not (can_watermark(h, w) or force and h * w >= _LIBRARY_MIN_PIXELS):
        raise WatermarkSkipped(too_small_message(h, w))
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
    if h * w < _LIBRARY_MIN_PIXELS:  # reading smaller marked images is imwatermark's call, not ours
        raise ValueError(f"image {w}x{h} is too small to carry a watermark (needs 256x256 pixels)")
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", int(n_bytes) * 8)
    return bytes(decoder.decode(np.ascontiguousarray(img[:, :, ::-1]), "dwtDct"))
