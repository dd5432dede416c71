"""`--from-file`: prompts from a text file, one per line, with every error naming the line.

Rules (also in `--help`):

* UTF-8, with or without a byte-order mark; a UTF-16/32 file (its BOM gives it away) gets an error
  saying to save it as UTF-8, and any other undecodable line an error naming its number.
* Lines end in LF, CRLF or a lone CR (old Mac); surrounding whitespace is stripped.
* Blank lines and lines whose first non-blank character is `#` are skipped (a `#` later in a line is
  part of the prompt).
* A NUL byte means a binary file, not a prompt list: error naming the line.
* At most MAX_BYTES are read, so `--from-file /dev/zero` or a mistaken multi-gigabyte file fails fast
  instead of filling the memory; a FIFO or `/dev/stdin` works (read up to that limit).

Line numbers count every physical line (blank and comment lines too), 1-based, as an editor shows them.
Prompts longer than CLIP's 75 tokens are kept whole here; the pipeline warns how many tokens it drops.
"""

from __future__ import annotations

import codecs

from sd_cli.errors import PromptFileError

MAX_BYTES = 64 * 1024 * 1024

_UTF8_BOM = codecs.BOM_UTF8
_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),  # before UTF-16 LE: it starts with the same two bytes
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise PromptFileError(f"--from-file {path}: no such file") from None
    except IsADirectoryError:
        raise PromptFileError(f"--from-file {path}: is a folder, not a text file") from None
    except PermissionError:
        raise PromptFileError(f"--from-file {path}: cannot read (permission denied)") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        reason = getattr(err, "strerror", None) or str(err)
        raise PromptFileError(f"--from-file {path}: cannot read ({reason})") from None
    if len(raw) > MAX_BYTES:
        raise PromptFileError(
            f"--from-file {path}: larger than {MAX_BYTES // (1024 * 1024)} MiB; is it really a prompt list?"
        )
    return raw


def parse_prompts(raw: bytes, path: str = "<prompts>") -> list[str]:
    """The prompts in `raw` (the bytes of a prompt file); raises PromptFileError naming the line."""
    for bom, name in _OTHER_BOMS:
        if raw.startswith(bom):
            raise PromptFileError(f"--from-file {path}: the file is {name}; save it as UTF-8")
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    prompts = []
    # bytes.splitlines splits on exactly \n, \r\n and \r (str.splitlines would also split on
    # \x0b, \x0c, \x1c-\x1e, \x85, U+2028/9, which can sit inside a prompt).
    for number, line in enumerate(raw.splitlines(), start=1):
        if b"\x00" in line:
            raise PromptFileError(f"--from-file {path}: line {number} contains a NUL byte (a binary file?)")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PromptFileError(
                f"--from-file {path}: line {number} is not valid UTF-8 (byte 0x{line[err.start]:02x} at "
                f"column {err.start + 1}); save the file as UTF-8"
            ) from None
        text = text.strip()
        if text and not text.startswith("#"):
            prompts.append(text)
    return prompts


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a UTF-8 text file: one per line; BOM, CRLF/CR, blank lines and # comments handled."""
    prompts = parse_prompts(_read_bytes(path), path)
    if not prompts:
        raise PromptFileError(f"--from-file {path}: no prompts in the file (empty, or only blank/# lines)")
    return prompts
