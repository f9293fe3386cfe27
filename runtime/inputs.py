"""Finding input images: expanding INPUT arguments, naming what is skipped, guarding --out.

A folder is searched recursively for image file names; its other files are skipped and
named (a ``.txt`` next to the photos is not an error, but the summary says it was left).
Outputs must never land on inputs, nor where a later run would read them as inputs: an
``--out`` that is, or is inside, an input folder is refused before any work, and files a
glob pattern finds inside ``--out`` are skipped.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dfosd.core.errors import DfosdError

# Decoding is refused above this many input pixels (checked from the header, before any
# pixel is decoded). 25 MP (e.g. 5000x5000) -> a 400 MP x4 output: about 2 GiB at the
# run's ~88 bytes per input pixel (README, "Limits"); --max-pixels changes it.
DEFAULT_MAX_PIXELS = 25_000_000

# format name -> (PIL format, file suffix)
OUTPUT_FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_hidden(rel: Path) -> bool:
    # Skips our own temporary dot-files, macOS "._name.jpg" resource forks, .thumbnails/ ...
    return any(part.startswith(".") for part in rel.parts)


def not_image_reason(path: Path) -> str:
    return f"not an image file name ({path.suffix or 'no suffix'}; read: {', '.join(sorted(IMAGE_SUFFIXES))})"


def _scan_folder(folder: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """Image files under ``folder`` (recursive, hidden ones left out), sorted, with paths relative
    to it; and the other (non-hidden) files, with the reason they are skipped."""
    found, skipped = [], []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if _is_hidden(rel) or not path.is_file():
            continue
        if is_image_name(path):
            found.append((path, rel))
        else:
            skipped.append((path, not_image_reason(path)))
    return sorted(found, key=lambda pr: pr[1].parts), sorted(skipped)


def _expand_glob(pattern: str) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """Image files matching a glob pattern (``**`` recurses), sorted, outputs named by the bare file
    name; and the matching files that are not image names, with the reason."""
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [p for p in paths if p.is_file()]
    return ([(p, Path(p.name)) for p in files if is_image_name(p)],
            [(p, not_image_reason(p)) for p in files if not is_image_name(p)])


def is_inside(path: Path, folder: Path) -> bool:
    """Whether resolved ``path`` is ``folder`` or below it (both resolved)."""
    return path == folder or folder in path.parents


@dataclass
class CollectedInputs:
    pairs: list[tuple[Path, Path]]  # (input file, output path relative to --out)
    problems: list[str]  # inputs that yield nothing or cannot be used: each one fails
    skipped: list[tuple[Path, str]]  # files found but left alone, with the reason (not images, inside --out)


def collect_inputs(inputs: Sequence[str], out_dir: str | Path | None = None) -> CollectedInputs:
    """Expand INPUT arguments into (file, relative output path) pairs, problems and skipped files.

    * a file: used as given, whatever its suffix (a wrong file should be reported by
      ``load_image``, not skipped silently); output named after the file;
    * a folder: its image files, recursively, outputs mirroring its sub-folders; its other
      files are skipped and named (hidden files and folders are left out unnamed);
    * anything else with glob characters: a pattern; matching image files, by file name.

    Inputs that yield nothing become problems ("no such file or folder: X"). The same
    file reached twice is kept once. Two different files whose outputs would have the
    same name (a/x.png and b/x.png given as files, or x.png next to x.jpg) would
    overwrite each other: the later one is dropped with a problem message. With
    ``out_dir``, files a pattern finds inside it are skipped: an output is never read
    as an input (``check_output_folder`` refuses an ``out_dir`` inside an input folder).
    """
    pairs: list[tuple[Path, Path]] = []
    problems: list[str] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    outputs: dict[Path, Path] = {}  # output name without suffix -> the file that claimed it
    out_r = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_file():
            found = [(path, Path(path.name))]
        elif path.is_dir():
            found, other = _scan_folder(path)
            skipped += other
            if not found:
                problems.append(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder: {raw}")
        elif glob.has_magic(raw):
            found, other = _expand_glob(raw)
            skipped += other
            if out_r is not None:
                inside = [(src, rel) for src, rel in found if is_inside(src.resolve(), out_r)]
                skipped += [(src, f"inside --out {out_dir}: outputs are never read as inputs") for src, _ in inside]
                found = [pr for pr in found if pr not in inside]
            if not found:
                problems.append(f"no image files match: {raw}")
        else:
            found = []
            problems.append(f"no such file or folder: {raw}")
        for src, rel in found:
            key = src.resolve()
            if key in seen:
                continue
            seen.add(key)
            stem = rel.with_suffix("")
            if stem in outputs:
                problems.append(f"{src}: skipped, its output would overwrite that of {outputs[stem]} "
                                f"(both are {stem}.*)")
                continue
            outputs[stem] = src
            pairs.append((src, rel))
    return CollectedInputs(pairs, problems, skipped)


def check_output_folder(inputs: Sequence[str], pairs: Sequence[tuple[Path, Path]], out_dir: str | Path,
                        fmt: str) -> None:
    """Refuse an ``out_dir`` that is, or is inside, an input folder, and any output that would
    land on an input file or inside an input folder.

    Writing there overwrites inputs of the same name, and the next run over that folder
    would upscale the outputs again (x16, x64, ...). Checked before any work.
    """
    out_r = Path(out_dir).expanduser().resolve()
    folders = [(raw, Path(raw).expanduser().resolve()) for raw in inputs if Path(raw).expanduser().is_dir()]
    for raw, folder in folders:
        if is_inside(out_r, folder):
            where = "is the input folder" if out_r == folder else "is inside the input folder"
            raise DfosdError(f"--out {out_dir} {where} {raw}: outputs would overwrite inputs of the same name, "
                             "and a later run would upscale its own outputs again",
                             hint=f"pass an --out outside {raw}, e.g. --out {Path(raw).expanduser().resolve()}-sr")
    sources = {src.resolve(): src for src, _ in pairs}
    for src, rel in pairs:
        dst = output_path_for(rel, out_r, fmt).resolve()
        if dst in sources:
            raise DfosdError(f"the output for {src} would be written over the input {sources[dst]}",
                             hint="pass an --out that holds no inputs")
        for raw, folder in folders:
            if is_inside(dst, folder):
                raise DfosdError(f"the output for {src} ({dst}) would land inside the input folder {raw}, "
                                 "where a later run would read it as an input", hint=f"pass an --out outside {raw}")


def output_path_for(rel: Path, out_dir: Path, fmt: str) -> Path:
    """Where the output for relative input path ``rel`` goes: ``out_dir/rel`` with the format's suffix."""
    if fmt not in OUTPUT_FORMATS:
        raise DfosdError(f"unknown output format {fmt!r}", hint=f"use one of: {', '.join(OUTPUT_FORMATS)}")
    rel = Path(rel)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"output path must be relative and stay inside the output folder: {rel}")
    return Path(out_dir) / rel.with_suffix(OUTPUT_FORMATS[fmt][1])
