"""`python -m sd_cli` is `sd-txt2img`."""

from sd_cli.cli import run

run()
