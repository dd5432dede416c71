"""Compute dtype: detection of native bf16 (mocked CPU flags), the --dtype/--precision rules, weights stored
in the compute dtype, bf16 vs fp32 images on the tiny model, and the fp32 redo of a non-finite VAE decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_YAML, load_config_from_text
from sd_cli.errors import UsageError
from sd_cli.weights.precision import (
    CpuFeatures,
    choose_dtype,
    cpu_features,
    default_threads,
    requested_mode,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")

# /proc/cpuinfo excerpts: 2 sockets would repeat "physical id"; here one socket, 2 cores x 2 threads.
CPUINFO_AVX512_BF16 = """\
processor\t: 0
model name\t: AMD EPYC 9R14
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni

processor\t: 1
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni

processor\t: 2
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni

processor\t: 3
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
CPUINFO_AMX = CPUINFO_AVX512_BF16.replace("avx512_bf16", "avx512_bf16 amx_bf16 amx_tile amx_int8")
CPUINFO_AVX512_ONLY = CPUINFO_AVX512_BF16.replace(" avx512_bf16", "")
CPUINFO_AVX2 = CPUINFO_AVX512_ONLY.replace(" avx512f avx512bw", "")


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, avx512_bf16, amx",
    [(CPUINFO_AVX512_BF16, True, False), (CPUINFO_AMX, True, True), (CPUINFO_AVX512_ONLY, False, False),
     (CPUINFO_AVX2, False, False)],
    ids=["avx512_bf16", "amx", "avx512-no-bf16", "avx2"],
)
def test_cpuinfo_flags(text, avx512_bf16, amx):
    f = cpu_features(capability={}, cpuinfo=text, probe=False)  # torch's probe says nothing -> cpuinfo
    assert (f.avx512_bf16, f.amx_bf16, f.native_bf16) == (avx512_bf16, amx, avx512_bf16 or amx)
    assert f.source == "/proc/cpuinfo"
    assert f.physical_cores == 2  # 4 logical CPUs, 2 distinct (physical id, core id)


def test_torch_capability_wins_over_cpuinfo():
    caps = {"avx512_bf16": False, "amx_bf16": True, "num_physical_cores": 8}
    f = cpu_features(capability=caps, cpuinfo=CPUINFO_AVX2, probe=False)
    assert f.source == "torch" and f.amx_bf16 and f.native_bf16 and f.physical_cores == 8
    f = cpu_features(capability={"avx512_bf16": False, "amx_bf16": False}, cpuinfo=CPUINFO_AMX, probe=False)
    assert not f.native_bf16 and f.physical_cores == 2  # cores from cpuinfo when torch does not say


def test_nothing_known_means_no_native_bf16():
    f = cpu_features(capability=None, cpuinfo=None, probe=False)
    assert f == CpuFeatures() and not f.native_bf16 and f.source == "unknown"
    assert choose_dtype("auto", CPU, features=f).dtype == torch.float32


def test_this_machine_is_detected_consistently():
    """The live probe agrees with /proc/cpuinfo where both exist (no guessing from a model name)."""
    live = cpu_features()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = cpu_features(capability={}, cpuinfo=text, probe=False)
    assert live.native_bf16 == flags.native_bf16


def test_default_threads_is_physical_cores_within_affinity(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_threads(CpuFeatures(physical_cores=2)) == 2  # SMT siblings are not extra cores
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_threads(CpuFeatures(physical_cores=8)) == 1  # a container pinned to one CPU
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_threads(CpuFeatures(physical_cores=None)) == 3


# --- the rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype_arg, precision_arg, config, mode",
    [
        (None, None, "autocast", "auto"),
        (None, None, "full", "fp32"),
        (None, "full", "autocast", "fp32"),  # CompVis: full = float32
        (None, "autocast", "full", "auto"),  # the flag beats the config
        ("bf16", None, "full", "bf16"),  # --dtype beats the config
        ("fp32", "full", "autocast", "fp32"),
        ("bf16", "autocast", "full", "bf16"),  # autocast = "let the tool choose": refined by --dtype
        ("auto", None, "full", "auto"),
    ],
)
def test_requested_mode(dtype_arg, precision_arg, config, mode):
    assert requested_mode(dtype_arg, precision_arg, config) == mode


@pytest.mark.parametrize("dtype_arg", ["bf16", "fp16", "auto"])
def test_precision_full_conflicts_with_other_dtypes(dtype_arg):
    with pytest.raises(UsageError, match="--precision full"):
        requested_mode(dtype_arg, "full", "autocast")


NATIVE = CpuFeatures(avx512_bf16=True, physical_cores=2, source="test")
AMX = CpuFeatures(amx_bf16=True, physical_cores=2, source="test")
PLAIN = CpuFeatures(physical_cores=2, source="test")


def test_cpu_auto():
    c = choose_dtype("auto", CPU, features=NATIVE)
    assert c.dtype == torch.bfloat16 and "AVX512-BF16" in c.reason
    assert choose_dtype("auto", CPU, features=AMX).reason.endswith("AMX-BF16")
    assert choose_dtype("auto", CPU, features=PLAIN).dtype == torch.float32


def test_cpu_auto_on_intel_without_amx_is_fp32():
    """Intel's AVX512-BF16 without AMX measured slower in bf16 than in fp32 (bench.py --only dtypes: a guided
    512 step 14.2 s vs 11.0 s), AMD's faster; AMX is faster on any vendor."""
    intel = CpuFeatures(avx512_bf16=True, physical_cores=2, source="test", vendor="GenuineIntel")
    c = choose_dtype("auto", CPU, features=intel)
    assert c.dtype == torch.float32 and "no AMX" in c.reason
    amd = CpuFeatures(avx512_bf16=True, physical_cores=2, source="test", vendor="AuthenticAMD")
    assert choose_dtype("auto", CPU, features=amd).dtype == torch.bfloat16
    amx = CpuFeatures(avx512_bf16=True, amx_bf16=True, source="test", vendor="GenuineIntel")
    assert choose_dtype("auto", CPU, features=amx).dtype == torch.bfloat16
    assert choose_dtype("bf16", CPU, features=intel).reason == "requested"  # asked for: given, no warning
    assert intel.native_bf16  # (still native: the row-block attention and the bf16 checks see it)


@pytest.mark.parametrize("capability", [{}, {"avx512_bf16": True, "amx_bf16": False}])
def test_vendor_from_cpuinfo(capability):
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: avx512f avx512_bf16\n\n"
    assert cpu_features(capability=capability, cpuinfo=text, probe=False).vendor == "GenuineIntel"
    assert cpu_features(capability=capability, cpuinfo="flags: avx2\n", probe=False).vendor == ""


def test_cpu_explicit():
    assert choose_dtype("fp32", CPU, features=NATIVE).dtype == torch.float32
    slow = choose_dtype("bf16", CPU, features=PLAIN)
    assert slow.dtype == torch.bfloat16 and "slower" in slow.reason  # allowed, with a word of warning
    with pytest.raises(UsageError, match="fp16"):
        choose_dtype("fp16", CPU, features=NATIVE)  # reference kernels only: refused
    assert choose_dtype("fp16", CPU, features=CpuFeatures(amx_fp16=True)).dtype == torch.float16


def test_cuda_rules_without_a_gpu():
    assert choose_dtype("auto", CUDA, cuda_bf16=True).dtype == torch.bfloat16
    assert choose_dtype("auto", CUDA, cuda_bf16=False).dtype == torch.float16
    assert choose_dtype("fp16", CUDA, cuda_bf16=True).dtype == torch.float16
    with pytest.raises(UsageError, match="bfloat16"):
        choose_dtype("bf16", CUDA, cuda_bf16=False)


# --- models in bf16 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tiny_files):
    from sd_cli.weights.loading import load_model

    cfg = load_config_from_text(TINY_YAML).model
    return {dt: load_model(cfg, tiny_files["safetensors"], "cpu", dt) for dt in (torch.float32, torch.bfloat16)}


def test_weights_are_stored_in_the_compute_dtype(tiny_models):
    model = tiny_models[torch.bfloat16]
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, {k: v for k, v in dtypes.items() if v != torch.bfloat16}
    assert model.alphas_cumprod.dtype == torch.float32  # the schedule stays float32


def test_groupnorm_native_bf16_matches_fp32_reference():
    from sd_cli.model.layers import group_norm

    gn = group_norm(64)
    with torch.no_grad():
        gn.weight.copy_(1 + 0.1 * torch.randn(64))
        gn.bias.copy_(0.1 * torch.randn(64))
    x = 3 + 2 * torch.randn(2, 64, 16, 16)  # an offset mean: naive bf16 statistics would lose digits
    ref = gn(x)
    gn16 = group_norm(64).to(torch.bfloat16)
    gn16.load_state_dict({k: v.to(torch.bfloat16) for k, v in gn.state_dict().items()})
    out = gn16(x.to(torch.bfloat16)).float()
    # bf16 has 8 significant bits: inputs, weights and the output each round by <= 2^-9 relative.
    assert (out - ref).abs().max().item() < 0.05
    assert (out - ref).abs().mean().item() < 0.01


@pytest.mark.parametrize("offset", [0.0, 3.0, 50.0])
def test_groupnorm_channels_last_half_precision(offset, monkeypatch):
    """Channels-last bf16 input: torch's native NHWC kernel is kept while |mean| / std is small (offset 0
    and 3: mean/std up to ~1.5), and a group far off zero (offset 50: mean/std 25, where that kernel's
    E[x^2] - E[x]^2 loses ~0.2) goes through the exact NCHW path; both within bf16 rounding of float64."""
    from sd_cli.model import layers

    gn = layers.group_norm(64).to(torch.bfloat16)
    with torch.no_grad():
        gn.weight.copy_(1 + 0.1 * torch.randn(64))
        gn.bias.copy_(0.1 * torch.randn(64))
    x = (offset + 2 * torch.randn(2, 64, 16, 16)).to(torch.bfloat16)
    ref = torch.nn.functional.group_norm(x.double(), 32, gn.weight.double(), gn.bias.double(), gn.eps)
    calls = []
    real = torch.native_group_norm
    monkeypatch.setattr(torch, "native_group_norm", lambda *a: calls.append(1) or real(*a))
    out = gn(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - ref).abs().max().item() < 0.05
    assert (out.double() - ref).abs().mean().item() < 0.01
    native_kept = offset < 10  # the path taken: native NHWC kernel only when its statistics allow it
    assert calls == [1]
    assert torch.equal(out, real(x.contiguous(memory_format=torch.channels_last), gn.weight, gn.bias, 2, 64, 256, 32, gn.eps)[0]) == native_kept


@pytest.mark.parametrize("offset", [0.0, 3.0, 50.0, 1e4])
def test_groupnorm_channels_last_float32_is_as_precise_as_nchw(offset, monkeypatch):
    """Channels-last float32 input: each group is shifted by a subsample estimate of its mean, then torch's
    native NHWC kernel runs (no layout copies). Its E[x^2] - E[x]^2 would lose ~1e-2 at mean/std = 25 without
    the shift; with it the error stays within a few times the NCHW kernel's, at every offset."""
    from sd_cli.model import layers

    torch.manual_seed(0)
    gn = layers.group_norm(64)
    with torch.no_grad():
        gn.weight.copy_(1 + 0.1 * torch.randn(64))
        gn.bias.copy_(0.1 * torch.randn(64))
    x = offset + 2 * torch.randn(2, 64, 16, 16)
    x[:, :, :8] += 1.0  # groups not flat in space, so the subsample mean is not exact
    ref = torch.nn.functional.group_norm(x.double(), 32, gn.weight.double(), gn.bias.double(), gn.eps)
    nchw_err = (torch.nn.functional.group_norm(x, 32, gn.weight, gn.bias, gn.eps).double() - ref).abs().max().item()
    calls = []
    real = torch.native_group_norm
    monkeypatch.setattr(torch, "native_group_norm", lambda *a: calls.append(a[0].is_contiguous(memory_format=torch.channels_last)) or real(*a))
    out = gn(x.contiguous(memory_format=torch.channels_last))
    assert calls == [True]  # the NHWC kernel ran on the shifted channels-last tensor, and was kept:
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = (out.double() - ref).abs().max().item()
    assert err < max(4 * nchw_err, 2e-6), (err, nchw_err)
    # unshifted, that kernel is far off once the mean dominates (what the shift is for)
    plain = real(x.contiguous(memory_format=torch.channels_last), gn.weight, gn.bias, 2, 64, 256, 32, gn.eps)[0]
    if offset >= 50:
        assert (plain.double() - ref).abs().max().item() > 100 * err


def test_groupnorm_channels_last_float32_falls_back_when_the_shift_misses():
    """A group whose mass sits where the 1/16 subsample never looks (rows 1, 5, 9, 13: a quarter of the
    pixels, so after the shift |mean| / std = sqrt(1/3) > FP32_NHWC_MAX_RATIO) takes the exact NCHW path."""
    from sd_cli.model import layers

    torch.manual_seed(0)
    gn = layers.group_norm(64)
    x = 1.0 + 1e-3 * torch.randn(1, 64, 16, 16)
    x[:, :, 1::4] += 200.0
    out = gn(x.contiguous(memory_format=torch.channels_last))
    nchw = torch.nn.functional.group_norm(x, 32, gn.weight, gn.bias, gn.eps)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, nchw.contiguous(memory_format=torch.channels_last))


def _images(model, dtype_noise_seed=0, steps=8, size=64):
    from sd_cli.pipeline.generate import Pipeline, initial_noise

    pipe = Pipeline(model, CPU)
    gen = torch.Generator().manual_seed(dtype_noise_seed)
    noise = initial_noise(gen, 2, 4, size, size, 8)
    return pipe.generate(["a red circle", "a blue square"], noise, sampler="dpmpp_2m", steps=steps, scale=7.5,
                         generator=gen).astype(np.int16)


@pytest.mark.parametrize("attention", ["fused", "rows"])
def test_bf16_image_stays_close_to_fp32(tiny_models, attention, monkeypatch):
    """Same seed, same weights (bf16-rounded), DPM++ 2M 8 steps, guidance 7.5 (which amplifies eps
    differences 7.5x): measured mean |diff| 0.66 and max 6 of 255 on the tiny random model; bounds ~2.5x.
    "rows": every bf16 attention through `layers.attention_in_rows` (as on a CPU without AMX at 256+ px)."""
    from sd_cli.model import layers

    monkeypatch.setattr(layers, "ROWS_MIN_SCORES", 1 if attention == "rows" else None)
    monkeypatch.setattr(layers, "_cpu_has_amx_bf16", lambda: False)
    a = _images(tiny_models[torch.float32])
    b = _images(tiny_models[torch.bfloat16])
    d = np.abs(a - b)
    print(f"bf16 vs fp32: mean |diff| {d.mean():.3f}, max {d.max()}")
    assert d.mean() < 1.6
    assert d.max() < 16
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


# --- the VAE never yields NaN/black ----------------------------------------------------------------


def test_nonfinite_half_decode_is_redone_in_fp32_once(tiny_files):
    from sd_cli.weights.loading import load_model
    from sd_cli.pipeline.vae_tiling import LatentDecoder

    cfg = load_config_from_text(TINY_YAML).model
    model = load_model(cfg, tiny_files["safetensors"], "cpu", torch.bfloat16)
    vae = model.first_stage_model
    real_decode = vae.decode

    def overflowing(z):  # a half-precision VAE that overflows, as fp16 VAEs do on some latents
        out = real_decode(z)
        return out * float("inf") if z.dtype != torch.float32 else out

    vae.decode = overflowing
    warnings = []
    decode = LatentDecoder(model, "off", warnings.append)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    first = decode(z)
    assert torch.isfinite(first).all() and first.abs().max() > 0
    assert decode.fell_back and vae.post_quant_conv.weight.dtype == torch.float32
    assert len(warnings) == 1 and "float32" in warnings[0] and "bfloat16" in warnings[0]
    again = decode(z)  # the VAE stays float32: no second warning, same pixels
    assert len(warnings) == 1 and torch.equal(first, again)
    # float32 reference: the same bf16-rounded weights, decoded in float32 from the start.
    ref = load_model(cfg, tiny_files["safetensors"], "cpu", torch.bfloat16).first_stage_model.float()
    assert torch.allclose(first, ref.decode(z / cfg.scale_factor), atol=1e-5)


def test_nonfinite_latents_are_not_retried(tiny_files):
    from sd_cli.weights.loading import load_model
    from sd_cli.pipeline.vae_tiling import LatentDecoder

    model = load_model(load_config_from_text(TINY_YAML).model, tiny_files["safetensors"], "cpu", torch.bfloat16)
    warnings = []
    z = torch.full((1, 4, 8, 8), float("nan"))
    out = LatentDecoder(model, "off", warnings.append)(z)
    assert not torch.isfinite(out).all() and warnings == []  # the caller reports bad latents
    assert model.first_stage_model.post_quant_conv.weight.dtype == torch.bfloat16


# --- through the command line ----------------------------------------------------------------------


def _cli(tiny_files, outdir, *extra):
    from sd_cli.cli import main

    return main(["--ckpt", str(tiny_files["safetensors"]), "--config", str(tiny_files["config"]),
                 "--outdir", str(outdir), "--H", "64", "--W", "64", "--steps", "3", "--n_samples", "1",
                 "--n_iter", "1", "--no-watermark", "-q", "--skip_grid", *extra])


def test_cli_records_the_dtype(tiny_files, tmp_path):
    from sd_cli.output.png import read_png_metadata

    assert _cli(tiny_files, tmp_path / "b", "--dtype", "bf16") == 0
    assert read_png_metadata(tmp_path / "b/samples/00000.png")[1]["dtype"] == "bfloat16"
    assert _cli(tiny_files, tmp_path / "f", "--precision", "full") == 0  # CompVis' flag: float32
    assert read_png_metadata(tmp_path / "f/samples/00000.png")[1]["dtype"] == "float32"


def test_cli_autocast_follows_the_cpu(tiny_files, tmp_path, monkeypatch):
    import sd_cli.weights.precision as precision
    from sd_cli.output.png import read_png_metadata

    for feats, expected in ((NATIVE, "bfloat16"), (PLAIN, "float32")):
        monkeypatch.setattr(precision, "cpu_features", lambda *a, feats=feats, **k: feats)
        out = tmp_path / expected
        assert _cli(tiny_files, out, "--precision", "autocast") == 0
        assert read_png_metadata(out / "samples/00000.png")[1]["dtype"] == expected


@pytest.mark.parametrize(
    "extra, needle",
    [(["--precision", "full", "--dtype", "bf16"], "conflicts with --dtype bf16"),
     (["--dtype", "fp16"], "--dtype fp16 on this CPU"),
     (["--dtype", "int8"], "invalid choice"),
     (["--threads", "0"], "--threads 0")],
)
def test_cli_dtype_usage_errors(tiny_files, tmp_path, capsys, monkeypatch, extra, needle):
    import sd_cli.weights.precision as precision

    monkeypatch.setattr(precision, "cpu_features", lambda *a, **k: NATIVE)  # no fp16 arithmetic
    assert _cli(tiny_files, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
