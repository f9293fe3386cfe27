"""Manifests: JSON beside every artifact set, so stale or foreign artifacts are detected.

A manifest records what went in (base fingerprint, checkpoint hash, options), the
software that made it, and what came out (files with hashes, contracts). ``build_key``
is a hash of everything that went in: same key and intact files -> reuse; anything
else -> rebuild.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from dfosd.core.atomic import (  # noqa: F401 - re-exported: their one home is core/atomic.py
    umask_file_mode, write_bytes_atomic, write_json_atomic, write_text_atomic)
from dfosd.core.errors import DfosdError
from dfosd.core.vocab import COMPONENTS, MANIFEST_NAME

MANIFEST_FORMAT = 1


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
        raise DfosdError(f"{path} has manifest format {data.get('format') if isinstance(data, dict) else None!r}; this dfosd reads {MANIFEST_FORMAT}",
                         hint="re-run dfosd-export with this dfosd version")
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
    def family(self) -> dict[str, Any]:
        """The model family's record (exports from before families: DFOSD, no colour fix)."""
        return self.manifest.get("family") or {"name": "dfosd", "color_fix": "none", "deviations": []}

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

    def contracts(self, batch: int) -> dict:
        """Part -> ``ComponentContract`` for one tile batch, in pipeline order."""
        from dfosd.core.contracts import ComponentContract

        return {name: ComponentContract.from_dict(e["contract"]) for name, e in self.entries(batch).items()}
