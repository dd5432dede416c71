"""Issue 13 hardening, loading side: decompression bombs in a .ckpt (item 2), the tokenizer on huge
unbroken words (item 8), and the size below which the invisible watermark does not read back (item 11)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import signal
import string
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_cli.errors import CheckpointError
from sd_cli.weights.checkpoint import read_state_dict

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


# --------------------------------------------------------------------------------------------------
# Item 2: compressed zip members are bounded by the storage size the pickle asks for
# --------------------------------------------------------------------------------------------------


class _Storage:
    """Pickled as torch's persistent id ('storage', torch.FloatStorage, key, 'cpu', numel)."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, 0, (numel,), (1,), False, OrderedDict())."""

    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        n = self.storage.numel
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (n,), (1,), False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _pickle_one_tensor(numel: int) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump({"state_dict": {"w": _Tensor(_Storage("0", numel))}})
    return buf.getvalue()


def _write_ckpt(path: Path, numel: int, data_chunks, *, total: int) -> Path:
    """A torch.save-layout zip whose data/0 member is ZIP_DEFLATED, written from `data_chunks` (bytes
    pieces adding up to `total`) without ever holding them all; the pickle asks for `numel` floats."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _pickle_one_tensor(numel))
        z.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size = total
        with z.open(info, "w") as f:
            for chunk in data_chunks:
                f.write(chunk)
        z.writestr("archive/version", "3\n")
    return path


def _zeros(total: int):
    for start in range(0, total, MB):
        yield bytes(min(MB, total - start))


def _lie_about_size(path: Path, name: str, file_size: int, crc: int) -> None:
    """Rewrite the uncompressed size and CRC of member `name` in both its local and central headers."""
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        local = z.getinfo(name).header_offset
    struct.pack_into("<I", blob, local + 14, crc)
    struct.pack_into("<I", blob, local + 22, file_size)
    encoded = name.encode()
    pos = blob.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", blob, pos + 28)[0]
        if blob[pos + 46 : pos + 46 + name_len] == encoded:
            struct.pack_into("<I", blob, pos + 16, crc)
            struct.pack_into("<I", blob, pos + 24, file_size)
            break
        pos = blob.find(b"PK\x01\x02", pos + 4)
    else:
        raise AssertionError(f"{name} not in the central directory")
    path.write_bytes(bytes(blob))


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from sd_cli.errors import CheckpointError
    from sd_cli.weights.checkpoint import read_state_dict
    if len(sys.argv) > 2:  # address-space cap: this many MB above what the process maps after its imports
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
        cap = vm + int(sys.argv[2]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        sd = read_state_dict(sys.argv[1])
        outcome = {"loaded": {k: list(v.shape) for k, v in sd.items()}}
    except CheckpointError as err:
        outcome = {"error": str(err)}
    except BaseException as err:
        outcome = {"other": type(err).__name__ + ": " + str(err)}
    outcome["seconds"] = time.perf_counter() - t0
    outcome["extra_peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(outcome))
    """
)


def _load_in_subprocess(path: Path, *cap_mb: int) -> dict:
    """read_state_dict(path) in a fresh interpreter: its outcome, seconds and peak RSS above the imports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path), *map(str, cap_mb)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


BOMB = 128 * MB  # inflated bytes in each bomb; the old code held it (twice when declared honestly)
SMALL_NUMEL = 1024  # what the bomb's pickle asks for: 4 KB


def test_member_declaring_more_than_its_storage_is_refused_at_once(tmp_path):
    # The member honestly declares 128 MB (inflates to it, CRC right); the pickle asks for 4 KB.
    path = _write_ckpt(tmp_path / "bomb.ckpt", SMALL_NUMEL, _zeros(BOMB), total=BOMB)
    assert path.stat().st_size < 1 * MB
    out = _load_in_subprocess(path)
    assert "error" in out, out
    assert "declares 134217728 bytes" in out["error"] and "asks for 4096" in out["error"], out
    assert "\n" not in out["error"] and str(path) in out["error"]
    print(f"honest bomb: refused in {out['seconds']:.3f} s, extra peak {out['extra_peak_mb']:.1f} MB")
    assert out["seconds"] < 2.0
    assert out["extra_peak_mb"] < 32, out  # the old code inflated it whole and copied it: +256 MB


def test_member_inflating_past_its_declared_size_stops_at_that_size(tmp_path):
    # The headers say 4 KB (with the CRC of 4 KB of zeros), the deflate stream holds 128 MB.
    path = _write_ckpt(tmp_path / "liar.ckpt", SMALL_NUMEL, _zeros(BOMB), total=BOMB)
    _lie_about_size(path, "archive/data/0", SMALL_NUMEL * 4, zlib.crc32(bytes(SMALL_NUMEL * 4)))
    out = _load_in_subprocess(path)
    assert "error" in out, out
    assert "inflates to more than its declared 4096 bytes" in out["error"], out
    print(f"lying bomb: refused in {out['seconds']:.3f} s, extra peak {out['extra_peak_mb']:.1f} MB")
    assert out["seconds"] < 2.0
    assert out["extra_peak_mb"] < 32, out  # the old code inflated all 128 MB before cutting it to 4 KB


def test_out_of_memory_while_inflating_is_one_clear_line(tmp_path):
    # A well-formed deflated storage of 256 MB, loaded with only 96 MB of address space to spare.
    numel = 64 * MB
    path = _write_ckpt(tmp_path / "big.ckpt", numel, _zeros(numel * 4), total=numel * 4)
    out = _load_in_subprocess(path, 96)
    assert "error" in out, out
    message = out["error"]
    assert "not enough memory to inflate storage data/0 (268435456 bytes)" in message, out
    assert "()" not in message and "\n" not in message


def test_impossible_deflate_ratio_is_refused_before_inflating(tmp_path):
    # Headers and pickle agree on 8 MB, but the member has ~20 compressed bytes: deflate cannot do that.
    numel = 2 * MB
    path = _write_ckpt(tmp_path / "ratio.ckpt", numel, _zeros(4096), total=4096)
    _lie_about_size(path, "archive/data/0", numel * 4, 0)
    with pytest.raises(CheckpointError, match="more than deflate can produce"):
        read_state_dict(path)


def test_well_formed_deflated_members_still_load(tmp_path):
    # torch.save's own layout, re-zipped with every member deflated (as `zip -r` would); 3 MB of data
    # needs several 1 MB inflate steps.
    gen = torch.Generator().manual_seed(0)
    sd = {"big": torch.randn(768, 1024, generator=gen), "half": torch.randn(33, 7, generator=gen).half(),
          "bf16": torch.randn(5, generator=gen).bfloat16(), "ids": torch.arange(77), "empty": torch.zeros(0)}
    saved = tmp_path / "saved.ckpt"
    torch.save({"state_dict": sd}, saved)
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with zipfile.ZipFile(deflated) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    got = read_state_dict(deflated)
    assert sorted(got) == sorted(sd)
    for key, want in sd.items():
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    assert got["big"].data_ptr() % 4 == 0


def test_without_mmap_stored_and_deflated_members_are_read_the_same(tmp_path, monkeypatch):
    import sd_cli.weights.checkpoint as checkpoint

    sd = {"a": torch.randn(300, 11), "b": torch.arange(5, dtype=torch.int16)}
    stored = tmp_path / "stored.ckpt"
    torch.save(sd, stored)
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))

    def no_mmap(*args, **kwargs):
        raise OSError("mmap not supported here")

    monkeypatch.setattr(checkpoint.mmap, "mmap", no_mmap)
    for path in (stored, deflated):
        got = read_state_dict(path)
        assert sorted(got) == ["a", "b"] and all(torch.equal(got[k], sd[k]) for k in sd), path


def test_corrupt_deflated_member_gives_one_clear_line(tmp_path):
    payload = np.arange(SMALL_NUMEL, dtype=np.float32).tobytes()
    path = _write_ckpt(tmp_path / "crc.ckpt", SMALL_NUMEL, [payload], total=len(payload))
    _lie_about_size(path, "archive/data/0", len(payload), zlib.crc32(payload) ^ 1)
    with pytest.raises(CheckpointError, match="fails its CRC check") as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)
    short = _write_ckpt(tmp_path / "short.ckpt", SMALL_NUMEL, [payload[:-4]], total=len(payload) - 4)
    _lie_about_size(short, "archive/data/0", len(payload), 0)
    with pytest.raises(CheckpointError, match="inflates to 4092 bytes, not its declared 4096"):
        read_state_dict(short)


def test_stored_member_larger_than_its_storage_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "long.ckpt", "w") as z:
        z.writestr("archive/data.pkl", _pickle_one_tensor(4))
        z.writestr("archive/data/0", bytes(4 * 4 + 4))
    with pytest.raises(CheckpointError, match="declares 20 bytes but its pickle record asks for 16"):
        read_state_dict(tmp_path / "long.ckpt")


def test_other_zip_compression_methods_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bz.ckpt", "w", compression=zipfile.ZIP_BZIP2) as z:
        z.writestr("archive/data.pkl", _pickle_one_tensor(4))
        z.writestr("archive/data/0", bytes(16))
    with pytest.raises(CheckpointError, match="compression method 12; only stored and deflated"):
        read_state_dict(tmp_path / "bz.ckpt")


# --------------------------------------------------------------------------------------------------
# Item 8: tokenizer work is (near) linear in the length of a word
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (so the quadratic code fails, not hangs)."""

    def expire(signum, frame):
        raise TimeoutError(f"not done within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tok():
    from sd_cli.model.tokenizer import CLIPTokenizer

    return CLIPTokenizer()


def _reference_bpe(tok, word: str, end: bool = True) -> list[int]:
    """The textbook BPE loop (OpenAI CLIP's `bpe`): merge the lowest-ranked pair everywhere, repeat."""
    from sd_cli.model.tokenizer import END_OF_WORD

    to_sym = tok._byte_to_symbol
    parts = [to_sym[b] for b in word.encode("utf-8")]
    if end:
        parts[-1] += END_OF_WORD
    while len(parts) > 1:
        pairs = set(zip(parts, parts[1:]))
        best = min(pairs, key=lambda p: tok._ranks.get(p, float("inf")))
        if best not in tok._ranks:
            break
        out, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                out.append(parts[i] + parts[i + 1])
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return [tok.encoder[p] for p in parts]


def _random_word(rng: random.Random, n: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_words_up_to_the_cap_give_the_textbook_ids(tok):
    from sd_cli.model.tokenizer import MAX_WORD_CHARS

    rng = random.Random(13)
    natural = "pneumonoultramicroscopicsilicovolcanoconiosis" * 40
    alphabets = (string.ascii_lowercase, "aeiounrst", "ab", "éàüößçñ", "日本語の文字列", "!?.,;:-_=+*#")
    cases = [natural[:n] for n in (1, 45, 300, MAX_WORD_CHARS)]
    cases += [_random_word(rng, n, alpha) for alpha in alphabets for n in (1, 2, 7, 40, 333)]
    cases += [_random_word(rng, MAX_WORD_CHARS, alpha) for alpha in alphabets]
    for word in cases:
        assert tok.encode(word) == _reference_bpe(tok, word), word[:40]


def test_longer_words_are_split_into_pieces_of_the_cap(tok):
    from sd_cli.model.tokenizer import MAX_WORD_CHARS

    word = _random_word(random.Random(1), 2 * MAX_WORD_CHARS + 5)
    head, middle, tail = word[:MAX_WORD_CHARS], word[MAX_WORD_CHARS : 2 * MAX_WORD_CHARS], word[-5:]
    want = _reference_bpe(tok, head, end=False) + _reference_bpe(tok, middle, end=False) + _reference_bpe(tok, tail)
    assert tok.encode(word) == want
    assert tok.encode(word + " cat") == want + tok.encode("cat")


@pytest.mark.parametrize("kind", ["one random word", "one natural word", "many long words", "many words"])
def test_one_megabyte_line_is_fast(tok, kind):
    rng = random.Random(8)
    size = 1_000_000
    if kind == "one random word":
        line = _random_word(rng, size)
    elif kind == "one natural word":
        line = ("masterpiecebestqualityahighlydetailedoilpaintingofalighthouseonacliffatsunset" * 13_000)[:size]
    elif kind == "many long words":  # 1000 unbroken words of 1000 random letters
        line = " ".join(_random_word(rng, 999) for _ in range(1000))[:size]
    else:  # ordinary prompt words (a vocabulary of 3000 random ones), 1 MB of them
        vocab = [_random_word(rng, rng.randint(2, 12)) for _ in range(3000)]
        line = " ".join(rng.choice(vocab) for _ in range(150_000))[:size]
    tok._reset_cache()
    t0 = time.perf_counter()
    with _deadline(30):  # the quadratic code took minutes to hours here
        ids = tok.encode(line)
        batch = tok([line])
    seconds = time.perf_counter() - t0
    print(f"1 MB line, {kind}: {seconds:.2f} s, {len(ids)} tokens")
    assert batch.n_tokens == [len(ids)] and batch.ids.shape == (1, 77)
    assert seconds < 5.0


# --------------------------------------------------------------------------------------------------
# Item 11: the watermark is only embedded where it reads back
# --------------------------------------------------------------------------------------------------


def _textured(seed: int, h: int, w: int) -> np.ndarray:
    """Smooth colour gradients + colour texture in 2x2 cells + grey noise: the `texture` family of
    bench/watermark_readback.py (tests/test_images.py's natural image, any shape)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy / (h - 1), xx / (w - 1)
    base = np.stack(
        [128 + 60 * np.sin(3 * xx + 1 + 2 * yy), 128 + 96 * (yy - 0.5), 128 + 60 * np.cos(5 * xx * yy)], -1
    )
    chroma = rng.normal(0, 24, ((h + 1) // 2, (w + 1) // 2, 3)).repeat(2, 0).repeat(2, 1)[:h, :w]
    grey = rng.normal(0, 6, (h, w, 1))
    return np.clip(np.rint(base + chroma + grey), 0, 255).astype(np.uint8)


def test_watermark_reads_back_at_the_threshold_and_is_skipped_below():
    from sd_cli.output.watermark import WATERMARK_MIN_PIXELS, WatermarkSkipped, apply_watermark, read_watermark

    side = int(WATERMARK_MIN_PIXELS**0.5)
    assert side * side == WATERMARK_MIN_PIXELS and side % 64 == 0
    seeds = range(12)
    read = [read_watermark(apply_watermark(_textured(seed, side, side))) == b"StableDiffusionV1" for seed in seeds]
    assert sum(read) >= 0.95 * len(read), read  # at 256x256 (the old threshold) this was 0 of 12
    for h, w in ((side - 8, side - 8), (448, 448), (256, 256), (side // 2, side), (side - 8, side + 8)):
        with pytest.raises(WatermarkSkipped, match=f"image {w}x{h} is too small"):
            apply_watermark(_textured(0, h, w))


def test_can_watermark_counts_whole_blocks_in_rows_and_columns():
    from sd_cli.output.watermark import WATERMARK_MIN_PIXELS, apply_watermark, can_watermark

    side = int(WATERMARK_MIN_PIXELS**0.5)
    assert can_watermark(side, side) and can_watermark(side // 2, side * 2) and can_watermark(side * 4, side // 4)
    assert not can_watermark(side - 8, side) and not can_watermark(side - 1, side + 1)  # 504 whole rows only
    assert not can_watermark(1, WATERMARK_MIN_PIXELS) and not can_watermark(WATERMARK_MIN_PIXELS // 7, 7)
    assert apply_watermark(_textured(1, side // 2, side * 2)).shape == (side // 2, side * 2, 3)


def test_force_reproduces_marks_made_below_the_threshold():
    from imwatermark import WatermarkEncoder

    from sd_cli.output.watermark import WatermarkSkipped, apply_watermark, too_small_message

    img = _textured(3, 256, 320)
    enc = WatermarkEncoder()
    enc.set_watermark("bytes", b"StableDiffusionV1")
    old_mark = enc.encode(np.ascontiguousarray(img[:, :, ::-1]), "dwtDct")[:, :, ::-1]  # what 256x256+ used to get
    assert np.array_equal(apply_watermark(img, force=True), old_mark)
    with pytest.raises(WatermarkSkipped) as info:
        apply_watermark(img)
    assert str(info.value) == too_small_message(256, 320) and "320x256" in str(info.value)
    with pytest.raises(WatermarkSkipped):
        apply_watermark(_textured(3, 255, 256), force=True)  # imwatermark's own limit still holds
