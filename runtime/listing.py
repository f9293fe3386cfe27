"""Streaming the inputs of a ``--ray`` run: one item at a time, never the whole listing.

``collect_inputs`` (runtime/inputs.py) builds the full, sorted list of a local run; a run
over a million files must not. ``iter_inputs`` yields the same kinds of items from the same
INPUT arguments, walking folders with ``os.scandir`` and reading list files line by line, so
the driver holds one directory entry (plus the stack of folders being walked) at a time.

What differs from the local listing, and why:
* order: folders are yielded in ``os.scandir`` order, not sorted (sorting needs the whole
  listing); outputs and their names are the same, only the report's order differs;
* ``x.png`` beside ``x.jpg`` (both would write ``x.png``): the name that sorts first wins, as
  locally; found by asking the file system for the siblings (a few ``stat`` calls), not by
  remembering names;
* a text file argument (``*.txt`` / ``*.lst``) lists one path per line (``#`` comments,
  blank lines ignored, relative paths from the list's folder); a relative path keeps its
  sub-folders in ``--out``, an absolute one is named by its file name. Output names from
  list files and glob patterns are remembered to refuse duplicates and collisions: that set,
  about 200 bytes per listed file (measured, BENCHMARKS.md), is the one part of the listing the driver keeps.
* an input folder inside another input folder is refused (it would be walked twice).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from dfosd.core.errors import DfosdError
from dfosd.runtime.inputs import IMAGE_SUFFIXES, is_image_name, is_inside, not_image_reason

LIST_SUFFIXES = frozenset({".txt", ".lst"})


@dataclass(frozen=True)
class Item:
    kind: str  # "image" (src, rel), "problem" (message), "skipped" (src, reason)
    src: str = ""
    rel: str = ""
    message: str = ""

    def record(self) -> dict:
        if self.kind == "problem":
            return {"input": self.message, "status": "failed", "error": self.message}
        return {"input": self.src, "status": "skipped", "reason": self.message}


def is_list_file(path: Path) -> bool:
    return path.suffix.lower() in LIST_SUFFIXES and path.is_file()


def _sibling_winner(folder: str, name: str) -> str | None:
    """The name that claims ``name``'s output when image siblings share its stem (the first in
    sorted order, as collect_inputs decides); None when ``name`` itself wins."""
    stem, _ = os.path.splitext(name)
    rivals = [stem + s for suf in IMAGE_SUFFIXES for s in {suf, suf.upper()}
              if stem + s != name and os.path.isfile(os.path.join(folder, stem + s))]
    first = min(rivals + [name])
    return None if first == name else first


def _walk(root: Path, out_r: Path | None) -> Iterator[Item]:
    """Image files under ``root`` (hidden ones left out), depth first, one entry at a time."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(root, rel_dir)
        try:
            it = os.scandir(folder)
        except OSError as exc:
            yield Item("problem", message=f"cannot read folder {folder}: {exc.strerror or exc}")
            continue
        with it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                rel = os.path.join(rel_dir, entry.name)
                if entry.is_dir(follow_symlinks=True):
                    if out_r is None or not is_inside(Path(entry.path).resolve(), out_r):
                        stack.append(rel)
                    continue
                if not entry.is_file(follow_symlinks=True):
                    continue
                if not is_image_name(Path(entry.name)):
                    yield Item("skipped", entry.path, message=not_image_reason(Path(entry.name)))
                    continue
                winner = _sibling_winner(folder, entry.name)
                if winner is not None:
                    yield Item("problem", message=f"{entry.path}: skipped, its output would overwrite that of "
                                                  f"{os.path.join(folder, winner)} (both are "
                                                  f"{os.path.splitext(rel)[0]}.*)")
                    continue
                yield Item("image", entry.path, rel)


def _read_list(path: Path) -> Iterator[Item]:
    base = path.parent
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            p = Path(text).expanduser()
            src = p if p.is_absolute() else base / p
            if not src.is_file():
                yield Item("problem", message=f"{path} line {n}: no such file: {text}")
                continue
            rel = p if not p.is_absolute() and ".." not in p.parts else Path(p.name)
            yield Item("image", str(src), str(rel))


def check_folders_apart(inputs: Sequence[str]) -> None:
    """Refuse an input folder inside another (it would be walked twice); call before ``iter_inputs``."""
    folders = [Path(raw).expanduser().resolve() for raw in inputs if Path(raw).expanduser().is_dir()]
    for a in folders:
        for b in folders:
            if a != b and is_inside(a, b):
                raise DfosdError(f"input folder {a} is inside input folder {b}: its images would be upscaled twice",
                                 hint="pass only the outer folder")


def iter_inputs(inputs: Sequence[str], out_dir: str | Path) -> Iterator[Item]:
    """Expand INPUT arguments into items, streaming (see the module docstring)."""
    out_r = Path(out_dir).expanduser().resolve()
    claimed: dict[str, str] = {}  # output name without suffix -> the file that claimed it (files, lists, globs)

    def claim(item: Item) -> Item:
        stem = os.path.splitext(item.rel)[0]
        if stem not in claimed:  # the first to claim this output name
            claimed[stem] = item.src
            return item
        first = claimed[stem]
        if os.path.realpath(first) == os.path.realpath(item.src):
            return Item("skipped", item.src, message=f"listed twice (first as {first})")
        return Item("problem", message=f"{item.src}: skipped, its output would overwrite that of {first} "
                                       f"(both are {stem}.*)")

    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            images = 0
            for item in _walk(path, out_r):
                images += item.kind == "image"
                yield item
            if not images:
                yield Item("problem", message=f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder: {raw}")
        elif is_list_file(path):
            for item in _read_list(path):
                yield claim(item) if item.kind == "image" else item
        elif path.is_file():
            yield claim(Item("image", str(path), path.name))
        elif glob.has_magic(raw):
            found = False
            for p in glob.iglob(os.path.expanduser(raw), recursive=True):
                p = Path(p)
                if not p.is_file():
                    continue
                found = True
                if not is_image_name(p):
                    yield Item("skipped", str(p), message=not_image_reason(p))
                elif is_inside(p.resolve(), out_r):
                    yield Item("skipped", str(p), message=f"inside --out {out_dir}: outputs are never read as inputs")
                else:
                    yield claim(Item("image", str(p), p.name))
            if not found:
                yield Item("problem", message=f"no image files match: {raw}")
        else:
            yield Item("problem", message=f"no such file or folder: {raw}")
