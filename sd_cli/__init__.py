"""sd_cli: Stable Diffusion v1.x text-to-image on your own machine.

    import sd_cli
    sd = sd_cli.StableDiffusion.load()                      # no path: the built-in demo model
    images = sd.txt2img("a red circle on a blue background", seed=42, n=2)   # PIL images

Layers, each importing only those below it: cli -> run -> pipeline -> output -> weights -> model ->
sampling -> demo (README "Layers").
"""

from sd_cli.version import __version__  # noqa: F401


def __getattr__(name: str):
    if name in ("StableDiffusion", "save_images"):  # imported on first use: `import sd_cli` stays light
        from sd_cli.run import api

        return getattr(api, name)
    raise AttributeError(f"module 'sd_cli' has no attribute {name!r}")
