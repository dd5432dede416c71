"""sd_cli.checkpoint: safe reading of untrusted .ckpt / .safetensors files, and file hashes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd_cli.weights.checkpoint import allowed_globals, file_hash, read_state_dict, short_hash
from sd_cli.errors import CheckpointError, UnsafeCheckpointError

REPO = Path(__file__).resolve().parent.parent
KEYS_CANDIDATES = (REPO / "shared" / "sd1_keys.json", REPO.parent / "shared" / "sd1_keys.json")
PL_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


# --------------------------------------------------------------------------------------------------
# Helpers: state dicts and hand-made checkpoint files
# --------------------------------------------------------------------------------------------------


def sd1_subset(n: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """Small random tensors for a subset of the real SD v1 keys, in fp32 / fp16 / bf16 (+ int64 ids)."""
    path = next((p for p in KEYS_CANDIDATES if p.exists()), None)
    if path is None:
        pytest.skip("shared/sd1_keys.json not found")
    entries = json.loads(path.read_text())
    small = [(name, shape) for name, shape, _ in entries if np.prod(shape) <= 50_000]
    gen = torch.Generator().manual_seed(seed)
    picked = small[:: max(1, len(small) // n)][:n]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    sd = {name: torch.randn(shape, generator=gen).to(dtypes[i % 3]) for i, (name, shape) in enumerate(picked)}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype, key
        assert g.shape == w.shape, key
        assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), key


@contextlib.contextmanager
def fake_lightning():
    """A `ModelCheckpoint` class living in `pytorch_lightning.callbacks.model_checkpoint` while saving;
    the fake modules are gone afterwards, so loading cannot import them."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", PL_MODULE)
    assert not any(n in sys.modules for n in names)
    for name in names:
        sys.modules[name] = types.ModuleType(name)

    class ModelCheckpoint:
        def __init__(self, dirpath):
            self.dirpath = dirpath
            self.best_model_score = np.float64(0.25)
            self.save_top_k = np.int64(1)

    ModelCheckpoint.__module__ = PL_MODULE
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules[PL_MODULE].ModelCheckpoint = ModelCheckpoint
    try:
        yield ModelCheckpoint
    finally:
        for name in names:
            del sys.modules[name]


def lightning_checkpoint(sd: dict[str, torch.Tensor], model_checkpoint: type, extra_callback=None) -> dict:
    """The dict a PyTorch Lightning 1.x run (sd-v1-4.ckpt) saves, with EMA copies in its state_dict."""
    state = dict(sd)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.ones(3, 2, dtype=torch.float16)
    callback_state = {"best_model_score": np.float64(0.5), "monitor": None, "step": np.int64(470000)}
    if extra_callback is not None:
        callback_state["extra"] = extra_callback
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {model_checkpoint: callback_state, "instance": model_checkpoint("/logs/checkpoints")},
        "lr": np.float64(1e-4),
        "step": np.int64(470000),
        "state_dict": state,
    }


class Reduce:
    """Pickles as `func(*args)`: the shape of every code-execution payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class StorageRef:
    """Pickled as a torch persistent id: ('storage', <storage type>, key, 'cpu', numel)."""

    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def tensor_record(storage: StorageRef, size, stride, offset=0) -> Reduce:
    from collections import OrderedDict

    return Reduce(torch._utils._rebuild_tensor_v2, storage, offset, tuple(size), tuple(stride), False, OrderedDict())


def write_torch_zip(path: Path, obj, storages: dict[str, bytes] | None = None, *, byteorder: str | None = "little",
                    compression=zipfile.ZIP_STORED, pickle_bytes: bytes | None = None) -> Path:
    """A torch-style zip (`archive/data.pkl`, `archive/data/<key>`) around any pickled object."""
    if pickle_bytes is None:
        buf = io.BytesIO()
        _TorchPickler(buf, protocol=2).dump(obj)
        pickle_bytes = buf.getvalue()
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


def test_lightning_ckpt_and_safetensors_load_identically(tmp_path, caplog):
    sd = sd1_subset()
    assert {t.dtype for t in sd.values()} >= {torch.float32, torch.float16, torch.bfloat16, torch.int64}
    with fake_lightning() as model_checkpoint:
        torch.save(lightning_checkpoint(sd, model_checkpoint), tmp_path / "model.ckpt")
    assert "pytorch_lightning" not in sys.modules  # loading must not need it
    save_file(sd, str(tmp_path / "model.safetensors"))

    with caplog.at_level(logging.DEBUG, logger="sd_cli.weights.checkpoint"):
        from_ckpt = read_state_dict(tmp_path / "model.ckpt")
    from_st = read_state_dict(str(tmp_path / "model.safetensors"))

    assert_same_tensors(from_ckpt, sd)  # model_ema.* dropped, non-tensors dropped, dtypes kept
    assert_same_tensors(from_st, sd)
    assert "dropped 3 model_ema.* tensors" in caplog.text


def test_ckpt_tensors_are_private_copies_of_the_file(tmp_path):
    """Storages are mapped copy-on-write: writing to a loaded tensor never changes the file."""
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    w = read_state_dict(path)["w"]
    w.add_(1)
    assert w[0, 0].item() == 1.0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert read_state_dict(path)["w"][0, 0].item() == 0.0


def test_plain_state_dict_views_parameters_and_newer_dtypes(tmp_path):
    base = torch.randn(6, 5)
    param = torch.nn.Parameter(torch.randn(3))
    param.extra_attribute = "kept out"  # pickled via _rebuild_parameter_with_state
    tagged = torch.randn(2)
    tagged.note = 1  # pickled via torch._tensor._rebuild_from_type_v2
    sd = {
        "view": base[1:, ::2],  # offset + strides into a shared storage
        "same_storage": base,
        "param": param,
        "tagged": tagged,
        "uint16": torch.tensor([1, 2, 65535], dtype=torch.int32).to(torch.uint16),  # _rebuild_tensor_v3
        "f8": torch.tensor([0.5, 2.0]).to(torch.float8_e4m3fn),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 7),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    torch.save({**sd, "note": "not a tensor", "n": np.float32(1.0), "arr": np.arange(4)}, tmp_path / "m.pth")
    got = read_state_dict(tmp_path / "m.pth")
    assert_same_tensors(got, {k: v.detach() for k, v in sd.items()})
    assert type(got["param"]) is torch.Tensor and not got["param"].requires_grad


def test_compressed_entries_are_read(tmp_path):
    values = torch.arange(6, dtype=torch.float32)
    obj = {"state_dict": {"w": tensor_record(StorageRef("0", 6), (2, 3), (3, 1))}}
    path = write_torch_zip(tmp_path / "deflated.ckpt", obj, {"0": values.numpy().tobytes()},
                           compression=zipfile.ZIP_DEFLATED)
    assert torch.equal(read_state_dict(path)["w"], values.reshape(2, 3))


def test_big_endian_storages_are_converted(tmp_path):
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    obj = {"w": tensor_record(StorageRef("0", 3), (3,), (1,)),
           "h": tensor_record(StorageRef("1", 2, torch.HalfStorage), (2,), (1,))}
    storages = {"0": values.astype(">f4").tobytes(), "1": np.array([0.5, 8.0], dtype=">f2").tobytes()}
    got = read_state_dict(write_torch_zip(tmp_path / "be.ckpt", obj, storages, byteorder="big"))
    assert got["w"].tolist() == [1.5, -2.0, 3.25]
    assert got["h"].dtype == torch.float16 and got["h"].tolist() == [0.5, 8.0]


def test_safetensors_content_is_sniffed_whatever_the_suffix(tmp_path):
    sd = {"a": torch.randn(3, dtype=torch.float16)}
    save_file(sd, str(tmp_path / "really_safetensors.ckpt"))
    assert_same_tensors(read_state_dict(tmp_path / "really_safetensors.ckpt"), sd)


def test_allowlist_is_small_and_explicit():
    names = allowed_globals()
    assert "torch._utils._rebuild_tensor_v2" in names and "collections.OrderedDict" in names
    assert not any(n.startswith(("builtins.eval", "builtins.exec", "builtins.getattr", "os.", "posix.")) for n in names)


# --------------------------------------------------------------------------------------------------
# Malicious pickles: refused before anything runs
# --------------------------------------------------------------------------------------------------


def _marker_payloads(marker: Path):
    """(name, object to pickle, module.attr the refusal must name): each would create `marker` if unpickled."""
    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    return [
        ("os.system", Reduce(os.system, touch), f"{os.system.__module__}.system"),
        ("exec", Reduce(exec, code), "builtins.exec"),
        ("eval", Reduce(eval, code), "builtins.eval"),
        ("popen", Reduce(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        ("partial", Reduce(__import__("functools").partial(os.system, touch)), "functools.partial"),
        ("torch-fn", Reduce(torch.load, str(marker)), "torch.serialization.load"),
    ]


@pytest.mark.parametrize("where", ["top", "state_dict"])
@pytest.mark.parametrize("index", range(6))
def test_code_execution_payloads_are_refused(tmp_path, where, index):
    marker = tmp_path / "pwned"
    name, payload, needle = _marker_payloads(marker)[index]
    weights = {"w": tensor_record(StorageRef("0", 2), (2,), (1,))}
    obj = payload if where == "top" else {"epoch": 1, "state_dict": {**weights, "evil": payload}}
    path = write_torch_zip(tmp_path / f"{name}.ckpt", obj, {"0": bytes(8)})
    with pytest.raises(UnsafeCheckpointError, match=needle.replace(".", r"\.")) as info:
        read_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_payload_really_would_run_without_the_allowlist(tmp_path):
    """Positive control: the exec payload's bytes do create the file under plain pickle."""
    marker = tmp_path / "control"
    data = pickle.dumps(Reduce(exec, f"open({str(marker)!r}, 'w').close()"), protocol=2)
    pickle.loads(data)
    assert marker.exists()


def test_getattr_chain_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    # getattr(__import__("os"), "system")("touch <marker>") in raw protocol-2 opcodes.
    raw = (
        b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\n__import__\n(X\x02\x00\x00\x00ostRX\x06\x00\x00\x00systemtR("
        + b"X" + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode() + b"tR."
    )
    path = write_torch_zip(tmp_path / "chain.ckpt", None, pickle_bytes=raw)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.getattr"):
        read_state_dict(path)
    assert not marker.exists()


def test_dotted_global_names_are_not_followed(tmp_path):
    # Protocol 4 STACK_GLOBAL may carry "a.b" names that plain pickle resolves attribute by attribute.
    def short_unicode(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    raw = b"\x80\x04" + short_unicode("collections") + short_unicode("OrderedDict.fromkeys") + b"\x93."
    with pytest.raises(UnsafeCheckpointError, match=r"collections\.OrderedDict\.fromkeys"):
        read_state_dict(write_torch_zip(tmp_path / "dotted.ckpt", None, pickle_bytes=raw))


def test_payload_inside_lightning_callbacks_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = {"w": torch.ones(2)}
    with fake_lightning() as model_checkpoint:
        obj = lightning_checkpoint(sd, model_checkpoint, extra_callback=Reduce(os.system, f"touch {marker}"))
        torch.save(obj, tmp_path / "cb.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"\.system"):
        read_state_dict(tmp_path / "cb.ckpt")
    assert not marker.exists()


def test_lightning_names_are_inert_even_when_called_with_a_payload(tmp_path):
    """A Lightning class 'called' with a command only stores its arguments; a look-alike namespace is refused."""
    marker = tmp_path / "pwned"
    weights = {"w": tensor_record(StorageRef("0", 1), (1,), (1,))}
    with fake_lightning() as model_checkpoint:
        obj = {"state_dict": weights, "cb": Reduce(model_checkpoint, f"touch {marker}")}
        buf = io.BytesIO()
        _TorchPickler(buf, protocol=2).dump(obj)
    path = write_torch_zip(tmp_path / "inert.ckpt", None, {"0": bytes(4)}, pickle_bytes=buf.getvalue())
    assert list(read_state_dict(path)) == ["w"]
    assert not marker.exists()

    evil = buf.getvalue().replace(b"pytorch_lightning.callbacks", b"pytorch_lightninX.callbacks")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_lightninX\.callbacks\.model_checkpoint"):
        read_state_dict(write_torch_zip(tmp_path / "lookalike.ckpt", None, {"0": bytes(4)}, pickle_bytes=evil))


# --------------------------------------------------------------------------------------------------
# Corrupt, truncated and wrong inputs: one clear CheckpointError naming the file
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("valid")
    sd = {"a": torch.randn(64, 8), "b": torch.randn(16).half()}
    torch.save({"state_dict": sd, "epoch": 1}, d / "m.ckpt")
    save_file(sd, str(d / "m.safetensors"))
    return {"ckpt": (d / "m.ckpt").read_bytes(), "safetensors": (d / "m.safetensors").read_bytes()}


def _safetensors_with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _corrupt_cases(valid: dict[str, bytes]) -> dict[str, tuple[str, bytes, str]]:
    ckpt, st = valid["ckpt"], valid["safetensors"]
    lying = _safetensors_with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}, bytes(16))
    return {  # name: (file name, content, expected words)
        "empty-ckpt": ("m.ckpt", b"", "0 bytes"),
        "empty-safetensors": ("m.safetensors", b"", "0 bytes"),
        "truncated-zip": ("m.ckpt", ckpt[: len(ckpt) // 2], "truncated"),
        "truncated-safetensors": ("m.safetensors", st[:-10], "not a valid safetensors"),
        "offsets-past-end": ("m.safetensors", lying, "not a valid safetensors"),
        "huge-header-length": ("m.safetensors", (10**12).to_bytes(8, "little") + st[8:], "not a valid safetensors"),
        "random-ckpt": ("m.ckpt", random.Random(0).randbytes(4096), "unrecognised content"),
        "random-safetensors": ("m.safetensors", random.Random(1).randbytes(4096), "not a valid safetensors"),
        "text": ("m.ckpt", b"<html>404 Not Found</html>", "unrecognised content"),
        "zip-without-pickle": ("m.ckpt", _zip_bytes({"readme.txt": b"hi"}), "not a PyTorch checkpoint"),
    }


def _zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    "case",
    ["empty-ckpt", "empty-safetensors", "truncated-zip", "truncated-safetensors", "offsets-past-end",
     "huge-header-length", "random-ckpt", "random-safetensors", "text", "zip-without-pickle"],
)
def test_corrupt_files_give_one_clear_line(tmp_path, valid_files, case):
    name, content, words = _corrupt_cases(valid_files)[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and words in message and "\n" not in message
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_missing_file_directory_and_legacy_format(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as info:
        read_state_dict(tmp_path / "nope.ckpt")
    assert str(tmp_path / "nope.ckpt") in str(info.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)
    legacy = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy PyTorch format .* not supported; convert to \.safetensors"):
        read_state_dict(legacy)


def test_storage_entry_shorter_than_declared(tmp_path):
    obj = {"w": tensor_record(StorageRef("0", 4), (4,), (1,))}
    path = write_torch_zip(tmp_path / "short.ckpt", obj, {"0": bytes(8)})  # 2 floats where 4 are declared
    with pytest.raises(CheckpointError, match=r"data/0 holds 8 bytes but its tensor needs 16") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "size,stride,offset",
    [((10,), (1,), 0), ((2, 2), (1, 4), 0), ((4,), (1,), 1), ((2,), (-1,), 0), ((2,), (1, 1), 0)],
)
def test_tensor_extent_outside_storage(tmp_path, size, stride, offset):
    obj = {"w": tensor_record(StorageRef("0", 4), size, stride, offset)}
    path = write_torch_zip(tmp_path / "oob.ckpt", obj, {"0": bytes(16)})
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value) and "data/0" in str(info.value)


def test_missing_storage_and_bad_records(tmp_path):
    obj = {"w": tensor_record(StorageRef("7", 1), (1,), (1,))}
    with pytest.raises(CheckpointError, match="missing tensor storage data/7"):
        read_state_dict(write_torch_zip(tmp_path / "nostorage.ckpt", obj, {}))
    with pytest.raises(CheckpointError, match="unknown byte order"):
        read_state_dict(write_torch_zip(tmp_path / "bo.ckpt", {"w": 1}, byteorder="middle"))
    with pytest.raises(CheckpointError, match="no model weights"):
        read_state_dict(write_torch_zip(tmp_path / "notensors.ckpt", {"epoch": 3, "state_dict": {}}))
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_state_dict(write_torch_zip(tmp_path / "list.ckpt", [1, 2]))
    bad_type = {"w": tensor_record(StorageRef("0", 1, storage_type=__import__("collections").OrderedDict), (1,), (1,))}
    with pytest.raises(CheckpointError, match="no valid storage type"):
        read_state_dict(write_torch_zip(tmp_path / "type.ckpt", bad_type, {"0": bytes(4)}))


def test_mutated_pickles_never_escape_as_other_exceptions(tmp_path, valid_files):
    """Fuzz: random byte edits and truncations of data.pkl give a dict or a CheckpointError, nothing else."""
    with zipfile.ZipFile(io.BytesIO(valid_files["ckpt"])) as z:
        names = z.namelist()
        entries = {n: z.read(n) for n in names}
    pkl_name = next(n for n in names if n.endswith("data.pkl"))
    original = entries[pkl_name]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for i in range(250):
        data = bytearray(original)
        if i % 5 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"fuzz{i}.ckpt"
        path.write_bytes(_zip_bytes({**entries, pkl_name: bytes(data)}))
        try:
            read_state_dict(path)
            outcomes["ok"] += 1
        except CheckpointError as err:
            assert "\n" not in str(err)
            outcomes["error"] += 1
        path.unlink()
    assert outcomes["error"] > 50


# --------------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------------


def test_file_hash_streams_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # more than one 1 MiB chunk
    want = hashlib.sha256(model.read_bytes()).hexdigest()

    assert file_hash(model) == want
    assert short_hash(model) == want[:10]
    cache_file = tmp_path / "cache" / "sd_cli" / "hashes.json"
    cache = json.loads(cache_file.read_text())
    entry = cache[os.path.abspath(model)]
    assert entry["sha256"] == want and entry["size"] == model.stat().st_size

    # A matching (path, size, mtime_ns) entry is trusted: prove the cache is read.
    entry["sha256"] = "f" * 64
    cache_file.write_text(json.dumps(cache))
    assert file_hash(model) == "f" * 64

    # Any change to the file invalidates it.
    with open(model, "ab") as f:
        f.write(b"x")
    assert file_hash(model) == hashlib.sha256(model.read_bytes()).hexdigest()


def test_file_hash_survives_an_unusable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    model = tmp_path / "m.ckpt"
    model.write_bytes(b"weights")
    assert file_hash(model) == hashlib.sha256(b"weights").hexdigest()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "sd_cli").mkdir(parents=True)
    (tmp_path / "cache" / "sd_cli" / "hashes.json").write_text("{not json")
    assert short_hash(model) == hashlib.sha256(b"weights").hexdigest()[:10]


def test_file_hash_of_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.ckpt"):
        file_hash(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 1, 63, 64, 1000, 4095])
def test_all_finite_finds_every_bad_value(dtype, bad, where):
    """The load-time check (one min/max pass) sees a NaN/inf wherever it sits, in every dtype."""
    from sd_cli.weights.loading import all_finite

    t = torch.randn(4096).to(dtype)
    assert all_finite(t) and all_finite(torch.empty(0, dtype=dtype))
    t[where] = bad
    assert not all_finite(t)
    assert not all_finite(torch.tensor([70000.0]), torch.float16)  # past fp16's range
    assert all_finite(torch.tensor([60000.0]), torch.float16)
