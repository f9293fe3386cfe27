"""Manifests: JSON beside every artifact set, so stale or foreign artifacts are detected.

A manifest records what went in (base fingerprint, checkpoint hash, options), the
software that made it, and what came out (files with hashes, contracts). ``build_key``
is a hash of everything that went in: same key and intact files -> reuse; anything
else -> rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from dfosd.core.errors import DfosdError

MANIFEST_NAME = "manifest.json"
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


def umask_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask.

    ``tempfile.mkstemp`` always makes 0600; a file renamed into place from it must get
    this mode, or checkpoints, manifests and reports end up private to their writer."""
    try:  # Linux >= 4.7 shows the umask without changing it (no race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, umask_file_mode())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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


def files_intact(folder: Path, files: dict[str, dict[str, Any]], *, quick: bool = False) -> list[str]:
    """Names of recorded files that are missing or changed (``quick``: size only for big files)."""
    bad = []
    for name, rec in files.items():
        p = Path(folder) / name
        if not p.is_file() or p.stat().st_size != rec.get("bytes"):
            bad.append(name)
        elif not (quick and rec["bytes"] > QUICK_CHECK_BYTES) and sha256_file(p) != rec.get("sha256"):
            bad.append(name)
    return bad
