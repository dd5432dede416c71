"""The names of the compute dtypes (`--dtype`), kept free of torch so the CLI's --help stays quick."""

DTYPE_NAMES = ("fp32", "bf16", "fp16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
