"""Fuzzing (hypothesis, bounded in cases and time): checkpoints of both formats and the command line.

* Checkpoints: small valid `.safetensors` and `.ckpt` files are mutated (bytes flipped, set, inserted,
  deleted, truncated; in the safetensors header and data; in each zip member of a .ckpt and in the raw zip
  bytes; fields of the safetensors JSON header rewritten to lie). `read_state_dict` / `load_model` must
  load or raise `SdCliError`, never another exception, each within a time limit.
* The command line: generated argument lists (valid flags, bad values, junk, unicode) passed to
  `sd_cli.cli.main` return 0, 1 or 2, never raise and never print a traceback.

Examples are derandomized (the same cases on every run, so CI is stable); `FUZZ_SCALE=10 pytest
tests/test_fuzz.py` runs ten times as many.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import time
import zipfile
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sd_cli.weights.checkpoint import read_state_dict
from sd_cli.errors import SdCliError

SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
PER_CASE_SECONDS = 30  # generous: the machine is shared; a real hang takes forever
OUTCOMES: dict[str, Counter] = {}


def fuzz_settings(n: int):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging) if the block runs longer than `seconds` (SIGALRM, main thread)."""

    def expired(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s: a hang?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


pytestmark = pytest.mark.usefixtures("private_hash_cache", "one_torch_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> dict[str, bytes]:
    """Small valid checkpoints: fp32 + fp16 + int64 tensors, a Lightning-like wrapper in the .ckpt."""
    d = tmp_path_factory.mktemp("fuzz_valid")
    gen = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(8, 4, generator=gen), "b": torch.randn(6, generator=gen).half(),
          "ids": torch.arange(5), "v": torch.randn(2, 3, generator=gen).bfloat16()}
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 10}, d / "m.ckpt")
    save_file(sd, str(d / "m.safetensors"))
    return {"ckpt": (d / "m.ckpt").read_bytes(), "safetensors": (d / "m.safetensors").read_bytes()}


# --------------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------------


@st.composite
def byte_edit(draw, data: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    """One random edit of `data` inside [lo, hi): flip a bit, set bytes, insert, delete or truncate."""
    hi = len(data) if hi is None else hi
    if hi <= lo:
        return data
    kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
    pos = draw(st.integers(lo, hi - 1))
    out = bytearray(data)
    if kind == "flip":
        out[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "set":
        chunk = draw(st.binary(min_size=1, max_size=8))
        out[pos : pos + len(chunk)] = chunk[: len(out) - pos]
    elif kind == "insert":
        out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del out[pos : pos + draw(st.integers(1, 16))]
    else:
        del out[pos:]
    return bytes(out)


@st.composite
def mutated_safetensors(draw, data: bytes) -> bytes:
    """Byte edits in the header or the data, or a header field rewritten to lie (sizes, offsets, dtype)."""
    (n,) = struct.unpack("<Q", data[:8])
    where = draw(st.sampled_from(["length", "header", "header", "data", "json"]))
    if where == "length":
        return draw(byte_edit(data, 0, 8))
    if where == "header":
        return draw(byte_edit(data, 8, 8 + n))
    if where == "data":
        return draw(byte_edit(data, 8 + n))
    header = json.loads(data[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "junk"]))
    ints = st.integers(-2, 2**40)
    if field == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3",
                                                      "C64", "X99", ""]))
    elif field == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(-1, 70), max_size=4) | st.lists(ints, max_size=3))
    elif field == "data_offsets":
        header[name]["data_offsets"] = draw(st.lists(ints, min_size=0, max_size=3))
    elif field == "drop":
        del header[name][draw(st.sampled_from(sorted(header[name])))]
    else:
        header[name] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers())))
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _zip_entries(data: bytes) -> dict[str, tuple[bytes, int]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: (z.read(i), i.compress_type) for i in z.infolist()}


def _rezip(entries: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (content, compression) in entries.items():
            z.writestr(name, content, compress_type=compression)
    return buf.getvalue()


@st.composite
def mutated_ckpt(draw, data: bytes, entries: dict[str, tuple[bytes, int]], targets: list[str]) -> bytes:
    """An edit of one zip member (re-zipped, so the archive is valid and the loader sees the bad member),
    or of the raw archive bytes (local headers, central directory, stored data)."""
    if draw(st.integers(0, 3)) == 0:
        return draw(byte_edit(data))
    name = draw(st.sampled_from(targets))
    content, compression = entries[name]
    changed = dict(entries)
    changed[name] = (draw(byte_edit(content)), compression)
    if draw(st.integers(0, 9)) == 0:  # sometimes the member is stored compressed instead
        changed[name] = (changed[name][0], zipfile.ZIP_DEFLATED)
    return _rezip(changed)


def check_outcome(kind: str, fn) -> None:
    """`fn()` either returns or raises SdCliError with a one-line message, within the time limit."""
    started = time.perf_counter()
    outcome = OUTCOMES.setdefault(kind, Counter())
    with time_limit(PER_CASE_SECONDS):
        try:
            fn()
            outcome["loaded"] += 1
        except SdCliError as err:
            assert str(err) and "\n" not in str(err), repr(err)
            outcome[type(err).__name__] += 1
    assert time.perf_counter() - started < PER_CASE_SECONDS


# --------------------------------------------------------------------------------------------------
# read_state_dict on small files
# --------------------------------------------------------------------------------------------------


def test_fuzz_read_safetensors(small_files, tmp_path):
    path = tmp_path / "fuzz.safetensors"

    @fuzz_settings(300)
    @given(st.data())
    def case(data):
        path.write_bytes(data.draw(mutated_safetensors(small_files["safetensors"])))
        check_outcome("read .safetensors", lambda: read_state_dict(path))

    case()
    outcome = OUTCOMES["read .safetensors"]
    assert sum(outcome.values()) >= 300 * SCALE and outcome["CheckpointError"] > 30, outcome


def test_fuzz_read_ckpt(small_files, tmp_path):
    data = small_files["ckpt"]
    entries = _zip_entries(data)
    targets = sorted(entries)
    assert any(t.endswith("data.pkl") for t in targets) and any("/data/" in t for t in targets)
    path = tmp_path / "fuzz.ckpt"

    @fuzz_settings(300)
    @given(st.data())
    def case(draw_data):
        path.write_bytes(draw_data.draw(mutated_ckpt(data, entries, targets)))
        check_outcome("read .ckpt", lambda: read_state_dict(path))

    case()
    outcome = OUTCOMES["read .ckpt"]
    assert sum(outcome.values()) >= 300 * SCALE and outcome["CheckpointError"] > 30, outcome


def test_pickle_memo_bomb_is_refused_before_allocating(tmp_path):
    """Found by the fuzz below: a PUT with a huge memo index made the C unpickler allocate (and zero) an
    array that large: 16+ GB from a few flipped bytes. Now refused from the opcodes, allocating nothing."""
    import tracemalloc

    from sd_cli.errors import CheckpointError

    raw = b"\x80\x02}r" + (10**7).to_bytes(4, "little") + b"."  # EMPTY_DICT, LONG_BINPUT 10**7, STOP
    path = tmp_path / "memo.ckpt"
    path.write_bytes(_rezip({"archive/data.pkl": (raw, zipfile.ZIP_STORED),
                             "archive/byteorder": (b"little", zipfile.ZIP_STORED)}))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"memo index 10000000 at byte 3 is larger than the pickle"):
            read_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # without the check: 160 MB here, 32 GB for index 2**31


# --------------------------------------------------------------------------------------------------
# load_model on the micro SD v1 model (detection, key/shape/dtype matching, NaN/inf check)
# --------------------------------------------------------------------------------------------------


def _load(cfg, path):
    from sd_cli.weights.loading import load_model

    load_model(cfg.model, path)


def test_fuzz_load_model_safetensors(micro, tmp_path):
    from sd_cli.weights.config import load_config

    cfg = load_config(micro["config"])
    data = micro["safetensors"].read_bytes()
    path = tmp_path / "fuzz.safetensors"

    @fuzz_settings(50)
    @given(st.data())
    def case(draw_data):
        path.write_bytes(draw_data.draw(mutated_safetensors(data)))
        check_outcome("load_model .safetensors", lambda: _load(cfg, path))

    case()
    outcome = OUTCOMES["load_model .safetensors"]
    assert sum(outcome.values()) >= 50 * SCALE, outcome


def test_fuzz_load_model_ckpt(micro, tmp_path):
    from sd_cli.weights.config import load_config

    cfg = load_config(micro["config"])
    data = micro["ckpt"].read_bytes()
    entries = _zip_entries(data)
    # data.pkl (names, shapes, dtypes, storage records) and a few storages (the weights themselves).
    storages = sorted((n for n in entries if "/data/" in n), key=lambda n: -len(entries[n][0]))
    targets = [n for n in entries if n.endswith(("data.pkl", "byteorder"))] + storages[:3] + storages[-3:]

    @fuzz_settings(50)
    @given(st.data())
    def case(draw_data):
        path = tmp_path / "fuzz.ckpt"
        path.write_bytes(draw_data.draw(mutated_ckpt(data, entries, targets)))
        check_outcome("load_model .ckpt", lambda: _load(cfg, path))

    case()
    outcome = OUTCOMES["load_model .ckpt"]
    assert sum(outcome.values()) >= 50 * SCALE, outcome


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------

FLAGS = [
    "--prompt", "--negative-prompt", "--from-file", "--laion400m", "--sampler", "--plms", "--dpm_solver",
    "--ddim_steps", "--steps", "--ddim_eta", "--scale", "--seed", "--fixed_code", "--H", "--W", "--C", "--f",
    "--dtype", "--threads", "--vae-tiling",
    "--n_samples", "--n_iter", "--n_rows", "--config", "--ckpt", "--device", "--precision", "--outdir",
    "--skip_grid", "--skip_save", "--no-watermark", "--json", "-q", "--resume", "--replay", "--force",
    "--version", "--help", "--bogus", "-x", "--", "--H=", "--seed=-1", "--scale=nan", "--ddim_eta=inf",
]
VALUES = [
    "0", "1", "2", "-1", "7", "8", "64", "63", "4097", "1e9", "2.5", "nan", "inf", "-inf", "1e400",
    "9223372036854775807", "9223372036854775808", "", " ", "ddim", "plms", "euler_a", "dpmpp_2m", "nope",
    "full", "autocast", "cpu", "cuda", "auto", "fp16", "bf16", "on", "off", "a cat", "ünïcødé 🐱", "\u202e\u200b", "--", "-", "/", ".",
    "/nonexistent/x.ckpt", "prompts.txt", "bad.txt", "img.png", "\udcff\udcfe", "x" * 300,
]
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x1FFFF), max_size=20)
# surrogateescape'd bytes: what Python puts in sys.argv for bytes the terminal's locale cannot decode
_undecodable = st.binary(min_size=1, max_size=6).map(lambda b: b.decode("utf-8", "surrogateescape"))
TOKEN = st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES), _text, _undecodable,
                  st.integers(-10**20, 10**20).map(str), st.floats().map(str))
SWITCHES = ["--laion400m", "--plms", "--dpm_solver", "--fixed_code", "--skip_grid", "--skip_save", "--no-watermark",
            "--json", "-q", "--resume", "--force"]
OPTIONS = [f for f in FLAGS if f.startswith("--") and "=" not in f and f not in SWITCHES
           and f not in ("--version", "--help", "--bogus", "--")]
_VALUE = st.one_of(st.sampled_from(VALUES), _text, _undecodable, st.integers(-10**20, 10**20).map(str),
                   st.floats().map(str))
# Values each option accepts, so that many runs get past the argument checks.
GOOD = {
    "--prompt": ["a cat", "ünïcødé 🐱", "x" * 300, ""], "--negative-prompt": ["blurry", ""],
    "--from-file": ["prompts.txt"], "--sampler": ["ddim", "plms", "euler_a", "dpmpp_2m"],
    "--ddim_steps": ["1", "2"], "--steps": ["2"], "--ddim_eta": ["0", "0.5"], "--scale": ["1", "7.5", "-3"],
    "--seed": ["0", "7", "9223372036854775000"], "--H": ["64"], "--W": ["64"], "--C": ["4"], "--f": ["8"],
    "--n_samples": ["1", "2"], "--n_iter": ["1"], "--n_rows": ["0", "1", "5"], "--config": ["micro.yaml"],
    "--ckpt": ["missing.ckpt"], "--device": ["cpu", "auto"], "--precision": ["full", "autocast"],
    "--outdir": ["out"], "--replay": ["img.png"], "--dtype": ["auto", "fp32"], "--threads": ["1", "2"],
    "--vae-tiling": ["auto", "off", "on"],
}
# Well-formed items (flag + good value, or a switch) plus, in about half of the cases, one bad item
# (a flag with a bad value, or raw junk) somewhere among them.
GOOD_ITEM = st.one_of(
    st.sampled_from(sorted(GOOD)).flatmap(lambda f: st.sampled_from(GOOD[f]).map(lambda v: [f, v])),
    st.sampled_from(SWITCHES).map(lambda f: [f]),
)
BAD_ITEM = st.one_of(st.tuples(st.sampled_from(OPTIONS), _VALUE).map(list), TOKEN.map(lambda t: [t]),
                     st.lists(TOKEN, min_size=2, max_size=4))


@st.composite
def argv_lists(draw) -> list[str]:
    items = draw(st.lists(GOOD_ITEM, max_size=5))
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), draw(BAD_ITEM))
    return [token for item in items for token in item]


ARGV = argv_lists()


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    from sd_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _check_cli_result(argv, rc, out, err) -> None:
    assert rc in (0, 1, 2, 130), (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    lines = err.strip().splitlines()
    if rc in (1, 2) and "-q" in argv:  # quiet: the error is one line (after any warnings)
        assert lines and lines[-1].startswith("sd-txt2img: error:"), (argv, err)
        assert all(line.startswith(("sd-txt2img: error:", "warning: ")) for line in lines), (argv, err)
        assert sum(line.startswith("sd-txt2img: error:") for line in lines) == 1, (argv, err)
    if rc == 2:
        assert "error" in err, (argv, err)
    if out.strip() and "--json" in argv and "--help" not in argv and "--version" not in argv:
        json.loads(out)  # with --json, stdout is exactly one JSON object


@pytest.fixture()
def cli_files(tmp_path, micro):
    (tmp_path / "prompts.txt").write_text("a cat\n# comment\n\na dog\n")
    (tmp_path / "micro.yaml").write_bytes(micro["config"].read_bytes())
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe\n")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    return tmp_path


def test_fuzz_cli_arguments_missing_checkpoint(cli_files, monkeypatch):
    """Fast: the checkpoint does not exist, so every run stops at argument/config/checkpoint checks."""
    monkeypatch.chdir(cli_files)
    seen = Counter()

    @fuzz_settings(200)
    @given(ARGV)
    def case(tokens):
        argv = [*tokens, "--ckpt", str(cli_files / "missing.ckpt"), "--outdir", str(cli_files / "out"), "-q"]
        with time_limit(PER_CASE_SECONDS):
            rc, out, err = _run_main(argv)
        _check_cli_result(argv, rc, out, err)
        seen[rc] += 1

    case()
    OUTCOMES["cli (missing ckpt)"] = seen
    assert seen[2] > 10 and seen[1] > 10, seen


def test_fuzz_cli_arguments_micro_model(cli_files, micro, monkeypatch):
    """Runs that get as far as generating: sizes, steps and counts are pinned small at the end."""
    monkeypatch.chdir(cli_files)
    seen = Counter()
    safe_tail = ["--ckpt", str(micro["safetensors"]), "--config", str(micro["config"]), "--outdir",
                 str(cli_files / "out"), "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_iter", "1",
                 "--n_samples", "1", "--n_rows", "0", "-q", "--C", "4", "--f", "8", "--no-watermark", "--threads", "1",
                 "--steps", "2"]
    dropped = {"--ckpt", "--config", "--outdir", "--replay", "--", "--H=", "--help", "--version"}

    @fuzz_settings(30)
    @given(ARGV.map(lambda argv: [t for t in argv if t not in dropped]))
    def case(tokens):
        argv = [*tokens, *safe_tail]
        with time_limit(PER_CASE_SECONDS * 2):
            rc, out, err = _run_main(argv)
        _check_cli_result(argv, rc, out, err)
        seen[rc] += 1

    case()
    OUTCOMES["cli (micro model)"] = seen
    assert seen[0] >= 5, seen


def test_report_fuzz_counts(capsys):
    """Not a check: prints the outcome counts of the fuzz tests above (visible with -s or -rA)."""
    with capsys.disabled():
        for kind, counts in OUTCOMES.items():
            print(f"\nfuzz {kind}: {sum(counts.values())} cases {dict(counts)}")
