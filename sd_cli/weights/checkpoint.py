"""Checkpoint I/O: read a state dict from an untrusted `.safetensors` or PyTorch zip file, and hash files.

A `.ckpt` is a zip archive holding a pickle (`<prefix>/data.pkl`) plus one raw file per tensor storage
(`<prefix>/data/<key>`). Unpickling runs whatever callables the pickle names, so this module never calls
`pickle.load` or `torch.load`: `_RestrictedUnpickler` resolves every global through `_SAFE_GLOBALS`, a
table of plain containers (OrderedDict, set) and our OWN small functions (tensor rebuilding, numpy
scalars), plus inert placeholders for PyTorch Lightning classes. Any other global raises
`UnsafeCheckpointError` before anything could run. Before unpickling, the opcode stream is scanned once
(`_check_pickle_memo`) so that no memo index can make the C unpickler allocate more than the pickle's size.

Storage data is memory-mapped copy-on-write and viewed with `torch.frombuffer`, so a 4 GB file is not
read up front; every storage and tensor extent is bounds-checked before a view is made. A zip member must
declare exactly the bytes its pickle record asks for (numel x itemsize); a compressed member (torch writes
none, but zip tools can) is inflated in 1 MB steps straight into its one buffer and refused the moment it
would give more, so a small file cannot make us allocate more than its own pickle declares.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import hashlib
import io
import json
import logging
import math
import mmap
import os
import pickle
import stat
import struct
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_cli.errors import CheckpointError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_EMA_PREFIX = "model_ema."
_MAX_PICKLE_BYTES = 256 * 1024 * 1024  # data.pkl of an SD checkpoint is ~100 KB
_HASH_CHUNK = 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024  # bytes read or inflated per step of a compressed zip member
_DEFLATE_MAX_RATIO = 1032  # deflate's ceiling: 258 bytes per 2-bit length/distance pair


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def read_object(path: str | Path) -> Any:
    """The top object of a .safetensors file (a dict of tensors) or a PyTorch zip file (whatever it pickled,
    through the restricted unpickler: no code runs). For add-on files (embeddings) whose layout varies."""
    path = Path(path)
    head = _check_readable(path)
    if _looks_like_safetensors(head) or path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    if head.startswith(b"PK\x03\x04"):
        return _read_torch_zip(path)
    raise CheckpointError(f"{path} is neither a safetensors file nor a PyTorch zip file (unrecognised content)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Return the tensors of a checkpoint, keyed by name, without running code from the file.

    Accepts `.safetensors` and PyTorch zip checkpoints (`.ckpt`/`.pt`/`.pth`/`.bin`, sniffed by content).
    A Lightning checkpoint's nested `state_dict` is unwrapped; non-tensor entries and `model_ema.*` keys
    are dropped. Tensors keep their stored dtype. Raises `CheckpointError` (or `UnsafeCheckpointError`).
    """
    path = Path(path)
    head = _check_readable(path)
    if _looks_like_safetensors(head):
        top: Any = _read_safetensors(path)
    elif head.startswith(b"PK\x03\x04"):
        top = _read_torch_zip(path)
    elif path.suffix.lower() == ".safetensors":
        top = _read_safetensors(path)  # let the library say what is wrong with the header
    elif _looks_like_legacy_torch(head):
        raise CheckpointError(
            f"checkpoint {path}: legacy PyTorch format (pre-1.6 torch.save) not supported; convert to .safetensors"
        )
    else:
        raise CheckpointError(
            f"checkpoint {path} is neither a safetensors file nor a PyTorch zip checkpoint "
            "(unrecognised content; corrupt or wrong file?)"
        )
    return _unpack_state_dict(top, path)


def file_hash(path: str | Path) -> str:
    """sha256 hex digest of the whole file, cached by absolute path + size + mtime_ns.

    The first 10 hex chars are AUTOMATIC1111's "AutoV2" model hash (see `short_hash`). The cache lives
    in `$XDG_CACHE_HOME/sd_cli/hashes.json` (default `~/.cache/...`) and is best-effort.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as err:
        raise CheckpointError(f"cannot hash {path}: {err.strerror or err}") from None
    key = os.path.abspath(path)
    cache_file = _hash_cache_file()
    cache = _load_hash_cache(cache_file)
    entry = cache.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise CheckpointError(f"cannot hash {path}: {err.strerror or err}") from None
    value = digest.hexdigest()
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": value}
    _store_hash_cache(cache_file, cache)
    return value


def short_hash(path: str | Path) -> str:
    """AUTOMATIC1111's "AutoV2" hash: the first 10 hex chars of the file's sha256."""
    return file_hash(path)[:10]


# --------------------------------------------------------------------------------------------------
# File checks and format sniffing
# --------------------------------------------------------------------------------------------------


def _check_readable(path: Path) -> bytes:
    """Fail with one clear line unless `path` is a readable, non-empty regular file; return its head."""
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"checkpoint {path} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"checkpoint {path} is not a regular file")
        if st.st_size == 0:
            raise CheckpointError(f"checkpoint {path} is 0 bytes (incomplete download?)")
        with open(path, "rb") as f:
            return f.read(16)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except PermissionError:
        raise CheckpointError(f"checkpoint {path} is not readable (permission denied)") from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header itself.
    return len(head) >= 9 and head[8:9] == b"{"


def _looks_like_legacy_torch(head: bytes) -> bool:
    # Pre-1.6 torch.save wrote a bare pickle stream (PROTO opcode first) instead of a zip.
    return len(head) >= 2 and head[0] == 0x80 and head[1] <= pickle.HIGHEST_PROTOCOL


# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _utf8_path(path: Path):
    """A path the safetensors library can take: itself, or for a file name that is not UTF-8 (the library
    wants valid UTF-8 text) the same open file through /proc/self/fd, still memory-mapped."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield text


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with _utf8_path(path) as name, safe_open(name, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # the library raises SafetensorError, OSError, ValueError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = reason.removeprefix("Error while deserializing header: ")
        raise CheckpointError(
            f"checkpoint {path} is not a valid safetensors file ({reason}); truncated or corrupt?"
        ) from None


# --------------------------------------------------------------------------------------------------
# PyTorch zip checkpoints
# --------------------------------------------------------------------------------------------------


class _Malformed(ValueError):
    """Bad values inside data.pkl; `_read_torch_zip` turns it into a CheckpointError naming the file."""


class _StorageType:
    """What the pickle's `torch.FloatStorage` etc. resolves to: only a dtype tag for persistent_load."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class _Storage:
    """Raw bytes of one `data/<key>` entry, viewed as whatever dtype the tensors ask for."""

    def __init__(self, key: str, raw: torch.Tensor, dtype: torch.dtype, big_endian: bool):
        self.key = key
        self.raw = raw  # uint8, exactly the declared number of bytes
        self.dtype = dtype  # the storage's declared element type (uint8 for UntypedStorage)
        self.big_endian = big_endian
        self._views: dict[torch.dtype, torch.Tensor] = {}

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        """1-D tensor of `dtype` over the whole storage (native byte order)."""
        if dtype in self._views:
            return self._views[dtype]
        itemsize = _itemsize(dtype)
        raw = self.raw
        if raw.numel() % itemsize:
            raise _Malformed(
                f"storage data/{self.key} holds {raw.numel()} bytes, not a whole number of {dtype} elements"
            )
        if self.big_endian and itemsize > 1:
            raw = raw.view(-1, itemsize).flip(1).reshape(-1)  # copy, now little-endian
        elif raw.numel() and raw.data_ptr() % itemsize:
            raw = raw.clone()  # misaligned inside the file; a fresh buffer is aligned
        view = raw.view(dtype)
        self._views[dtype] = view
        return view


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _ZipCheckpoint:
    """Index of a torch zip archive plus a copy-on-write mapping of the file for storage data.

    Member bytes are never taken on trust from `zipfile`: a stored storage is a bounds-checked view of the
    mapping; anything else is inflated by `_extract_into`, in bounded steps, straight into its one buffer.
    """

    def __init__(self, path: Path, file: io.BufferedReader):
        self.path = path
        self.fd = file.fileno()
        self.size = os.fstat(self.fd).st_size
        self.inflated = 0  # bytes of compressed storages inflated so far (see `_charge`)
        try:
            self.zip = zipfile.ZipFile(file)
            infos = self.zip.infolist()
        except Exception as err:  # BadZipFile, EOFError, struct.error, ... from a damaged directory
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a valid zip archive ({err}); re-download it"
            ) from None
        self.entries = {info.filename: info for info in infos}
        pkl = [n for n in self.entries if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pkl) != 1:
            raise CheckpointError(
                f"checkpoint {path} is a zip archive but not a PyTorch checkpoint (no single data.pkl)"
            )
        self.prefix = pkl[0][: -len("data.pkl")]  # "archive/" or "" (very old writers)
        try:
            self.map: mmap.mmap | None = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):
            self.map = None  # unusual file systems; fall back to reading bytes
        byteorder = "little"  # files from torch < 1.10 have no byteorder record and are little-endian
        if self.prefix + "byteorder" in self.entries:
            raw = self.read(self.prefix + "byteorder", limit=16).getvalue()
            byteorder = raw.decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"checkpoint {path} declares an unknown byte order {byteorder!r}")
        self.big_endian = byteorder == "big"

    def read(self, name: str, limit: int) -> io.BytesIO:
        """A small member (data.pkl, byteorder) as a file object: one buffer of its declared size."""
        info = self.entries[name]
        if info.file_size > limit:
            raise CheckpointError(f"checkpoint {self.path}: {name} is implausibly large ({info.file_size} bytes)")
        out = io.BytesIO()
        if info.file_size:
            out.seek(info.file_size - 1)
            out.write(b"\0")  # sizes the buffer once; the member is inflated into it in place
            with out.getbuffer() as view:
                self._extract_into(info, view)
        out.seek(0)
        return out

    def storage_bytes(self, key: str, nbytes: int) -> torch.Tensor:
        """uint8 tensor of `<prefix>/data/<key>`, which must hold exactly `nbytes` (numel x itemsize).

        A stored member is mapped from the file; a compressed one is inflated into a fresh tensor of
        `nbytes`, never further, so a member cannot make us hold more than the pickle asked for.
        """
        name = f"{self.prefix}data/{key}"
        info = self.entries.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {self.path} is missing tensor storage data/{key}; corrupt file?")
        if info.file_size < nbytes:
            raise CheckpointError(
                f"checkpoint {self.path}: storage data/{key} holds {info.file_size} bytes but its tensor "
                f"needs {nbytes}; truncated or corrupt file"
            )
        if info.file_size > nbytes:
            raise CheckpointError(
                f"checkpoint {self.path}: storage data/{key} declares {info.file_size} bytes but its pickle "
                f"record asks for {nbytes} (numel x itemsize); refusing a corrupt file or decompression bomb"
            )
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        if info.compress_type == zipfile.ZIP_STORED and self.map is not None:
            start, end = self._data_span(info)
            return torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=start)
        self._charge(key, nbytes)
        no_memory = f"checkpoint {self.path}: not enough memory to inflate storage data/{key} ({nbytes} bytes)"
        try:
            out = torch.empty(nbytes, dtype=torch.uint8)
        except (MemoryError, RuntimeError):  # torch: "DefaultCPUAllocator: can't allocate memory"
            raise CheckpointError(no_memory) from None
        try:
            self._extract_into(info, memoryview(out.numpy()))
        except MemoryError:  # a 1 MB step's buffers under a tight limit
            raise CheckpointError(no_memory) from None
        return out

    def _charge(self, key: str, nbytes: int) -> None:
        """Refuse compressed storages that together need more memory than this machine has."""
        self.inflated += nbytes
        limit = _physical_memory()
        if limit and self.inflated > limit:
            raise CheckpointError(
                f"checkpoint {self.path}: compressed storages up to data/{key} inflate to {self.inflated} bytes, "
                f"more than this machine's {limit} bytes of memory; refusing it (decompression bomb?)"
            )

    def _extract_into(self, info: zipfile.ZipInfo, out: memoryview) -> None:
        """Write member `info` into `out` (exactly `info.file_size` bytes) and check its CRC.

        Inflation goes in steps of at most `_INFLATE_CHUNK` bytes in and out (zlib's `max_length`), and a
        stream that would produce even one byte more than the declared size is refused.
        """
        name = info.filename
        where = f"checkpoint {self.path}: {name}"
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{where} is encrypted; not a PyTorch checkpoint")
        method = info.compress_type
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(
                f"{where} uses zip compression method {method}; only stored and deflated entries are supported"
            )
        size, packed = info.file_size, info.compress_size
        if method == zipfile.ZIP_STORED and packed != size:
            raise CheckpointError(f"{where} is stored but its sizes disagree ({packed} vs {size}); corrupt file")
        if method == zipfile.ZIP_DEFLATED and size > _DEFLATE_MAX_RATIO * packed + 1024:
            raise CheckpointError(
                f"{where} declares {size} bytes from {packed} compressed bytes, more than deflate can "
                "produce; refusing a corrupt file or decompression bomb"
            )
        start, end = self._data_span(info)
        try:
            if method == zipfile.ZIP_STORED:
                pos = self._copy(start, size, out)
            else:
                pos = self._inflate(start, end, size, out, where)
        except zlib.error as err:
            raise CheckpointError(f"{where} cannot be inflated ({err}); corrupt file?") from None
        except OSError as err:
            raise CheckpointError(f"{where} cannot be read ({err.strerror or err})") from None
        if pos != size:
            raise CheckpointError(f"{where} inflates to {pos} bytes, not its declared {size}; truncated or corrupt")
        if zlib.crc32(out[:size]) != info.CRC:
            raise CheckpointError(f"{where} fails its CRC check; corrupt file (re-download it)")

    def _copy(self, start: int, size: int, out: memoryview) -> int:
        pos = 0
        while pos < size:
            chunk = self._read_at(start + pos, min(_INFLATE_CHUNK, size - pos))
            if not chunk:
                break
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        return pos

    def _inflate(self, start: int, end: int, size: int, out: memoryview, where: str) -> int:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as in zip
        pos, src = 0, start
        while not inflater.eof:
            data = inflater.unconsumed_tail
            if not data and src < end:
                data = self._read_at(src, min(_INFLATE_CHUNK, end - src))
                src += len(data)
            if not data:
                break  # input used up before the stream's end: truncated
            # max_length 0 would mean "no limit"; at the declared size ask for 1 byte to detect any excess.
            piece = inflater.decompress(data, max(1, min(_INFLATE_CHUNK, size - pos)))
            if len(piece) > size - pos:
                raise CheckpointError(
                    f"{where} inflates to more than its declared {size} bytes; refusing a decompression bomb"
                )
            out[pos : pos + len(piece)] = piece
            pos += len(piece)
        if not inflater.eof:
            raise CheckpointError(f"{where}: its compressed data ends early; truncated or corrupt file")
        return pos

    def _read_at(self, offset: int, n: int) -> bytes:
        if self.map is not None:
            return self.map[offset : offset + n]
        return os.pread(self.fd, n, offset)

    def _data_span(self, info: zipfile.ZipInfo) -> tuple[int, int]:
        """[start, end) of the member's (compressed) bytes in the file, checked against the file size."""
        # Local file header: 30 fixed bytes, then the file name and an extra field of the lengths given.
        header = info.header_offset
        if header < 0 or header + 30 > self.size:
            raise CheckpointError(f"checkpoint {self.path}: zip entry {info.filename} points past the end of the file")
        local = self._read_at(header, 30)
        if local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"checkpoint {self.path}: zip entry {info.filename} has a bad local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = header + 30 + name_len + extra_len
        end = start + info.compress_size
        if end > self.size:
            raise CheckpointError(
                f"checkpoint {self.path}: zip entry {info.filename} runs past the end of the file; truncated?"
            )
        return start, end


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _read_torch_zip(path: Path) -> Any:
    try:
        file = open(path, "rb")
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    with file:
        archive = _ZipCheckpoint(path, file)
        data = archive.read(archive.prefix + "data.pkl", limit=_MAX_PICKLE_BYTES)
        _check_pickle_memo(data, path)
        unpickler = _RestrictedUnpickler(data, archive)
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except _Malformed as err:
            raise CheckpointError(f"checkpoint {path}: {err}") from None
        except MemoryError:
            raise CheckpointError(f"checkpoint {path}: not enough memory to unpickle data.pkl") from None
        except Exception as err:  # malformed pickle opcodes, wrong argument types to our rebuilders, ...
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(
                f"checkpoint {path} has a corrupt or unsupported pickle (data.pkl: {detail})"
            ) from None


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _check_pickle_memo(data: io.BytesIO, path: Path) -> None:
    """Refuse a pickle whose memo indices are larger than the pickle itself, before unpickling.

    The C unpickler grows its memo array to the largest index a PUT names, so a 9-byte pickle with
    `LONG_BINPUT 2**31` makes it allocate (and zero) tens of GB. A real pickle numbers its memo entries
    0, 1, 2, ... (one per PUT/MEMOIZE), so every index is below the pickle's length. One pass over the
    opcodes (pickletools.genops), without building anything; a malformed stream is reported here too.
    """
    import pickletools

    size = len(data.getbuffer())
    try:
        for opcode, arg, pos in pickletools.genops(data):
            if opcode.name in _MEMO_PUTS and (not isinstance(arg, int) or not 0 <= arg <= size):
                raise CheckpointError(
                    f"checkpoint {path} has a corrupt pickle (data.pkl: memo index {arg} at byte {pos} is "
                    f"larger than the pickle itself)"
                )
    except CheckpointError:
        raise
    except Exception as err:  # unknown opcode, truncated argument, no STOP, ...
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} has a corrupt or unsupported pickle (data.pkl: {detail})") from None
    finally:
        data.seek(0)


# --------------------------------------------------------------------------------------------------
# The restricted unpickler and the only callables it can reach
# --------------------------------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, archive: _ZipCheckpoint):
        super().__init__(file, encoding="utf-8")
        self.archive = archive
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles written by Python 3 use Python 2 names (`__builtin__`, `copy_reg`).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _SAFE_GLOBALS.get((module, name))
        if found is not None:
            return found
        if _is_lightning(module):
            return _inert_class(module, name)
        raise UnsafeCheckpointError(
            f"checkpoint {self.archive.path} is unsafe: its pickle asks for {module}.{name}, which could run "
            "code; refusing to load it (convert a trusted copy to .safetensors)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"checkpoint {self.archive.path}: unsupported persistent id in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"checkpoint {self.archive.path}: storage {key!r} has no valid storage type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"checkpoint {self.archive.path}: malformed storage record {key!r}")
        if key not in self.storages:
            nbytes = numel * _itemsize(storage_type.dtype)
            raw = self.archive.storage_bytes(key, nbytes)
            self.storages[key] = _Storage(key, raw, storage_type.dtype, self.archive.big_endian)
        return self.storages[key]


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype) -> torch.Tensor:
    """A strided view into `storage`, after checking it stays inside the storage."""
    if not isinstance(storage, _Storage):
        raise _Malformed("tensor record does not point at a storage")
    size, stride = tuple(size), tuple(stride)
    ints = (offset, *size, *stride)
    if len(size) != len(stride) or not all(type(v) is int and v >= 0 for v in ints):
        raise _Malformed(f"storage data/{storage.key}: malformed tensor size/stride/offset")
    flat = storage.typed(dtype)
    if math.prod(size) == 0:
        return torch.empty(size, dtype=dtype)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > flat.numel():
        raise _Malformed(
            f"storage data/{storage.key} holds {flat.numel()} elements but a tensor of size {list(size)} "
            f"needs {extent}; truncated or corrupt file"
        )
    return torch.as_strided(flat, size, stride, offset)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise _Malformed("tensor record does not point at a storage")
    return _rebuild(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise _Malformed("tensor record has no valid dtype")
    return _rebuild(storage, offset, size, stride, dtype)


def _rebuild_tensor_v1(storage, offset, size, stride):
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    """A saved `nn.Parameter` comes back as its plain tensor (also for `_rebuild_parameter_with_state`)."""
    if not isinstance(data, torch.Tensor):
        raise _Malformed("parameter record does not hold a tensor")
    return data


class _TensorClassMarker:
    """Stands for `torch.Tensor` / `torch.nn.Parameter` inside `_rebuild_from_type_v2`; not callable."""

    def __init__(self, name: str):
        self.name = name


def _rebuild_from_type_v2(func, new_type, args, state):
    # Written for tensors carrying Python attributes; we rebuild the plain tensor and drop the attributes.
    if func not in _TENSOR_REBUILDERS or not isinstance(new_type, _TensorClassMarker):
        raise _Malformed("tensor record with an unsupported rebuild function or tensor class")
    return func(*args)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    """Protocol-2 pickles store `bytes` as `_codecs.encode(str, "latin1")`; only text codecs allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise _Malformed("pickle asks for an unsupported codec")
    return text.encode(encoding, "strict")


def _torch_size(items=()):
    return tuple(int(v) for v in items)


def _torch_device(spec, index=None):
    """Devices are only labels here; everything is loaded to the CPU."""
    if not isinstance(spec, (str, int)):
        raise _Malformed("pickle holds a malformed torch.device")
    return str(spec) if index is None else f"{spec}:{index}"


class _NumpyDtype:
    """Result of a pickled `numpy.dtype(...)`; BUILD may only set its byte order."""

    def __init__(self, spec, align=False, copy=True):
        if not isinstance(spec, str) or len(spec) > 8:
            raise _Malformed("pickle holds a malformed numpy dtype")
        dtype = np.dtype(spec)
        if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
            raise _Malformed(f"pickle holds an unsupported numpy dtype {spec!r}")
        self.dtype = dtype

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">") and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _Malformed("pickle holds a malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype.dtype)[0].copy()


class _NumpyArray:
    """Result of a pickled small `numpy.ndarray`; BUILD fills `.value` from the raw bytes."""

    def __init__(self):
        self.value: np.ndarray | None = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Malformed("pickle holds a malformed numpy array")
        shape, dtype, fortran, raw = state[-4:]
        if (
            not isinstance(dtype, _NumpyDtype)
            or not isinstance(raw, bytes)
            or not all(type(n) is int and n >= 0 for n in shape)
            or len(raw) != math.prod(shape) * dtype.dtype.itemsize
        ):
            raise _Malformed("pickle holds a malformed numpy array")
        flat = np.frombuffer(raw, dtype=dtype.dtype)
        self.value = flat.reshape(tuple(shape), order="F" if fortran else "C").copy()


_NDARRAY = object()  # stands for the `numpy.ndarray` class; only `_numpy_reconstruct` accepts it


def _numpy_reconstruct(subtype, shape=(0,), dtype=b"b"):
    if subtype is not _NDARRAY:
        raise _Malformed("pickle reconstructs an unsupported numpy array type")
    return _NumpyArray()


# -- PyTorch Lightning objects: inert placeholders ----------------------------------------------------


class _InertObject:
    """Stand-in for a PyTorch Lightning object (e.g. ModelCheckpoint): construction only stores data."""

    _origin = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_kwargs"] = kwargs
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<inert {self._origin}>"


_INERT_CLASSES: dict[tuple[str, str], type] = {}
_LIGHTNING_ROOTS = ("pytorch_lightning", "lightning", "lightning_fabric")


def _is_lightning(module: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in _LIGHTNING_ROOTS)


def _inert_class(module: str, name: str) -> type:
    """One hashable placeholder class per Lightning global (callbacks dicts use classes as keys)."""
    key = (module, name)
    if key not in _INERT_CLASSES:
        label = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "Anonymous"
        _INERT_CLASSES[key] = type(
            f"Inert_{label}", (_InertObject,), {"_origin": f"{module}.{name}", "__module__": __name__}
        )
    return _INERT_CLASSES[key]


# -- the allowlist -----------------------------------------------------------------------------------


def _storage_types() -> dict[tuple[str, str], _StorageType]:
    names = {
        "FloatStorage": torch.float32,
        "DoubleStorage": torch.float64,
        "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16,
        "LongStorage": torch.int64,
        "IntStorage": torch.int32,
        "ShortStorage": torch.int16,
        "CharStorage": torch.int8,
        "ByteStorage": torch.uint8,
        "BoolStorage": torch.bool,
        "ComplexFloatStorage": torch.complex64,
        "ComplexDoubleStorage": torch.complex128,
    }
    table = {("torch", n): _StorageType(f"torch.{n}", d) for n, d in names.items()}
    untyped = _StorageType("torch.UntypedStorage", torch.uint8)
    table[("torch.storage", "UntypedStorage")] = untyped
    table[("torch", "UntypedStorage")] = untyped
    return table


def _torch_dtypes() -> dict[tuple[str, str], torch.dtype]:
    names = (
        "float32 float64 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex64 complex128 "
        "uint16 uint32 uint64 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz"
    ).split()
    found = {name: getattr(torch, name, None) for name in names}  # newer dtypes may be absent in torch 2.1
    return {("torch", n): d for n, d in found.items() if isinstance(d, torch.dtype)}


_TENSOR_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter, _rebuild_tensor_v1)

_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v1,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorClassMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorClassMarker("torch.nn.parameter.Parameter"),
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    **_storage_types(),
    **_torch_dtypes(),
}


def allowed_globals() -> list[str]:
    """The `module.name` globals a checkpoint pickle may use (plus the Lightning namespaces, inert)."""
    return sorted(f"{m}.{n}" for m, n in _SAFE_GLOBALS) + [f"{root}.* (inert)" for root in _LIGHTNING_ROOTS]


# --------------------------------------------------------------------------------------------------
# Unpacking the loaded object
# --------------------------------------------------------------------------------------------------


def _unpack_state_dict(top: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(top, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(top).__name__}, not a state dict")
    # dict.get / dict.items, not the methods: a pickle can shadow methods on an OrderedDict's __dict__.
    inner = dict.get(top, "state_dict")
    source = inner if isinstance(inner, dict) else top
    tensors: dict[str, torch.Tensor] = {}
    ema = 0
    for key, value in dict.items(source):
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        if key.startswith(_EMA_PREFIX):
            ema += 1
            continue
        tensors[key] = value
    if ema:
        logger.debug("%s: dropped %d model_ema.* tensors", path, ema)
    if not tensors:
        raise CheckpointError(f"checkpoint {path} contains no model weights (no tensors in its state dict)")
    return tensors


# --------------------------------------------------------------------------------------------------
# Hash cache
# --------------------------------------------------------------------------------------------------


def _hash_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sd_cli" / "hashes.json"


def _load_hash_cache(cache_file: Path) -> dict[str, Any]:
    try:
        with open(cache_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_hash_cache(cache_file: Path, cache: dict[str, Any]) -> None:
    """Write atomically (temp file + rename); a cache we cannot write is silently skipped."""
    tmp = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", suffix=".tmp", dir=cache_file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, cache_file)
        tmp = None
    except OSError as err:
        logger.debug("hash cache %s not written: %s", cache_file, err)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
