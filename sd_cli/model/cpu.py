"""What this CPU can do natively (bf16/fp16 arithmetic) and how many physical cores it has.

Detected, never guessed from a model name: first from torch's own cpuinfo probe
(`torch._C._cpu._get_cpu_capability()`, what torch's kernels dispatch on), else from the `flags` line
of /proc/cpuinfo. The dtype rules (sd_cli.weights.precision) and the attention kernel choice
(sd_cli.model.layers) both read it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU can do natively, and where we learned it."""

    avx512_bf16: bool = False
    amx_bf16: bool = False
    avx512_fp16: bool = False
    amx_fp16: bool = False
    physical_cores: int | None = None
    source: str = "unknown"  # "torch", "/proc/cpuinfo" or "unknown"
    vendor: str = ""  # /proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"), "" where it does not say

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


def _cpuinfo_vendor(text: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


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
    cores, vendor = None, ""
    if cpuinfo:
        cores, vendor = _cpuinfo_physical_cores(cpuinfo), _cpuinfo_vendor(cpuinfo)
    if capability and "avx512_bf16" in capability:
        n = capability.get("num_physical_cores")
        return CpuFeatures(
            avx512_bf16=bool(capability.get("avx512_bf16")),
            amx_bf16=bool(capability.get("amx_bf16")),
            avx512_fp16=bool(capability.get("avx512_fp16")),
            amx_fp16=bool(capability.get("amx_fp16")),
            physical_cores=int(n) if isinstance(n, int) and n > 0 else cores,
            source="torch",
            vendor=vendor,
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
            vendor=vendor,
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
