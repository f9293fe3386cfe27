"""Who is running: the CPU model, its vector ISA and its physical cores.

Compiled caches (OpenVINO blobs, ONNX Runtime's optimized graphs with CPU-specific
layouts) and measured per-part backend choices are only valid on the machine that made
them; each is recorded with this identity and rebuilt when it differs.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Callable

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


RUNTIME_SECTION = "runtime"  # manifest.json key of what runtimes cached here (not part of the build key)


def runtime_record(manifest: dict, key: str) -> dict | None:
    return (manifest.get(RUNTIME_SECTION) or {}).get(key)


def write_runtime_record(export_dir, key: str, record: dict | None) -> bool:
    """Store (or with None drop) one runtime record in the export's manifest.json.

    Re-reads the manifest first so records of other keys written meanwhile survive; the
    write is atomic. Returns False when the directory is read-only (the cache is then
    simply not remembered)."""
    import json

    from dfosd.core.manifest import write_json_atomic
    from dfosd.core.vocab import MANIFEST_NAME

    path = Path(export_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        section = dict(data.get(RUNTIME_SECTION) or {})
        if record is None:
            section.pop(key, None)
        else:
            section[key] = record
        data[RUNTIME_SECTION] = section
        write_json_atomic(path, data)
    except OSError:
        return False
    return True


def prepare_cache_dir(export_dir, folder_name: str, record_key: str, want: dict, patterns: tuple[str, ...],
                      manifest: dict, log) -> Path | None:
    """A runtime cache folder inside the export, emptied of ``patterns`` when the manifest's
    record is not ``want`` (another CPU, runtime version, option or export); None when the
    directory cannot be written (the caller then runs without a cache)."""
    export_dir = Path(export_dir)
    folder = export_dir / folder_name
    have = runtime_record(manifest, record_key)
    try:
        folder.mkdir(exist_ok=True)
        if have != want:
            stale = sorted(p for pat in patterns for p in folder.glob(pat))
            if stale:
                why = "no record" if have is None else ", ".join(k for k in want if have.get(k) != want[k])
                log.warning("%s is stale (%s): rebuilding %d file(s)", folder, why, len(stale))
            for f in stale:  # only what this runtime writes there: the folder is dfosd's
                f.unlink()
            if not write_runtime_record(export_dir, record_key, want):
                raise OSError(f"cannot write {export_dir / 'manifest.json'}")
            manifest.setdefault(RUNTIME_SECTION, {})[record_key] = want
    except OSError as exc:
        log.warning("%s: running without a cache (%s)", folder, exc)
        return None
    return folder


class RuntimeCache:
    """One backend's cache folder in each export it loads from: checked against its record
    (``prepare_cache_dir``) once per export directory, then trusted for the backend's lifetime,
    so loading the next part neither re-reads the manifest nor re-checks the folder."""

    def __init__(self, folder_name: str, record_key: str, patterns: tuple[str, ...], log):
        self.folder_name, self.record_key, self.patterns, self.log = folder_name, record_key, patterns, log
        self._checked: set[Path] = set()

    def folder(self, export_dir, want: Callable[[dict], dict], manifest: dict | None = None) -> Path | None:
        """The cache folder to use, emptied first when stale; None when it cannot be written.
        ``want(manifest)`` is the record the folder must carry."""
        export_dir = Path(export_dir)
        if export_dir in self._checked:
            return export_dir / self.folder_name
        if manifest is None:
            from dfosd.core.manifest import ExportDir

            manifest = ExportDir(export_dir, check="none").manifest
        folder = prepare_cache_dir(export_dir, self.folder_name, self.record_key, want(manifest), self.patterns,
                                   manifest, self.log)
        if folder is not None:
            self._checked.add(export_dir)
        return folder


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
