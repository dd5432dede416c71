"""Tests for sd_cli.images: pixels, grid, watermark, A1111 text, safe PNG saving."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_cli.output import png as images
from sd_cli.errors import OutputError
from sd_cli.output.a1111 import a1111_parameters, parse_a1111_parameters
from sd_cli.output.pixels import make_grid, to_uint8
from sd_cli.output.png import ensure_writable_dir, next_free_index, read_png_metadata, save_png
from sd_cli.output.watermark import WatermarkSkipped, apply_watermark, read_watermark

# ---------------------------------------------------------------------------------- to_uint8


def _px(values, dtype=torch.float32):
    """A (1, 3, 1, N) tensor holding `values` in every channel."""
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    return t.view(1, 1, 1, -1).expand(1, 3, 1, -1).contiguous()


def _x_for_level(level: float) -> float:
    """The decoder value x for which (x + 1) / 2 * 255 == level."""
    return level / 255.0 * 2.0 - 1.0


def test_to_uint8_exact_values():
    out = to_uint8(_px([-1.0, 0.0, 1.0, -7.0, 3.5, -1.0001, 1.0001]))
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 3)
    # 0.0 -> 127.5 -> 128 (round half to even); CompVis's truncation would give 127.
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 0, 255, 0, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_to_uint8_rounding_boundaries():
    levels = [0.49, 0.51, 1.49, 1.51, 127.49, 127.51, 253.49, 253.51, 254.49, 254.51]
    out = to_uint8(_px([_x_for_level(v) for v in levels]))
    assert out[0, 0, :, 0].tolist() == [0, 1, 1, 2, 127, 128, 253, 254, 254, 255]


def test_to_uint8_half_precision_and_nan():
    # fp16 / bf16 inputs are upcast before scaling: -1, 0, 1 stay exact.
    for dt in (torch.float16, torch.bfloat16):
        assert to_uint8(_px([-1.0, 0.0, 1.0], dt))[0, 0, :, 0].tolist() == [0, 128, 255]
    out = to_uint8(_px([float("nan"), float("inf"), float("-inf")]))
    assert out[0, 0, :, 0].tolist() == [0, 255, 0]


def test_to_uint8_layout_bchw_to_bhwc():
    x = torch.full((2, 3, 4, 5), -1.0)
    x[1, 0, 2, 3] = 1.0  # batch 1, red, row 2, col 3
    x[0, 2, 0, 4] = 0.0  # batch 0, blue, row 0, col 4
    out = to_uint8(x)
    assert out.shape == (2, 4, 5, 3)
    assert out[1, 2, 3].tolist() == [255, 0, 0]
    assert out[0, 0, 4].tolist() == [0, 0, 128]
    assert int(out.sum()) == 255 + 128


def test_to_uint8_rejects_wrong_shape():
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(1, 4, 8, 8))


# --------------------------------------------------------------------------------- make_grid


def _tiles(n, h, w):
    """n distinguishable uint8 images: value = 10*(k+1) + small row/col pattern (never 0)."""
    rows = np.arange(h).reshape(h, 1, 1)
    cols = np.arange(w).reshape(1, w, 1)
    ch = np.arange(3).reshape(1, 1, 3)
    return np.stack([(10 * (k + 1) + rows + 2 * cols + ch).astype(np.uint8) for k in range(n)])


def _torchvision_shape(n, h, w, nrow, padding):
    # torchvision.utils.make_grid: xmaps = min(nrow, n); ymaps = ceil(n / xmaps);
    # grid = (ymaps * (h + padding) + padding, xmaps * (w + padding) + padding)
    xmaps = min(nrow, n)
    ymaps = int(math.ceil(n / xmaps))
    return ymaps * (h + padding) + padding, xmaps * (w + padding) + padding, xmaps, ymaps


@pytest.mark.parametrize(
    "n,nrow,padding",
    [(5, 2, 2), (4, 2, 2), (3, 8, 2), (6, 3, 0), (7, 3, 5), (2, 1, 2)],
)
def test_make_grid_matches_torchvision_layout(n, nrow, padding):
    h, w = 4, 6
    imgs = _tiles(n, h, w)
    grid = make_grid(imgs, n_rows=nrow, padding=padding)
    gh, gw, xmaps, ymaps = _torchvision_shape(n, h, w, nrow, padding)
    assert grid.shape == (gh, gw, 3) and grid.dtype == np.uint8
    covered = np.zeros(grid.shape[:2], bool)
    for k in range(n):
        r, c = divmod(k, xmaps)  # filled row by row, nrow images per row
        top, left = r * (h + padding) + padding, c * (w + padding) + padding
        assert np.array_equal(grid[top : top + h, left : left + w], imgs[k])
        covered[top : top + h, left : left + w] = True
    assert (grid[~covered] == 0).all()  # padding and empty cells are black
    assert covered.sum() == n * h * w


def test_make_grid_five_by_two_numbers():
    grid = make_grid(_tiles(5, 4, 6), n_rows=2)
    assert grid.shape == (3 * 6 + 2, 2 * 8 + 2, 3) == (20, 18, 3)
    assert grid[2, 2, 0] == 10 and grid[2, 10, 0] == 20  # first row: images 0, 1
    assert grid[14, 2, 0] == 50  # image 4 alone on the third row
    assert (grid[14:18, 10:16] == 0).all()  # the sixth cell stays black
    assert (grid[0:2] == 0).all() and (grid[:, 0:2] == 0).all()


def test_make_grid_single_image_is_returned_unpadded_like_torchvision():
    img = _tiles(1, 4, 6)
    grid = make_grid(img, n_rows=4)
    assert grid.shape == (4, 6, 3) and np.array_equal(grid, img[0])


def test_make_grid_rejects_bad_args():
    with pytest.raises(ValueError):
        make_grid(_tiles(2, 4, 4), n_rows=0)
    with pytest.raises(ValueError):
        make_grid(np.zeros((0, 4, 4, 3), np.uint8), n_rows=1)
    with pytest.raises(ValueError):
        make_grid(np.zeros((2, 4, 4, 3), np.float32), n_rows=1)


# --------------------------------------------------------------------------------- watermark


def _natural_image(seed=0, size=512):
    """Smooth colour gradients + grey noise + colour noise in 2x2 cells (fixed seed).

    imwatermark's dwtDct embeds in the chroma (U) DWT approximation band and decodes by the
    position of each 4x4 block's largest coefficient, so flat/smooth chroma decodes badly; it
    also swaps the H/V detail bands of U on the way back, so per-pixel chroma noise costs PSNR.
    Colour variation at 2-pixel scale (like real texture) decodes reliably at > 40 dB.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    base = np.stack(
        [128 + 60 * np.sin(3 * xx + 1 + 2 * yy), 128 + 96 * (yy - 0.5), 128 + 60 * np.cos(5 * xx * yy)], -1
    )
    chroma = rng.normal(0, 24, (size // 2, size // 2, 3)).repeat(2, 0).repeat(2, 1)
    grey = rng.normal(0, 6, (size, size, 1))
    return np.clip(np.rint(base + chroma + grey), 0, 255).astype(np.uint8)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse)


def test_watermark_round_trip_and_psnr():
    img = _natural_image()
    before = img.copy()
    marked = apply_watermark(img)
    assert np.array_equal(img, before)  # input untouched
    assert marked.shape == img.shape and marked.dtype == np.uint8
    assert not np.array_equal(marked, img)
    assert read_watermark(marked) == b"StableDiffusionV1"
    assert _psnr(marked, img) > 30.0


def test_watermark_channel_order_matches_compvis():
    # CompVis: encode(cv2.cvtColor(rgb, RGB2BGR), 'dwtDct') then flip back to RGB.
    from imwatermark import WatermarkEncoder

    img = _natural_image(seed=1, size=512)
    enc = WatermarkEncoder()
    enc.set_watermark("bytes", b"StableDiffusionV1")
    expected = enc.encode(np.ascontiguousarray(img[:, :, ::-1]), "dwtDct")[:, :, ::-1]
    assert np.array_equal(apply_watermark(img), expected)


def test_watermark_small_image_is_skipped_and_flagged():
    img = _tiles(1, 255, 256)[0]
    before = img.copy()
    with pytest.raises(WatermarkSkipped) as info:
        apply_watermark(img)
    assert np.array_equal(img, before)
    msg = str(info.value)
    assert "\n" not in msg and "256x255" in msg and "too small" in msg


def test_watermark_threshold_is_a_pixel_count():
    # can_watermark counts pixels in whole 8x8 blocks (>= 512 * 512), so 256x1024 is accepted, 256x512 not.
    out = apply_watermark(_natural_image(seed=2, size=1024)[:256])
    assert out.shape == (256, 1024, 3)
    with pytest.raises(WatermarkSkipped):
        apply_watermark(_natural_image(seed=2, size=512)[:256])


# ---------------------------------------------------------------------------- A1111 text

BASE = {
    "prompt": "a photograph of an astronaut riding a horse",
    "negative_prompt": "blurry, lowres",
    "steps": 50,
    "sampler_label": "PLMS",
    "scale": 7.5,
    "seed": 42,
    "width": 512,
    "height": 512,
    "model_hash": "abcdef1234",
    "model_name": "sd-v1-4",
}


def test_a1111_exact_string():
    p = dict(BASE, eta=0.0, dtype="float16")
    assert a1111_parameters(p) == (
        "a photograph of an astronaut riding a horse\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 42, Size: 512x512, "
        "Model hash: abcdef1234, Model: sd-v1-4, eta: 0.0, dtype: float16"
    )


def test_a1111_omits_empty_negative_and_none_values_and_orders_schedule_type():
    p = dict(BASE, negative_prompt="", model_hash=None, **{"Schedule type": "Karras"})
    p["width"], p["height"] = 768, 512
    assert a1111_parameters(p) == (
        "a photograph of an astronaut riding a horse\n"
        "Steps: 50, Sampler: PLMS, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
        "Size: 768x512, Model: sd-v1-4"
    )


def test_a1111_quotes_awkward_values():
    p = dict(BASE, model_name="my, model: v2", note=' "q" ')
    line = a1111_parameters(p).split("\n")[-1]
    assert 'Model: "my, model: v2"' in line
    assert 'note: " \\"q\\" "' in line
    # A1111's rule: a colon alone is enough to quote; plain values stay bare.
    line = a1111_parameters(dict(BASE, model_name="v1:ema", model_hash="x y")).split("\n")[-1]
    assert line.endswith('Model hash: x y, Model: "v1:ema"')


def test_a1111_missing_key_and_bad_extra_key():
    with pytest.raises(ValueError, match="seed"):
        a1111_parameters({k: v for k, v in BASE.items() if k != "seed"})
    with pytest.raises(ValueError):
        a1111_parameters(dict(BASE, **{"bad,key": 1}))
    with pytest.raises(ValueError):
        a1111_parameters(dict(BASE, Steps=3))


@pytest.mark.parametrize(
    "prompt,negative",
    [
        ("a cat, sitting: on a mat", "dog, (ugly:1.3)"),
        ("line one\nline two, with comma\n  indented line", "neg line 1\nneg line 2"),
        ("东京の夜景, ネオン — café ☕ 🚀", "Ünïcödé, ß"),
        ("  leading and trailing spaces  ", ""),
        ("", "only a negative"),
    ],
)
def test_a1111_round_trip(prompt, negative):
    p = dict(BASE, prompt=prompt, negative_prompt=negative, extra="x, y", **{"Clip skip": "2"})
    assert parse_a1111_parameters(a1111_parameters(p)) == p


def test_parse_a1111_own_style_text():
    text = (
        "girl with a beret, blue eyes\n"
        "Negative prompt: ugly, blurry\n"
        'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, '
        'Model hash: 45dee52b, Lora hashes: "a: 1, b: 2", Version: v1.6.0'
    )
    res = parse_a1111_parameters(text)
    assert res == {
        "prompt": "girl with a beret, blue eyes",
        "negative_prompt": "ugly, blurry",
        "steps": 20,
        "sampler_label": "Euler a",
        "scale": 7.0,
        "seed": 965400086,
        "width": 512,
        "height": 768,
        "model_hash": "45dee52b",
        "Lora hashes": "a: 1, b: 2",
        "Version": "v1.6.0",
    }
    # No settings line (fewer than three fields): all of it is prompt.
    assert parse_a1111_parameters("just a prompt\nSteps: 3") == {
        "prompt": "just a prompt\nSteps: 3",
        "negative_prompt": "",
    }


# ----------------------------------------------------------------------------------- save_png

PARAMS = "a prompt\nSteps: 1, Sampler: PLMS, CFG scale: 7.5, Seed: 1, Size: 8x8"


def _img(value=0, h=8, w=8):
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = value
    img[0, 0] = (value + 1) % 256
    return img


def _save(d, pattern="{:05}.png", value=0, meta=None, **kw):
    return save_png(d, pattern, _img(value), parameters=PARAMS, metadata=meta or {"v": value}, **kw)


def _leftovers(d):
    return sorted(n for n in os.listdir(d) if n.startswith("."))


def test_save_png_sequential_names_and_patterns(tmp_path):
    assert [_save(tmp_path).name for _ in range(3)] == ["00000.png", "00001.png", "00002.png"]
    assert _save(tmp_path, "grid-{:04}.png").name == "grid-0000.png"
    assert _save(tmp_path, "grid-{:04}.png").name == "grid-0001.png"
    assert _save(tmp_path).name == "00003.png"  # grids don't count for samples
    assert _leftovers(tmp_path) == []


def test_save_png_ignores_unrelated_files(tmp_path):
    for name in ["notes.txt", "foo-00099.png", "7.png", "000010.png.bak", "grid-0042.png"]:
        (tmp_path / name).write_text("x")
    assert next_free_index(tmp_path, "{:05}.png") == 0
    assert _save(tmp_path).name == "00000.png"
    assert _save(tmp_path, "grid-{:04}.png").name == "grid-0043.png"


def test_save_png_continues_after_highest_existing(tmp_path):
    (tmp_path / "00007.png").write_bytes(b"keep")
    (tmp_path / "00002.png").write_bytes(b"keep")
    assert _save(tmp_path).name == "00008.png"  # max + 1, never the file count (2), no hole filling
    assert (tmp_path / "00007.png").read_bytes() == b"keep"
    assert _save(tmp_path, start_index=20).name == "00020.png"
    assert _save(tmp_path, start_index=3).name == "00021.png"


def test_save_png_never_overwrites_when_name_taken_after_scan(tmp_path, monkeypatch):
    real = images.next_free_index
    calls = []

    def racing_scan(directory, pattern, start_index=0):
        n = real(directory, pattern, start_index)
        if not calls:  # another writer grabs the name right after our scan
            (Path(directory) / pattern.format(n)).write_bytes(b"other process")
        calls.append(n)
        return n

    monkeypatch.setattr(images, "next_free_index", racing_scan)
    out = _save(tmp_path)
    assert out.name == "00001.png"
    assert (tmp_path / "00000.png").read_bytes() == b"other process"
    assert read_png_metadata(out)[1] == {"v": 0}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("err", [errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP])
def test_save_png_fallback_without_hard_links(tmp_path, monkeypatch, err):
    def no_link(src, dst, **kw):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "00000.png").write_bytes(b"taken")
    a, b = _save(tmp_path, value=1), _save(tmp_path, value=2)
    assert (a.name, b.name) == ("00001.png", "00002.png")
    assert (tmp_path / "00000.png").read_bytes() == b"taken"
    assert read_png_metadata(b)[1] == {"v": 2}
    assert _leftovers(tmp_path) == []


def test_save_png_fallback_race_skips_reserved_name(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "link", lambda s, d, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
    real = images.next_free_index
    first = []

    def racing_scan(directory, pattern, start_index=0):
        n = real(directory, pattern, start_index)
        if not first:
            (Path(directory) / pattern.format(n)).write_bytes(b"other")
            first.append(n)
        return n

    monkeypatch.setattr(images, "next_free_index", racing_scan)
    assert _save(tmp_path).name == "00001.png"
    assert (tmp_path / "00000.png").read_bytes() == b"other"


def test_save_png_metadata_round_trip_unicode(tmp_path):
    p = dict(BASE, prompt="東京の夜景, café ☕\nsecond line", negative_prompt="ß, ugly")
    text = a1111_parameters(p)
    meta = {"prompt": p["prompt"], "seed": 42, "scale": 7.5, "nested": {"b": [1, 2], "a": None}}
    out = save_png(tmp_path, "{:05}.png", _img(3), parameters=text, metadata=meta)
    params, got = read_png_metadata(out)
    assert params == text and got == meta
    assert parse_a1111_parameters(params) == p
    raw = out.read_bytes()
    assert b"iTXt" in raw  # non-latin-1 prompt -> UTF-8 iTXt chunk
    assert json.dumps(meta, sort_keys=True).encode() in raw  # sd_cli JSON is ASCII tEXt
    assert b"tIME" not in raw
    from PIL import Image

    with Image.open(out) as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), _img(3))


def test_save_png_latin1_uses_text_chunk(tmp_path):
    out = save_png(tmp_path, "{:05}.png", _img(), parameters="café\nSteps: 1", metadata={})
    raw = out.read_bytes()
    assert b"tEXtparameters\x00caf\xe9\nSteps: 1" in raw and b"iTXt" not in raw
    assert read_png_metadata(out) == ("café\nSteps: 1", {})


def test_read_png_metadata_missing_chunks(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.fromarray(_img()).save(path)
    assert read_png_metadata(path) == (None, None)


def test_save_png_deterministic_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    meta = {"seed": 1, "prompt": "ü", "z": 1, "a": 2}
    pa = save_png(a, "{:05}.png", img, parameters=PARAMS, metadata=meta)
    pb = save_png(b, "{:05}.png", img, parameters=PARAMS, metadata=dict(reversed(meta.items())))
    assert pa.read_bytes() == pb.read_bytes()


def test_save_png_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = _save(tmp_path)
    finally:
        os.umask(old)
    if os.name == "posix":
        assert out.stat().st_mode & 0o777 == 0o644


def test_save_png_encoding_error_leaves_nothing(tmp_path, monkeypatch):
    def broken(f, img, parameters, metadata):
        f.write(b"\x89PNG partial")
        raise RuntimeError("encoder blew up")

    monkeypatch.setattr(images, "write_png", broken)
    with pytest.raises(RuntimeError, match="blew up"):
        _save(tmp_path)
    assert os.listdir(tmp_path) == []


def test_save_png_ctrl_c_leaves_nothing(tmp_path, monkeypatch):
    _save(tmp_path)

    def interrupted(f, img, parameters, metadata):
        f.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "write_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path)
    assert os.listdir(tmp_path) == ["00000.png"]


def test_save_png_enospc_becomes_output_error(tmp_path, monkeypatch):
    first = _save(tmp_path, value=9)
    good = first.read_bytes()
    real_write = images.write_png

    def disk_full(f, img, parameters, metadata):
        real_write(f, img, parameters, metadata)  # bytes in the buffer...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(images, "write_png", disk_full)
    with pytest.raises(OutputError) as info:
        _save(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg and os.strerror(errno.ENOSPC) in msg
    assert info.value.exit_code == 1
    assert sorted(os.listdir(tmp_path)) == ["00000.png"]
    assert first.read_bytes() == good


def test_save_png_enospc_on_fsync(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left|space"):
        _save(tmp_path)
    assert os.listdir(tmp_path) == []


def test_save_png_link_erofs_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "link", lambda s, d, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(OutputError, match="Read-only file system"):
        _save(tmp_path)
    assert os.listdir(tmp_path) == []


def test_save_png_unwritable_dir(tmp_path):
    with pytest.raises(OutputError) as info:
        _save(Path("/dev/null/x"))
    assert "/dev/null/x" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(OutputError):
        _save(tmp_path / "missing")


def test_save_png_read_only_dir_chmod(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(OutputError, match="Permission denied"):
            _save(ro)
    finally:
        ro.chmod(0o755)


def test_save_png_rejects_bad_patterns_and_images(tmp_path):
    for bad in ["{}{}.png", "no-field.png", "{:x}.png", "sub/{:05}.png", "{:5}.png", "{name}.png"]:
        with pytest.raises(ValueError):
            _save(tmp_path, pattern=bad)
    with pytest.raises(ValueError):
        save_png(tmp_path, "{:05}.png", np.zeros((8, 8, 3), np.float32), parameters="", metadata={})
    assert os.listdir(tmp_path) == []


def _worker(directory, proc, count, barrier):
    barrier.wait()
    for i in range(count):
        img = np.full((8, 8, 3), proc * 16 + i, np.uint8)
        save_png(Path(directory), "{:05}.png", img, parameters=PARAMS, metadata={"proc": proc, "i": i})


def test_save_png_parallel_processes(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), p, 10, barrier)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    names = sorted(os.listdir(tmp_path))
    assert names == [f"{i:05}.png" for i in range(40)]  # 0..39 each exactly once, no temp files
    seen = {tuple(sorted(read_png_metadata(tmp_path / n)[1].items())) for n in names}
    assert seen == {(("i", i), ("proc", p)) for p in range(4) for i in range(10)}  # nothing overwritten


# -------------------------------------------------------------------------- ensure_writable_dir


def test_ensure_writable_dir_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    ensure_writable_dir(target)
    assert target.is_dir() and os.listdir(target) == []
    ensure_writable_dir(target)  # idempotent


def test_ensure_writable_dir_failures(tmp_path):
    with pytest.raises(OutputError) as info:
        ensure_writable_dir(Path("/dev/null/x"))
    assert str(info.value) == "cannot write to output folder /dev/null/x: Not a directory"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        ensure_writable_dir(f)


def test_ensure_writable_dir_read_only(tmp_path, monkeypatch):
    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(images, "_create_temp", erofs)
    with pytest.raises(OutputError) as info:
        ensure_writable_dir(tmp_path)
    assert str(info.value) == f"cannot write to output folder {tmp_path}: {os.strerror(errno.EROFS)}"
