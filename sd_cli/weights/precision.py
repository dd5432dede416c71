"""Compute dtype and CPU threads: what `--dtype`, `--precision` and `--threads` resolve to.

The rule (issue 3):
* `--dtype fp32|bf16|fp16` is an explicit choice; `--dtype auto` (or `--precision autocast`, or the
  config's `runtime.precision: autocast` when neither flag is given) picks per device:
  - CPU: bfloat16 when the CPU has native bf16 arithmetic that is faster than its float32: AMX-BF16, or
    AVX512-BF16 on a CPU that is not Intel's; else float32. Intel's AVX512-BF16 without AMX measured
    slower in bf16 than in float32 (a Xeon 6/207 virtual machine that hides AMX: a guided 512 step took
    14.2 s in bf16 and 11.0 s in float32, the two models interleaved in one process; README "Speed and
    memory"; Cooper Lake falls under the same rule, unmeasured), while both AMD CPUs measured ran bf16
    1.3x and 2.5x faster;
  - CUDA: bfloat16 when the GPU supports it (compute capability 8.0+), else float16.
* `--precision full` keeps CompVis' meaning: float32.

"Native bf16" is detected, never guessed from a CPU model name: first from torch's own cpuinfo
probe (`torch._C._cpu._get_cpu_capability()`, the library torch's kernels dispatch on), else from the
`flags` line of /proc/cpuinfo. Plain AVX-512 without the BF16 extension only emulates bf16 (oneDNN
converts to fp32), which is no faster than fp32, so auto stays at fp32 there.

float16 on a CPU without AVX512-FP16/AMX-FP16 runs on reference kernels (two orders of magnitude
slower than fp32), so it is refused on such CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd_cli.errors import UsageError
from sd_cli.weights.dtypes import DTYPE_CHOICES, DTYPE_NAMES
from sd_cli.model.cpu import CpuFeatures, cpu_features, default_threads  # noqa: F401  (re-used by the dtype rules)

INTEL = "GenuineIntel"  # CpuFeatures.vendor of Intel's CPUs
DTYPES: dict[str, torch.dtype] = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))
PRECISION_MODE = {"full": "fp32", "autocast": "auto"}  # CompVis' --precision in terms of --dtype


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    name: str  # "fp32" | "bf16" | "fp16"
    reason: str  # one short phrase for the log line, e.g. "auto: CPU has AVX512-BF16"


def requested_mode(dtype_arg: str | None, precision_arg: str | None, config_precision: str) -> str:
    """'auto', 'fp32', 'bf16' or 'fp16' from the flags (flags win over the config)."""
    if dtype_arg not in (None, *DTYPE_CHOICES):
        raise UsageError(f"--dtype {dtype_arg}: choose one of {', '.join(DTYPE_CHOICES)}")
    # --precision full (float32) contradicts any other --dtype; --precision autocast ("let the tool
    # choose") is refined by an explicit --dtype.
    if dtype_arg is not None and precision_arg == "full" and dtype_arg != "fp32":
        raise UsageError(f"--precision full means float32 and conflicts with --dtype {dtype_arg}; pick one")
    if dtype_arg is not None:
        return dtype_arg
    if precision_arg is not None:
        return PRECISION_MODE[precision_arg]
    return PRECISION_MODE.get(config_precision, "auto")


def cuda_bf16_supported(device: torch.device) -> bool:
    try:
        major, _ = torch.cuda.get_device_capability(device)
    except Exception:
        return False
    return major >= 8


def choose_dtype(
    mode: str,
    device: torch.device,
    *,
    features: CpuFeatures | None = None,
    cuda_bf16: bool | None = None,
) -> DtypeChoice:
    """The compute dtype for `mode` ('auto' or an explicit name) on `device`.

    `features` / `cuda_bf16` can be given (tests); otherwise they are detected.
    """
    device = torch.device(device)
    if device.type == "cuda":
        bf16_ok = cuda_bf16_supported(device) if cuda_bf16 is None else cuda_bf16
        if mode == "auto":
            if bf16_ok:
                return DtypeChoice(torch.bfloat16, "bf16", "auto: the GPU supports bf16")
            return DtypeChoice(torch.float16, "fp16", "auto: the GPU has no bf16, fp16 instead")
        if mode == "bf16" and not bf16_ok:
            raise UsageError("--dtype bf16: this GPU has no bfloat16 support (compute capability < 8.0); use fp16")
        return DtypeChoice(DTYPES[mode], mode, "requested")
    features = features or cpu_features()
    if mode == "auto":
        if features.amx_bf16 or (features.avx512_bf16 and features.vendor != INTEL):
            return DtypeChoice(torch.bfloat16, "bf16", f"auto: CPU has {features.bf16_name()}")
        if features.avx512_bf16:
            return DtypeChoice(torch.float32, "fp32", "auto: float32, faster than bf16 on an Intel CPU with "
                                                      "AVX512-BF16 but no AMX; --dtype bf16 takes half the memory")
        return DtypeChoice(torch.float32, "fp32", "auto: CPU has no native bf16")
    if mode == "fp16" and not features.native_fp16:
        raise UsageError(
            "--dtype fp16 on this CPU would run on slow reference kernels (no AVX512-FP16/AMX-FP16); "
            "use --dtype bf16 or fp32 on CPU, fp16 is for CUDA"
        )
    reason = "requested"
    if mode == "bf16" and not features.native_bf16:
        reason = "requested; this CPU has no native bf16, expect it to be slower than fp32"
    return DtypeChoice(DTYPES[mode], mode, reason)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', 'float16' (what the PNG metadata records)."""
    return str(dtype).replace("torch.", "")


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (default: `default_threads()`); returns the number set."""
    n = threads if threads and threads > 0 else default_threads()
    torch.set_num_threads(n)
    return n
