"""The built-in demo model: its files (shipped in this folder), its native size and guidance scale.

The lowest layer: numpy and Pillow only. `scenes` draws and reads back its synthetic images.
"""

from pathlib import Path

from sd_cli.demo.scenes import GUIDANCE, SIZE  # noqa: F401  (the demo model's defaults, defined there)

DEMO_DIR = Path(__file__).resolve().parent
DEMO_CKPT = DEMO_DIR / "demo.safetensors"
DEMO_CONFIG = DEMO_DIR / "demo.yaml"


def demo_available() -> bool:
    """Whether this install ships the demo model's weights and config."""
    return DEMO_CKPT.is_file() and DEMO_CONFIG.is_file()
