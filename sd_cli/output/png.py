"""PNG files on disk: numbering, atomic never-overwriting saves, the two metadata chunks, output folders.

File numbers come from the highest number already used by *this* pattern, not from counting the files
in the folder (as CompVis did), and a name is claimed atomically, so nothing is ever overwritten, even
by two runs writing into one folder at once. The order of one image's way out (sd_cli.run.sink):
to_uint8 (pixels.py) -> apply_watermark (watermark.py) -> a1111_parameters (a1111.py) -> save_png.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import string
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sd_cli.errors import OutputError
from sd_cli.output.pixels import check_rgb_uint8

SAMPLE_PATTERN = "{:05}.png"
GRID_PATTERN = "grid-{:04}.png"

#: zlib level for PNGs (Pillow's default). Fixed so equal inputs give equal bytes.
PNG_COMPRESS_LEVEL = 6

# Temporary files: dot-prefixed (hidden), ".tmp" suffix so no output pattern matches them.
_TMP_PREFIX = ".sd_cli-"
_TMP_SUFFIX = ".png.tmp"

# os.link failures that are real trouble with the folder, not "hard links unsupported here".
_LINK_FATAL_ERRNOS = frozenset(
    e
    for e in (
        getattr(errno, "ENOSPC", None),
        getattr(errno, "EDQUOT", None),
        getattr(errno, "EROFS", None),
        getattr(errno, "EIO", None),
        getattr(errno, "ENOENT", None),
        getattr(errno, "ENOTDIR", None),
    )
    if e is not None
)
_MAX_NAME_ATTEMPTS = 10_000


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Check a name pattern such as "{:05}.png" and return a regex capturing its number."""
    try:
        parts = list(string.Formatter().parse(pattern))
    except ValueError as e:
        raise ValueError(f"bad file name pattern {pattern!r}: {e}") from None
    fields = [p for p in parts if p[1] is not None]
    if len(fields) != 1 or fields[0][1] not in ("", "0") or fields[0][3] is not None:
        raise ValueError(f"file name pattern {pattern!r} needs exactly one '{{}}' field for the number")
    prefix, suffix, seen = "", "", False
    for literal, field, _, _ in parts:
        if seen:
            suffix += literal
        else:
            prefix += literal
        if field is not None:
            seen = True
    for sep in (os.sep, os.altsep, "\0"):
        if sep and sep in prefix + suffix:
            raise ValueError(f"file name pattern {pattern!r} must be a plain file name")
    if prefix.startswith(_TMP_PREFIX) or not (prefix + suffix):
        raise ValueError(f"file name pattern {pattern!r} is not usable")
    rx = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    for probe in (0, 7, 123456):
        m = rx.fullmatch(pattern.format(probe))
        if m is None or int(m.group(1)) != probe:
            raise ValueError(f"file name pattern {pattern!r} must write the number in decimal digits")
    return rx


def next_free_index(directory: Path, pattern: str, start_index: int = 0) -> int:
    """1 + the highest number among names in ``directory`` that ``pattern`` would produce
    (exactly: ``pattern.format(n) == name``), and at least ``start_index``.

    Other files never matter: "notes.txt", "foo-00099.png" or "7.png" leave "{:05}.png" alone.
    """
    rx = _pattern_regex(pattern)
    best = int(start_index)
    for name in os.listdir(directory):
        m = rx.fullmatch(name)
        if m is not None:
            n = int(m.group(1))
            if pattern.format(n) == name and n + 1 > best:
                best = n + 1
    return best


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError):
        msg = e.strerror or (os.strerror(e.errno) if e.errno else "") or str(e)
    else:
        msg = str(e)
    msg = " ".join(str(msg).split())
    return msg or type(e).__name__


def write_png(f: BinaryIO, img: np.ndarray, parameters: str, metadata: dict) -> None:
    """Encode ``img`` as PNG with the two text chunks into the open binary file ``f``.

    Pillow's ``add_text`` writes tEXt for latin-1 text and iTXt (UTF-8) otherwise. No tIME
    chunk and a fixed compression level, so equal inputs give equal bytes.
    """
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("sd_cli", json.dumps(metadata, sort_keys=True))
    Image.fromarray(np.ascontiguousarray(img)).save(
        f, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL
    )


def _create_temp(directory: Path) -> tuple[Path, int]:
    """Create a new, unique, hidden temp file in ``directory``; return (path, fd)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}{_TMP_SUFFIX}"
        try:
            return path, os.open(path, flags, 0o666)  # 0o666 & ~umask, like any new file
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", str(directory))


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable (POSIX); silently skipped where unsupported."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _claim_exact(directory: Path, pattern: str, tmp: Path, index: int) -> Path:
    """Give the temp file the name of number `index` exactly; OutputError if that name is taken."""
    final = directory / pattern.format(index)
    try:
        try:
            os.link(tmp, final)  # atomic; EEXIST if the name is taken
            return final
        except OSError as e:
            if isinstance(e, FileExistsError) or e.errno in _LINK_FATAL_ERRNOS:
                raise
        # No hard links here: reserve the name, then rename over the empty placeholder we own.
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    except FileExistsError:
        raise OutputError(f"cannot save image as {final}: that file already exists (another run writing "
                          "into the same folder?); it was left as it is") from None
    return _fill_placeholder(tmp, final)


def _fill_placeholder(tmp: Path, final: Path) -> Path:
    """Move the finished temp file onto the empty placeholder `final` (which we created), atomically;
    on failure the placeholder is removed, so no empty file is left behind."""
    try:
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(final)
        except OSError:
            pass
        raise
    return final


def _claim_name(directory: Path, pattern: str, tmp: Path, start_index: int, exact: bool = False) -> Path:
    """Give the finished temp file its final name without ever replacing an existing file."""
    if exact:
        return _claim_exact(directory, pattern, tmp, start_index)
    index = next_free_index(directory, pattern, start_index)
    use_link = True
    for _ in range(_MAX_NAME_ATTEMPTS):
        final = directory / pattern.format(index)
        if use_link:
            try:
                os.link(tmp, final)  # atomic; EEXIST if the name is taken
                return final
            except FileExistsError:
                index = max(index + 1, next_free_index(directory, pattern, start_index))
                continue
            except OSError as e:
                if e.errno in _LINK_FATAL_ERRNOS:
                    raise
                use_link = False  # no hard links here (EPERM, ENOTSUP, EXDEV, ...): reserve + rename
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            index = max(index + 1, next_free_index(directory, pattern, start_index))
            continue
        os.close(fd)
        return _fill_placeholder(tmp, final)
    raise FileExistsError(errno.EEXIST, "no free file name found", str(directory / pattern.format(index)))


def save_png(
    directory: Path,
    pattern: str,
    img: np.ndarray,
    *,
    parameters: str,
    metadata: dict,
    start_index: int = 0,
    exact: bool = False,
) -> Path:
    """Write ``img`` ((H, W, 3) uint8 RGB) as ``directory / pattern.format(n)`` and return the path.

    n = max(start_index, 1 + the highest n already used by this pattern in the folder).
    The PNG carries a "parameters" chunk (A1111 text) and an "sd_cli" chunk
    (``json.dumps(metadata, sort_keys=True)``).

    Safety: the PNG is written to a hidden temp file in the same folder and fsynced; then the
    final name is claimed with ``os.link`` (which fails if the name exists: the next number is
    tried), and the temp name removed. Where hard links are not supported the name is reserved
    with ``O_CREAT | O_EXCL`` and the temp file renamed over the (empty) placeholder. A crash or
    Ctrl-C never leaves a half-written PNG under a final name; the temp file is removed on any
    exception (a SIGKILL can leave a hidden ``.sd_cli-*.png.tmp``). ``directory`` must exist
    (see ``ensure_writable_dir``). OS errors (disk full, read-only, permissions...) raise
    ``OutputError`` with one line naming the folder.

    ``exact=True`` (runs under torchrun, where the number comes from the work item): the file gets
    number ``start_index`` or nothing; a taken name is an ``OutputError`` and the file there is kept.
    """
    directory = Path(directory)
    img = check_rgb_uint8(img, "save_png")
    _pattern_regex(pattern)
    if not isinstance(parameters, str):
        raise TypeError("parameters must be a str")
    tmp: Path | None = None
    try:
        tmp, fd = _create_temp(directory)
        with os.fdopen(fd, "wb") as f:
            write_png(f, img, parameters, metadata)
            f.flush()
            os.fsync(f.fileno())
        final = _claim_name(directory, pattern, tmp, start_index, exact)
        _fsync_dir(directory)
        return final
    except OSError as e:
        raise OutputError(f"cannot save image in {directory}: {_describe(e)}") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass  # already renamed into place (no-hard-link path)
            except OSError:
                pass


def read_png_metadata(path: str | os.PathLike) -> tuple[str | None, dict | None]:
    """Return (A1111 "parameters" text, decoded "sd_cli" JSON) from a PNG; None for a missing chunk.

    Raises ValueError if the "sd_cli" chunk is not a JSON object; Pillow's errors propagate
    for files that are not readable images.
    """
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", None) or {})
    params = text.get("parameters")
    raw = text.get("sd_cli")
    meta = None
    if raw is not None:
        try:
            meta = json.loads(str(raw))
        except ValueError:
            meta = None  # reported just below, in one line
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: the sd_cli metadata is not a JSON object")
    return (str(params) if params is not None else None), meta


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` (with parents) and prove a file can be created in it.

    Raises ``OutputError("cannot write to output folder X: <reason>")`` otherwise. Meant to run
    before any model loading, so a bad --outdir fails in a second, not after minutes.
    """
    path = Path(path)
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"cannot write to output folder {path}: it exists and is not a folder") from None
        tmp, fd = _create_temp(path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"cannot write to output folder {path}: {_describe(e)}") from e
