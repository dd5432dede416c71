"""The project's own exceptions: each carries one line for stderr and an exit code.

The CLI catches `SdCliError` and prints `str(err)` alone (no traceback unless --debug);
anything else reaching the top is a bug.
"""


class SdCliError(Exception):
    """A failure the user can act on. `exit_code` 1 = runtime failure, 2 = usage error."""

    exit_code = 1


class UsageError(SdCliError):
    """Bad arguments or impossible settings (exit code 2, like argparse)."""

    exit_code = 2


class ConfigError(SdCliError):
    """A YAML config that is missing, unreadable or lacks needed numbers."""


class CheckpointError(SdCliError):
    """A checkpoint that is missing, unreadable, corrupt, unsafe or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for a global outside the allowlist (it could run code)."""


class UnsupportedModelError(CheckpointError):
    """A readable checkpoint of a model family this tool does not run (SD 2.x, SDXL, ...)."""


class OutputError(SdCliError):
    """The output folder cannot be created or written."""


class PromptFileError(UsageError):
    """A --from-file that is missing, empty or undecodable."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, Slurm, Kubernetes, torchrun stopping its ranks): handled like Ctrl-C,
    exit code 143 instead of 130."""


class StdoutError(SdCliError):
    """Standard output cannot take the report: closed, or the disk behind it is full."""


class StdoutClosedByReader(StdoutError):
    """The reader of our stdout went away (EPIPE, `--json | head`): exit quietly, as Unix tools do."""

    exit_code = 141  # 128 + SIGPIPE: what a shell shows for a tool stopped by a closed pipe
