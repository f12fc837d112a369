"""What this machine's CPU computes natively, as /proc/cpuinfo lists it."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags; None where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86, aarch64
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 matrix products run natively (AMX or AVX-512 BF16 on x86, BF16 on aarch64); without,
    bfloat16 compute is emulated and slower than float32. True where the flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    return flags is None or bool({"amx_bf16", "avx512_bf16", "bf16"} & flags)
