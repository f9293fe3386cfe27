"""Who is running: the CPU model, its vector ISA and its physical cores.

Compiled caches (OpenVINO blobs, ONNX Runtime's optimized graphs with CPU-specific
layouts) and measured per-part backend choices are only valid on the machine that made
them; each is recorded with this identity and rebuilt when it differs.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

# The flags that change which kernels a CPU runtime picks (and so what a cache holds).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve")


@lru_cache(maxsize=1)
def _cpuinfo() -> list[str]:  # read once: cpu_model, cpu_isa and physical_cores all ask
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


@lru_cache(maxsize=1)
def cpu_model() -> str:
    for line in _cpuinfo():
        if line.lower().startswith(("model name", "cpu model", "hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_isa() -> tuple[str, ...]:
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in ISA_FLAGS if f in have)
    return ()


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads do not add matmul throughput)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores, phys, core = set(), None, None
    for line in _cpuinfo() + [""]:
        if line.startswith("physical id"):
            phys = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            core = line.split(":", 1)[1].strip()
        elif not line.strip():
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    return max(1, min(usable, len(cores) or usable))


def machine_identity() -> dict:
    """What a CPU cache or timing is valid for (compared as a whole)."""
    return {"cpu": cpu_model(), "isa": list(cpu_isa()), "physical_cores": physical_cores(),
            "machine": platform.machine()}


THREADS_ENV = "DFOSD_THREADS"


def cpu_threads() -> int:
    """Intra-op threads for the CPU backends: $DFOSD_THREADS when set (a machine shared with
    other jobs, or tests of tiny models, where spinning threads wait on each other), else
    the physical cores."""
    from dfosd.core.errors import DfosdError

    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return physical_cores()
    if not raw.isdigit() or int(raw) < 1:
        raise DfosdError(f"{THREADS_ENV}={raw!r} is not a thread count",
                         hint=f"set {THREADS_ENV} to an integer >= 1, or unset it")
    return int(raw)
