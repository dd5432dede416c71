"""The shipped model configs (YAML only). `configs/stable-diffusion` in a checkout links here."""
