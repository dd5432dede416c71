"""From decoder output to PNG files on disk: pixels, grids, watermark, metadata, safe saving.

Pipeline order (as in CompVis ``scripts/txt2img.py``)::

    pixels = to_uint8(decoded)                     # (B, H, W, 3) uint8
    for img in pixels:
        try:
            img = apply_watermark(img)
        except WatermarkSkipped as w:              # image too small: saved unmarked
            warn(str(w))
        save_png(sample_dir, SAMPLE_PATTERN, img, parameters=..., metadata=...)
    grid = make_grid(all_pixels, n_rows)           # watermarked separately, like CompVis
    save_png(out_dir, GRID_PATTERN, grid, ...)

Differences from CompVis, on purpose:

* ``to_uint8`` rounds to the nearest integer; CompVis truncated (``astype(np.uint8)``), which
  makes every pixel up to one level darker (mid-grey 0.0 gives 128 here, 127 there).
* File numbers come from the highest number already used by *this* pattern, not from counting
  the files in the folder, and a name is claimed atomically, so nothing is ever overwritten,
  even by two runs writing into one folder at once.

Heavy imports (torch, imwatermark) happen inside the functions that need them, so reading
metadata (``read_png_metadata``) stays quick.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from sd_cli.errors import OutputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "GRID_PATTERN",
    "SAMPLE_PATTERN",
    "WATERMARK_TEXT",
    "WatermarkSkipped",
    "a1111_parameters",
    "apply_watermark",
    "ensure_writable_dir",
    "make_grid",
    "next_free_index",
    "parse_a1111_parameters",
    "read_png_metadata",
    "read_watermark",
    "save_png",
    "to_uint8",
]

SAMPLE_PATTERN = "{:05}.png"
GRID_PATTERN = "grid-{:04}.png"

WATERMARK_TEXT = "StableDiffusionV1"
#: imwatermark's own rule (WatermarkEncoder.encode): rows * cols must be at least 256 * 256.
WATERMARK_MIN_PIXELS = 256 * 256

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


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) in [-1, 1], any dtype/device -> (B, H, W, 3) uint8 on the CPU.

    value = round(clamp((x + 1) / 2, 0, 1) * 255), computed in float32 on ``x``'s device and
    rounded half-to-even (``torch.round``). CompVis truncated instead; see the module docstring.
    NaN (e.g. an fp16 VAE overflow) becomes 0 (black) so the result is defined; +/-inf clamp
    to 255 / 0.
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"to_uint8 expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"to_uint8 expects a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    with torch.no_grad():
        y = (x.detach().to(torch.float32) + 1.0) / 2.0
        y = torch.nan_to_num(y, nan=0.0)
        y = y.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def make_grid(images: np.ndarray, n_rows: int, padding: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images like ``torchvision.utils.make_grid(nrow=n_rows, padding,
    pad_value=0)``.

    As in torchvision (and CompVis's ``--n_rows``), ``n_rows`` is the number of images per
    *row*: columns = min(n_rows, N), rows = ceil(N / columns). Every cell is (H + padding) x
    (W + padding) with one extra ``padding`` strip on the right and bottom, so the result is
    (rows * (H + padding) + padding, columns * (W + padding) + padding, C), black where no
    image is. Like torchvision, a single image (N == 1) is returned as it is, without padding.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"make_grid expects (N, H, W, C) images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"make_grid expects uint8 images, got {images.dtype}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if int(n_rows) < 1:
        raise ValueError(f"n_rows must be at least 1, got {n_rows}")
    if int(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n_rows, padding = int(n_rows), int(padding)
    if n == 1:
        return images[0].copy()
    cols = min(n_rows, n)
    rows = int(math.ceil(n / cols))
    cell_h, cell_w = h + padding, w + padding
    grid = np.zeros((rows * cell_h + padding, cols * cell_w + padding, c), dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, cols)
        top, left = r * cell_h + padding, col * cell_w + padding
        grid[top : top + h, left : left + w] = images[k]
    return grid


# --------------------------------------------------------------------------------------------
# Invisible watermark (imwatermark, "dwtDct", as CompVis put_watermark)
# --------------------------------------------------------------------------------------------


class WatermarkSkipped(Exception):
    """Raised by ``apply_watermark`` when the image is too small for imwatermark.

    Nothing was changed: the caller keeps its original array and saves it unmarked.
    ``str(exc)`` is one line fit for a warning.
    """


def _check_rgb_uint8(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{what} expects an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
    return img


def apply_watermark(img: np.ndarray, text: str = WATERMARK_TEXT) -> np.ndarray:
    """Embed ``text`` (UTF-8 bytes) with imwatermark's 'dwtDct' method, as CompVis does.

    ``img`` is (H, W, 3) uint8 RGB; a new RGB array is returned (the input is not modified).
    imwatermark works on BGR, so the channels are flipped in and out.

    Raises ``WatermarkSkipped`` (and changes nothing) when H * W < 256 * 256, the library's own
    limit; the caller turns that into a one-line warning and saves the unmarked image.
    """
    img = _check_rgb_uint8(img, "apply_watermark")
    payload = text.encode("utf-8")
    if not payload:
        raise ValueError("watermark text must not be empty")
    h, w = img.shape[:2]
    if h * w < WATERMARK_MIN_PIXELS:
        raise WatermarkSkipped(
            f"image {w}x{h} is too small for the invisible watermark "
            f"(needs at least 256x256 pixels); saved without it"
        )
    from imwatermark import WatermarkEncoder  # slow import (pulls in cv2, pywt, torch)

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    bgr = np.ascontiguousarray(img[:, :, ::-1])
    marked = encoder.encode(bgr, "dwtDct")
    return np.ascontiguousarray(np.asarray(marked, dtype=np.uint8)[:, :, ::-1])


def read_watermark(img: np.ndarray, n_bytes: int = len(WATERMARK_TEXT)) -> bytes:
    """Decode an ``n_bytes``-long 'dwtDct' watermark from an (H, W, 3) uint8 RGB image.

    Note: imwatermark's dwtDct decoder is only reliable on images with some colour texture;
    flat or very smooth images often decode to garbage even right after encoding.
    """
    img = _check_rgb_uint8(img, "read_watermark")
    h, w = img.shape[:2]
    if h * w < WATERMARK_MIN_PIXELS:
        raise ValueError(f"image {w}x{h} is too small to carry a watermark (needs 256x256 pixels)")
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", int(n_bytes) * 8)
    return bytes(decoder.decode(np.ascontiguousarray(img[:, :, ::-1]), "dwtDct"))


# --------------------------------------------------------------------------------------------
# AUTOMATIC1111 "parameters" text
# --------------------------------------------------------------------------------------------

# (input key, A1111 label) in A1111's order; "Size" is built from width/height.
_A1111_FIELDS = (
    ("steps", "Steps"),
    ("sampler_label", "Sampler"),
    ("Schedule type", "Schedule type"),
    ("scale", "CFG scale"),
    ("seed", "Seed"),
    ("__size__", "Size"),
    ("model_hash", "Model hash"),
    ("model_name", "Model"),
)
_A1111_REQUIRED = ("prompt", "steps", "sampler_label", "scale", "seed", "width", "height")
_A1111_CONSUMED = frozenset(
    {"prompt", "negative_prompt", "width", "height"} | {k for k, _ in _A1111_FIELDS}
)
_A1111_LABELS = frozenset(label for _, label in _A1111_FIELDS)
_A1111_KEY_RE = re.compile(r"\w[\w \-/]*")
_A1111_PARSE_KEY_RE = re.compile(r"\s*(\w[\w \-/]*?)\s*:[ \t]*")
_NEGATIVE_RE = re.compile(r"(?:^|\n)Negative prompt:")
_SIZE_RE = re.compile(r"(\d+)x(\d+)")
_JSON_DECODER = json.JSONDecoder()


def _a1111_value(value: Any) -> str:
    """A1111's quoting: values that would break the "k: v, k: v" line become JSON strings."""
    s = str(value)
    if any(ch in s for ch in ",:\n\r") or s.startswith('"') or s != s.strip():
        return json.dumps(s, ensure_ascii=False)
    return s


def a1111_parameters(p: dict) -> str:
    """Render the AUTOMATIC1111 "parameters" text (the format A1111, Civitai etc. read)::

        <prompt>
        Negative prompt: <negative prompt>          (line omitted when empty)
        Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: ..., Model: ...

    Required keys: prompt, steps, sampler_label, scale, seed, width, height. Optional:
    negative_prompt, model_hash, model_name, "Schedule type" (placed after Sampler, like A1111).
    Any other key is appended verbatim as ``key: value`` in the dict's order (use A1111's labels,
    e.g. "Eta DDIM", "Clip skip", if A1111's paste should recognise them). Keys whose value is
    None are left out. Values holding ``,`` ``:`` or newlines are written as JSON strings, as
    A1111 does. Prompts are written as they are (no escaping exists in this format); a prompt
    line that itself starts with "Negative prompt:" cannot be told apart when parsing back.
    """
    missing = [k for k in _A1111_REQUIRED if p.get(k) is None]
    if missing:
        raise ValueError(f"a1111_parameters: missing {', '.join(missing)}")
    fields: list[tuple[str, Any]] = []
    for key, label in _A1111_FIELDS:
        if key == "__size__":
            fields.append((label, f"{int(p['width'])}x{int(p['height'])}"))
        elif p.get(key) is not None:
            fields.append((label, p[key]))
    for key, value in p.items():
        if key in _A1111_CONSUMED or value is None:
            continue
        if not isinstance(key, str) or not _A1111_KEY_RE.fullmatch(key) or key in _A1111_LABELS:
            raise ValueError(f"a1111_parameters: unusable extra key {key!r}")
        fields.append((key, value))
    line = ", ".join(f"{label}: {_a1111_value(value)}" for label, value in fields)
    prompt = str(p["prompt"])
    negative = p.get("negative_prompt") or ""
    neg_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{neg_line}\n{line}"


def _parse_params_line(line: str) -> list[tuple[str, str]] | None:
    """Split "k: v, k: "quoted, v", ..." into pairs; None if the line is not such a list."""
    out: list[tuple[str, str]] = []
    pos, n = 0, len(line)
    while True:
        m = _A1111_PARSE_KEY_RE.match(line, pos)
        if m is None:
            return None
        key, pos = m.group(1), m.end()
        if pos < n and line[pos] == '"':
            try:
                value, pos = _JSON_DECODER.raw_decode(line, pos)
            except ValueError:
                return None
            if not isinstance(value, str):
                return None
        else:
            end = line.find(",", pos)
            end = n if end < 0 else end
            value, pos = line[pos:end].strip(), end
        out.append((key, value))
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n:
            return out
        if line[pos] != ",":
            return None
        pos += 1


def _convert(value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        return value


def parse_a1111_parameters(text: str) -> dict:
    """Inverse of ``a1111_parameters``; also reads A1111's own texts.

    Returns prompt and negative_prompt ("" when absent) and, where present: steps (int),
    sampler_label, scale (float), seed (int), width/height (int, from Size), model_hash,
    model_name; every other field under its label with its (unquoted) string value.
    As in A1111, the last line is the settings line only if it holds at least three
    "key: value" fields. The "sd_cli" JSON chunk, not this text, is the exact record.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty A1111 parameters text")
    head, _, last = text.rpartition("\n")
    fields = _parse_params_line(last)
    if fields is None or len(fields) < 3:
        head, fields = text, []
    m = _NEGATIVE_RE.search(head)
    if m:
        prompt, negative = head[: m.start()], head[m.end() :]
        if negative.startswith(" "):
            negative = negative[1:]
    else:
        prompt, negative = head, ""
    res: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    for label, value in fields:
        if label == "Steps":
            res["steps"] = _convert(value, int)
        elif label == "Sampler":
            res["sampler_label"] = value
        elif label == "CFG scale":
            res["scale"] = _convert(value, float)
        elif label == "Seed":
            res["seed"] = _convert(value, int)
        elif label == "Size" and _SIZE_RE.fullmatch(value):
            w, h = _SIZE_RE.fullmatch(value).groups()
            res["width"], res["height"] = int(w), int(h)
        elif label == "Model hash":
            res["model_hash"] = value
        elif label == "Model":
            res["model_name"] = value
        else:
            res[label] = value
    return res


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Writing PNGs
# --------------------------------------------------------------------------------------------


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError):
        msg = e.strerror or (os.strerror(e.errno) if e.errno else "") or str(e)
    else:
        msg = str(e)
    msg = " ".join(str(msg).split())
    return msg or type(e).__name__


def _write_png(f: BinaryIO, img: np.ndarray, parameters: str, metadata: dict) -> None:
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
    img = _check_rgb_uint8(img, "save_png")
    _pattern_regex(pattern)
    if not isinstance(parameters, str):
        raise TypeError("parameters must be a str")
    tmp: Path | None = None
    try:
        tmp, fd = _create_temp(directory)
        with os.fdopen(fd, "wb") as f:
            _write_png(f, img, parameters, metadata)
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
