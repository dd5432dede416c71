"""The built-in demo model: its files (shipped in this folder), its native size and guidance scale.

The lowest layer: numpy and Pillow only. `scenes` draws and reads back its synthetic images.
"""

from pathlib import Path

from sd_cli.demo.scenes import GUIDANCE, SIZE  # noqa: F401  (the demo model's defaults, defined there)

DEMO_DIR = Path(__file__).resolve().parent
DEMO_CKPT = DEMO_DIR / "demo.safetensors"
DEMO_CONFIG = DEMO_DIR / "demo.yaml"


# Earlier demo models, by their A1111 short hash: the commit whose sd_cli/demo/ holds that model's files, so
# an image made with one of them can still be replayed (`--ckpt` and `--config` of those files).
PREVIOUS_DEMOS = {
    "1c0d7b6820": "c7284fb",
    "bb1ae9fff7": "def5679",
    "9d68ae794a": "ff0b696",
    "5f48eda663": "1838a7b",
    "952c213042": "1e15168",
}


def previous_demo_hint(model_hash: str) -> str:
    """How to get back the earlier demo model with this hash, or "" if it is not one of them."""
    commit = PREVIOUS_DEMOS.get(model_hash)
    if commit is None:
        return ""
    return (f"it is an earlier demo model: git show {commit}:sd_cli/demo/demo.safetensors > old.safetensors and "
            f"git show {commit}:sd_cli/demo/demo.yaml > old.yaml in sd_cli's repository, then --ckpt old.safetensors "
            "--config old.yaml")


def demo_available() -> bool:
    """Whether this install ships the demo model's weights and config."""
    return DEMO_CKPT.is_file() and DEMO_CONFIG.is_file()
