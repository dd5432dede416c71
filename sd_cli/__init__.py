"""sd_cli: Stable Diffusion v1.x text-to-image on your own machine."""

__version__ = "0.1.0"
