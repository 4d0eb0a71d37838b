"""What machine a benchmark figure was measured on: every benchmark's JSON line carries `"cpu": cpu_description()`,
because XLA:CPU's speed depends on the vector extensions (AVX-512/AMX vs AVX2 only) as much as on the code."""
from __future__ import annotations

import functools
import os
import platform

_EXTENSIONS = ("amx_tile", "avx512f", "avx512_bf16", "avx2", "fma")


@functools.cache
def cpu_description() -> str:
    """E.g. 'AMD EPYC 7B13 (2 cores; avx2 fma; no avx512)' from /proc/cpuinfo (the platform's name elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    present = [name for name in _EXTENSIONS if name in flags]
    missing = "" if "avx512f" in flags or not flags else "; no avx512"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores; {' '.join(present) or 'no avx'}{missing})"
