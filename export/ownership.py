"""Which files in ``dfosd-export --out DIR`` the exporter may replace or remove.

dfosd never deletes or overwrites a file it did not write. What it wrote is known from
two records in the folder:

* ``manifest.json`` of an earlier, finished export: its ``files``;
* ``.dfosd-export-in-progress.json``: written before the first ONNX file, listing every
  file this export may write, removed once the new manifest is in place. A killed
  export leaves it behind, so the next run still knows those files are its own.

A folder that is not empty and holds neither record is someone else's: it is refused
before any work. At the end, files an earlier record lists and the new export does not
produce (e.g. the ``_b4`` set after re-exporting with ``--batch 1``) are removed; nothing
else is touched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from dfosd.core.errors import DfosdError
from dfosd.core.manifest import write_json_atomic
from dfosd.core.vocab import EXPORT_IN_PROGRESS_KIND, EXPORT_KIND, MANIFEST_NAME, onnx_name

IN_PROGRESS_NAME = ".dfosd-export-in-progress.json"
# Staging folders of export_part / the Q/DQ rewrite: ".<stem>.dfosd-tmp.<random>".
STAGING_MARK = "dfosd-tmp"


def _listed_files(path: Path, kind: str) -> set[str] | None:
    """The ``files`` of a dfosd record of ``kind`` at ``path``; None if it is absent or not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != kind:
        return None
    files = data.get("files", {})
    return {str(f) for f in files} if isinstance(files, (dict, list)) else set()


def part_files(stems: list[str]) -> set[str]:
    """Every file name an export of these part stems may write (graph and external data)."""
    return {name for stem in stems for name in (onnx_name(stem), onnx_name(stem) + ".data")}


def check_out_folder(out_dir: Path) -> None:
    """Refuse ``--out`` inside dfosd's own package: the package folder itself or one of its stage
    folders (``engines/``, ``export/``, ...: a folder of it holding ``__init__.py``). In a clone the
    clone's root is the package, so a new folder there (``dfosd-engines``) is fine."""
    package = Path(__file__).resolve().parent.parent
    target = Path(out_dir).resolve()
    try:
        inside = target.relative_to(package).parts
    except ValueError:
        return
    if not inside or (package / inside[0] / "__init__.py").is_file():
        where = package if not inside else package / inside[0]
        raise DfosdError(f"--out {out_dir} is {'inside ' if inside else ''}dfosd's own package folder {where}; "
                         "an export never writes among dfosd's source files",
                         hint="pass another folder, e.g. --out dfosd-engines (the default)")


def owned_files(out_dir: Path) -> set[str]:
    """File names in ``out_dir`` that an earlier dfosd export wrote; refuses a foreign non-empty folder."""
    out_dir = Path(out_dir)
    check_out_folder(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DfosdError(f"--out {out_dir} is a file, not a folder", hint="pass a new or empty folder as --out")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return set()
    manifest = _listed_files(out_dir / MANIFEST_NAME, EXPORT_KIND)
    in_progress = _listed_files(out_dir / IN_PROGRESS_NAME, EXPORT_IN_PROGRESS_KIND)
    if manifest is None and in_progress is None:
        shown = sorted(p.name for p in out_dir.iterdir())
        raise DfosdError(f"--out {out_dir} is not empty and is not a dfosd export (no dfosd {MANIFEST_NAME}; it "
                         f"holds {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}). dfosd-export only writes "
                         "into a new or empty folder or an earlier export, so that it never overwrites or deletes "
                         "files it did not write", hint="pass a new or empty folder as --out")
    return (manifest or set()) | (in_progress or set())


def check_planned(out_dir: Path, owned: set[str], planned: set[str]) -> None:
    """Refuse to write over a file no earlier export of the folder wrote (checked before any work)."""
    foreign = sorted(n for n in planned if (Path(out_dir) / n).exists() and n not in owned)
    if foreign:
        raise DfosdError(f"--out {out_dir} holds {', '.join(foreign)}, which this export would overwrite but "
                         f"no earlier dfosd export of that folder wrote", hint="move it away, or pass another --out")


def claim(out_dir: Path, owned: set[str], planned: set[str]) -> None:
    """Record ``planned`` as this export's before the first file is written (see the module docstring)."""
    check_planned(out_dir, owned, planned)
    write_json_atomic(Path(out_dir) / IN_PROGRESS_NAME, {"kind": EXPORT_IN_PROGRESS_KIND,
                                                          "files": sorted(planned | owned)})


def release(out_dir: Path, planned: set[str], *, finished: bool) -> None:
    """Drop the in-progress record: after the manifest is written, or after a failure that wrote
    none of the planned files (otherwise it stays, so the next export may replace them)."""
    out_dir = Path(out_dir)
    if finished or not any((out_dir / n).exists() for n in planned):
        (out_dir / IN_PROGRESS_NAME).unlink(missing_ok=True)


@contextlib.contextmanager
def writing(out_dir: Path, owned: set[str], planned: set[str]):
    """Around an export's writes: ``claim`` first, ``release`` after (also after a failure)."""
    claim(out_dir, owned, planned)
    try:
        yield
    except BaseException:
        release(out_dir, planned, finished=False)
        raise
    release(out_dir, planned, finished=True)


def clear_stale(out_dir: Path, owned: set[str], keep: set[str]) -> list[str]:
    """Remove files an earlier export wrote (``owned``) that this one did not produce (``keep``),
    and staging folders of killed exports; returns the names removed."""
    out_dir = Path(out_dir)
    removed = []
    for name in sorted(owned - keep - {MANIFEST_NAME, IN_PROGRESS_NAME}):
        p = out_dir / name
        if p.is_file() and p.parent == out_dir:  # a bare file name of this folder, nothing else
            p.unlink()
            removed.append(name)
    for p in out_dir.glob(f".*.{STAGING_MARK}.*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for record in (MANIFEST_NAME, IN_PROGRESS_NAME):  # write_json_atomic's temp files, if a kill left one
        for p in out_dir.glob(f".{record}.*.tmp"):
            p.unlink(missing_ok=True)
    return removed
