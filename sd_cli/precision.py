"""Compute dtype and CPU threads: what `--dtype`, `--precision` and `--threads` resolve to.

The rule (issue 3):
* `--dtype fp32|bf16|fp16` is an explicit choice; `--dtype auto` (or `--precision autocast`, or the
  config's `runtime.precision: autocast` when neither flag is given) picks per device:
  - CPU: bfloat16 when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16), else float32;
  - CUDA: bfloat16 when the GPU supports it (compute capability 8.0+), else float16.
* `--precision full` keeps CompVis' meaning: float32.

"Native bf16" is detected, never guessed from a CPU model name: first from torch's own cpuinfo
probe (`torch._C._cpu._get_cpu_capability()`, the library torch's kernels dispatch on), else from the
`flags` line of /proc/cpuinfo. Plain AVX-512 without the BF16 extension only emulates bf16 (oneDNN
converts to fp32), which is no faster than fp32, so auto stays at fp32 there.

float16 on a CPU without AVX512-FP16/AMX-FP16 runs on reference kernels (a 3x3 conv measured ~170x
slower than fp32 here), so it is refused on such CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import UsageError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
PRECISION_MODE = {"full": "fp32", "autocast": "auto"}  # CompVis' --precision in terms of --dtype


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU can do natively, and where we learned it."""

    avx512_bf16: bool = False
    amx_bf16: bool = False
    avx512_fp16: bool = False
    amx_fp16: bool = False
    physical_cores: int | None = None
    source: str = "unknown"  # "torch", "/proc/cpuinfo" or "unknown"

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16

    @property
    def native_fp16(self) -> bool:
        return self.avx512_fp16 or self.amx_fp16

    def bf16_name(self) -> str:
        return "AMX-BF16" if self.amx_bf16 else "AVX512-BF16" if self.avx512_bf16 else "none"


def _torch_capability() -> Mapping[str, object] | None:
    probe = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if probe is None:
        return None
    try:
        caps = probe()
    except Exception:  # a probe that fails tells us nothing
        return None
    return caps if isinstance(caps, Mapping) else None


def _read_cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _cpuinfo_flags(text: str) -> set[str]:
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _cpuinfo_physical_cores(text: str) -> int | None:
    """Distinct (physical id, core id) pairs; None when the file does not say."""
    cores: set[tuple[str, str]] = set()
    phys = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():  # end of one processor's block
            if core is not None:
                cores.add((phys or "0", core))
            phys = core = None
    return len(cores) or None


def cpu_features(
    capability: Mapping[str, object] | None = None, cpuinfo: str | None = None, *, probe: bool = True
) -> CpuFeatures:
    """Detect native bf16/fp16 and the physical core count.

    `capability` (torch's probe result) and `cpuinfo` (/proc/cpuinfo text) can be passed in (tests);
    with `probe=True` the missing ones are read from this machine.
    """
    if probe:
        capability = capability if capability is not None else _torch_capability()
        cpuinfo = cpuinfo if cpuinfo is not None else _read_cpuinfo()
    cores = None
    if cpuinfo:
        cores = _cpuinfo_physical_cores(cpuinfo)
    if capability and "avx512_bf16" in capability:
        n = capability.get("num_physical_cores")
        return CpuFeatures(
            avx512_bf16=bool(capability.get("avx512_bf16")),
            amx_bf16=bool(capability.get("amx_bf16")),
            avx512_fp16=bool(capability.get("avx512_fp16")),
            amx_fp16=bool(capability.get("amx_fp16")),
            physical_cores=int(n) if isinstance(n, int) and n > 0 else cores,
            source="torch",
        )
    if cpuinfo:
        flags = _cpuinfo_flags(cpuinfo)
        return CpuFeatures(
            avx512_bf16="avx512_bf16" in flags,
            amx_bf16="amx_bf16" in flags,
            avx512_fp16="avx512_fp16" in flags,
            amx_fp16="amx_fp16" in flags,
            physical_cores=cores,
            source="/proc/cpuinfo",
        )
    return CpuFeatures()


def default_threads(features: CpuFeatures | None = None) -> int:
    """Physical cores this process may use: min(physical cores, CPUs in our affinity mask)."""
    features = features or cpu_features()
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores = features.physical_cores or allowed
    return max(1, min(cores, allowed))


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
        if features.native_bf16:
            return DtypeChoice(torch.bfloat16, "bf16", f"auto: CPU has {features.bf16_name()}")
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
