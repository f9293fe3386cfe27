"""Validation of an export's ``manifest.json`` when it is read.

A manifest is a file a person can edit. Without a check, an edited ``tile`` gave a
traceback deep in the runner, an edited ``precision`` a mislabelled report, and an
emptied ``files`` list silently turned the hash check off. Every problem found is
listed in one ``DfosdError`` naming the file, with the fix (re-export).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dfosd.core.errors import problems_error
from dfosd.core.vocab import COLOR_FIXES, COMPONENTS, EXPORT_KIND, FLOAT_PRECISIONS, PRECISIONS
from dfosd.core.vocab import stem as part_stem

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(v: Any, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_file_records(files: Any, problems: list[str]) -> None:
    if not isinstance(files, dict):
        problems.append(f"'files' is {type(files).__name__}, expected an object of file name -> sha256/bytes")
        return
    for name, rec in files.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not _SHA256.match(rec["sha256"]) \
                or not _is_int(rec.get("bytes"), 0):
            problems.append(f"files[{name!r}] is not a record of sha256 (64 hex digits) and bytes")
        if Path(name).name != name:
            problems.append(f"files[{name!r}] is not a bare file name of the export folder")


def _check_component(stem: str, entry: Any, data: dict, problems: list[str]) -> tuple[str, int] | None:
    from dfosd.core.contracts import ComponentContract

    if not isinstance(entry, dict):
        problems.append(f"components[{stem!r}] is not an object")
        return None
    name, batch = entry.get("component"), entry.get("batch")
    if name not in COMPONENTS or not _is_int(batch):
        problems.append(f"components[{stem!r}]: component {name!r} / batch {batch!r} (expected one of "
                        f"{', '.join(COMPONENTS)} and an integer >= 1)")
        return None
    if entry.get("precision") not in PRECISIONS:
        problems.append(f"components[{stem!r}]: precision {entry.get('precision')!r} is not one of "
                        f"{', '.join(PRECISIONS)}")
    elif entry.get("precision") not in {data.get("precision"), data.get("float_precision")}:
        problems.append(f"components[{stem!r}]: precision {entry['precision']!r} is neither the export's "
                        f"precision {data.get('precision')!r} nor its float precision {data.get('float_precision')!r}")
    if not isinstance(entry.get("onnx"), str):
        problems.append(f"components[{stem!r}]: no 'onnx' file name")
    try:
        contract = ComponentContract.from_dict(entry["contract"])
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"components[{stem!r}]: unreadable contract ({type(exc).__name__}: {exc})")
        return name, batch
    tile, up = data.get("tile"), data.get("upscale")
    if _is_int(tile) and _is_int(up):
        want = {"encoder": (contract.inputs, (batch, 3, tile, tile)),
                "decoder": (contract.outputs, (batch, 3, tile * up, tile * up))}.get(name)
        # the decoder may have a second output, its per-tile non-finite flag (core/vocab.py SR_NONFINITE)
        if want is not None and (not 1 <= len(want[0]) <= (2 if name == "decoder" else 1)
                                 or want[0][0].shape != want[1]):
            got = [s.shape for s in want[0]]
            problems.append(f"components[{stem!r}]: its tensors {got} do not fit tile {tile}, upscale {up}, "
                            f"batch {batch} (expected {want[1]})")
    return name, batch


def _check_family(data: dict, problems: list[str]) -> None:
    """The family record the runtime applies per image (colour fix): checked once here, not
    found broken image by image."""
    family = data.get("family")
    if not isinstance(family, dict) or not isinstance(family.get("name"), str):
        problems.append(f"family is {type(family).__name__ if not isinstance(family, dict) else 'an object'} "
                        "without a name, expected the model family's record")
    elif family.get("color_fix", "none") not in COLOR_FIXES:
        problems.append(f"family.color_fix {family.get('color_fix')!r} is not one of {', '.join(COLOR_FIXES)}")


def check_export_manifest(data: Any, path: Path) -> None:
    """Raise one DfosdError listing every problem of an export manifest read from ``path``."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise problems_error(f"{path}", [f"is a JSON {type(data).__name__}, not an object"],
                             hint="re-run dfosd-export to rewrite it")
    if data.get("kind") != EXPORT_KIND:
        problems.append(f"kind is {data.get('kind')!r}, expected {EXPORT_KIND!r}")
    if not _is_int(data.get("tile"), 8):
        problems.append(f"tile {data.get('tile')!r} is not an integer >= 8")
    if not _is_int(data.get("upscale")):
        problems.append(f"upscale {data.get('upscale')!r} is not an integer >= 1")
    precision, float_precision = data.get("precision"), data.get("float_precision")
    if precision not in PRECISIONS:
        problems.append(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if float_precision not in FLOAT_PRECISIONS:
        problems.append(f"float_precision {float_precision!r} is not fp32 or fp16")
    elif precision in FLOAT_PRECISIONS and float_precision != precision:
        problems.append(f"precision {precision!r} and float_precision {float_precision!r} disagree "
                        "(they are equal in an fp32/fp16 export)")
    batches = data.get("batches")
    if not isinstance(batches, list) or not batches or not all(_is_int(b) for b in batches):
        problems.append(f"batches {batches!r} is not a non-empty list of integers >= 1")
        batches = []
    components = data.get("components")
    if not isinstance(components, dict) or not components:
        problems.append("components is empty or missing")
        components = {}
    seen = set()
    for stem, entry in components.items():
        key = _check_component(stem, entry, data, problems)
        if key is not None:
            seen.add(key)
    missing = [part_stem(c, b) for b in batches for c in COMPONENTS if (c, b) not in seen]
    if missing:
        problems.append(f"no component entries for {', '.join(missing)} (batches {batches})")
    _check_file_records(data.get("files"), problems)
    _check_family(data, problems)
    if problems:
        raise problems_error(f"{path} is not a valid dfosd export manifest (edited?)", problems,
                             hint="re-run dfosd-export into this folder to rewrite it")


def unrecorded_files(manifest: dict, entries: list[dict]) -> list[str]:
    """The files these component entries load that the manifest has no hash record of.

    An export records every ONNX file it writes; a file without a record would be loaded
    unchecked (an emptied ``files`` list turned the check off)."""
    files = manifest.get("files") or {}
    names = []
    for e in entries:
        names += e.get("files") or [e["onnx"]] + ([e["external_data"]] if e.get("external_data") else [])
    return sorted({n for n in names if n not in files})
