"""`GeneratedImage`: a PIL image that carries what the CLI writes into its PNG, and keeps it when saved.

`.info["parameters"]` is the A1111 text, `.info["sd_cli"]` the JSON record (as Pillow shows both when it
opens the CLI's PNG). `image.save("x.png")` writes them as the two text chunks, so the file replays
with `sd-txt2img --replay`. Any other format, or an explicit `pnginfo=`, is saved as Pillow would.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, PngImagePlugin


class GeneratedImage(Image.Image):
    """An RGB image with its sd_cli metadata."""

    sd_cli_metadata: dict

    @classmethod
    def of(cls, pixels: np.ndarray, parameters: str, metadata: dict) -> "GeneratedImage":
        """From (H, W, 3) uint8 pixels and the two texts the CLI writes."""
        img = Image.fromarray(np.ascontiguousarray(pixels))
        img.__class__ = cls  # same object layout: Pillow's own constructors build the image
        img.sd_cli_metadata = dict(metadata)
        img.info["parameters"] = parameters
        img.info["sd_cli"] = json.dumps(metadata, sort_keys=True)
        return img

    def save(self, fp, format=None, **params):  # type: ignore[override]
        name = os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else getattr(fp, "name", "")
        is_png = (format or "").upper() == "PNG" or (format is None and str(name).lower().endswith(".png"))
        if is_png and "pnginfo" not in params:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", self.info["parameters"])
            info.add_text("sd_cli", self.info["sd_cli"])
            params["pnginfo"] = info
        return super().save(fp, format, **params)
