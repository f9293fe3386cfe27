"""Manifests: JSON beside every artifact set, so stale or foreign artifacts are detected.

A manifest records what went in (base fingerprint, checkpoint hash, options), the
software that made it, and what came out (files with hashes, contracts). ``build_key``
is a hash of everything that went in: same key and intact files -> reuse; anything
else -> rebuild.
"""

from __future__ import annotations

import hashlib
import os
import json
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from dfosd.core.atomic import (  # noqa: F401 - re-exported: their one home is core/atomic.py
    umask_file_mode, write_bytes_atomic, write_json_atomic, write_text_atomic)
from dfosd.core.errors import DfosdError
from dfosd.core.vocab import COMPONENTS, MANIFEST_NAME, RUNTIME_RECORDS_KIND, RUNTIME_RECORDS_NAME

# 2: every export records its family, its float precision and each part's precision (format 1 let
# them be missing and readers guessed; those guesses are gone: a format-1 export is re-exported).
MANIFEST_FORMAT = 2


def package_versions(*names: str) -> dict[str, str | None]:
    out = {}
    for n in names:
        try:
            out[n] = importlib_metadata.version(n)
        except importlib_metadata.PackageNotFoundError:
            out[n] = None
    return out


def source_fingerprint(stages: tuple[str, ...] = ("core", "export", "calibration")) -> str:
    """Hash of the code that produces artifacts: an edited exporter invalidates old exports
    even when the package version did not change (editable installs, development)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for stage in stages:
        for f in sorted((root / stage).glob("*.py")):
            if f.name.endswith("cli.py"):
                continue  # command-line front ends do not shape the artifacts
            h.update(f"{stage}/{f.name}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def software_versions() -> dict[str, Any]:
    return {"python": platform.python_version(), "dfosd_source": source_fingerprint(),
            **package_versions("dfosd", "torch", "diffusers", "onnx", "onnxruntime", "onnxruntime-gpu",
                               "onnxconverter-common")}


def build_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise DfosdError(f"{folder} has no {MANIFEST_NAME}: it is not a dfosd export directory",
                         hint="run dfosd-export --ckpt lora.safetensors --out DIR first and pass that DIR")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DfosdError(f"{path} is not valid JSON ({exc})", hint="re-run dfosd-export to rewrite it") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        ckpt = ((data.get("inputs") or {}).get("checkpoint") if isinstance(data, dict) else None) or "CKPT"
        older = isinstance(found, int) and not isinstance(found, bool) and found < MANIFEST_FORMAT
        raise DfosdError(f"{path} has manifest format {found!r}; this dfosd reads format {MANIFEST_FORMAT}"
                         + (" (the export was made by an older dfosd)" if older else ""),
                         hint=f"re-export: dfosd-export --ckpt {ckpt} --out {Path(folder)} (with the options it was "
                              "made with); its ONNX files are rewritten, its engines and caches rebuilt")
    from dfosd.core.manifest_check import check_export_manifest

    check_export_manifest(data, path)  # an edited manifest is a clear error, not a traceback later
    return data


# Hashing a multi-GB UNet on every run would cost seconds: above this size a load-time
# check compares the byte count only; export-time reuse checks always hash everything.
QUICK_CHECK_BYTES = 256 << 20


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def changed_files(folder: Path, files: dict[str, dict[str, Any]], *, quick: bool = False) -> list[str]:
    """Names of recorded files that are missing or changed (``quick``: size only for big files)."""
    bad = []
    for name, rec in files.items():
        p = Path(folder) / name
        if not p.is_file() or p.stat().st_size != rec.get("bytes"):
            bad.append(name)
        elif not (quick and rec["bytes"] > QUICK_CHECK_BYTES) and sha256_file(p) != rec.get("sha256"):
            bad.append(name)
    return bad


@dataclass(frozen=True)
class PartRecord:
    """One part of one tile batch as the manifest records it, parsed once: what a backend loads."""
    component: str
    batch: int
    onnx: str  # its ONNX file's name in the export folder
    contract: Any  # ComponentContract

    @property
    def stem(self) -> str:
        return self.contract.stem


class ExportDir:
    """The one reader of an export directory: its manifest, its files' integrity, and its
    parts, contracts and file paths per tile batch.

    ``check`` is how the recorded files are verified on opening: ``"quick"`` (sizes only for
    files past ``QUICK_CHECK_BYTES``: what loading engines needs), ``"full"`` (every hash:
    what building from the files needs) or ``"none"`` (the caller checks what it uses).
    """

    def __init__(self, path: str | Path, *, check: str = "quick"):
        if check not in ("quick", "full", "none"):
            raise ValueError(f"check={check!r}: choose quick, full or none")
        self.path = Path(path)
        self.check = check
        self.manifest = read_manifest(self.path)
        if check != "none":
            changed = changed_files(self.path, self.files, quick=check == "quick")
            if changed:
                raise DfosdError(f"{self.path}: {', '.join(changed)} missing or changed since export",
                                 hint="re-run dfosd-export into this directory")

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("files", {})

    @property
    def build_key(self) -> str:
        return str(self.manifest.get("build_key"))

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(sorted(int(b) for b in self.manifest["batches"]))

    @property
    def tile(self) -> int:
        return int(self.manifest["tile"])

    @property
    def upscale(self) -> int:
        return int(self.manifest["upscale"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def float_precision(self) -> str:
        """The precision of what is not quantized (the precision itself for float exports)."""
        return str(self.manifest["float_precision"])

    @property
    def inputs(self) -> dict[str, Any]:
        """What the export was made from: checkpoint path and sha256, base spec and fingerprint, options."""
        return dict(self.manifest.get("inputs") or {})

    @property
    def components(self) -> dict[str, dict]:
        """Part stem -> its manifest entry, every tile batch (``parts(batch)`` for the parsed records)."""
        return {stem: dict(e) for stem, e in sorted(self.manifest.get("components", {}).items())}

    @property
    def calibration(self) -> dict[str, Any]:
        """The 8-bit calibration record (empty for float exports)."""
        return dict(self.manifest.get("calibration") or {})

    @property
    def family(self) -> dict[str, Any]:
        """The model family's record (name, colour fix, deviations, ...)."""
        return dict(self.manifest["family"])

    @property
    def color_fix(self) -> str:
        """The colour fix upstream applies by default for this export's family."""
        return str(self.family.get("color_fix", "none"))

    @property
    def timestep(self) -> int | None:
        """`dfosd-export --timestep`'s override of the family's timestep, or None."""
        t = self.manifest.get("timestep")
        return t if isinstance(t, int) and not isinstance(t, bool) else None

    def file(self, name: str) -> Path:
        return self.path / name

    def complete_batches(self) -> dict[int, dict[str, dict]]:
        """Tile batch -> {part -> manifest entry}, for the batches that have every part."""
        by_batch: dict[int, dict[str, dict]] = {}
        for entry in self.manifest.get("components", {}).values():
            by_batch.setdefault(int(entry["batch"]), {})[entry["component"]] = entry
        return {b: parts for b, parts in sorted(by_batch.items()) if set(parts) == set(COMPONENTS)}

    def entries(self, batch: int) -> dict[str, dict]:
        """The manifest entry of each part for one tile batch, in pipeline order."""
        found = self.complete_batches().get(int(batch))
        if found is None:
            have = sorted({int(c["batch"]) for c in self.manifest.get("components", {}).values()})
            raise DfosdError(f"the export has no tile batch {batch} (it has {have})",
                             hint=f"pass --batch {have[0] if have else 1}, or re-export with --batch {batch}")
        return {name: found[name] for name in COMPONENTS}

    def parts(self, batch: int) -> dict[str, PartRecord]:
        """Part -> its frozen record for one tile batch, in pipeline order (parsed once)."""
        from dfosd.core.contracts import ComponentContract

        cache = self.__dict__.setdefault("_parts", {})
        if int(batch) not in cache:
            cache[int(batch)] = {name: PartRecord(name, int(batch), str(e["onnx"]),
                                                  ComponentContract.from_dict(e["contract"]))
                                 for name, e in self.entries(batch).items()}
        return dict(cache[int(batch)])

    def all_parts(self) -> list[PartRecord]:
        """Every part of every complete tile batch."""
        return [p for b in self.complete_batches() for p in self.parts(b).values()]

    def contracts(self, batch: int) -> dict:
        """Part -> ``ComponentContract`` for one tile batch, in pipeline order."""
        return {name: p.contract for name, p in self.parts(batch).items()}

    # ------------------------------------------------------------ runtime records

    def runtime_records(self) -> dict[str, Any]:
        """What runtimes recorded here (``runtime.json``): caches and measured choices, by key.
        An unreadable or foreign file reads as no records (the caches are then rebuilt)."""
        try:
            data = json.loads((self.path / RUNTIME_RECORDS_NAME).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("kind") != RUNTIME_RECORDS_KIND:
            return {}
        records = data.get("records")
        return records if isinstance(records, dict) else {}

    def runtime_record(self, key: str) -> Any:
        return self.runtime_records().get(key)

    def write_runtime_record(self, key: str, record: Any) -> bool:
        """Store (``None``: drop) one runtime record; see ``update_runtime_record``."""
        return self.update_runtime_record(key, lambda _old: record)

    def update_runtime_record(self, key: str, update: Callable[[Any], Any]) -> bool:
        """Replace one runtime record by ``update(its current value)`` (``None``: drop it),
        atomically: read-modify-write under a lock on the folder, so what other processes
        recorded meanwhile survives. ``manifest.json`` is never touched. False when the
        folder cannot be written (the record is then simply not kept)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            records = dict(self.runtime_records())
            record = update(records.get(key))
            if record is None:
                records.pop(key, None)
            else:
                records[key] = record
            write_json_atomic(self.path / RUNTIME_RECORDS_NAME, {"kind": RUNTIME_RECORDS_KIND, "records": records})
        except OSError:
            return False
        finally:
            os.close(fd)  # closing releases the lock
        return True
