"""What a ``--ray`` run records per output, so that running the same command again resumes.

After an output is written (atomically), the worker writes ``OUT/.dfosd-done/<output>.json``:
the input's identity (absolute path, size, mtime), the export's build key, the options that
change the pixels (backend, tile, overlap, batch, colour fix, format, quality) and the
output's own size and mtime. A later run skips an image only when that record exists and all
of it still holds, so a changed input, export or option, or an output edited or removed since,
is upscaled again. The record is written after the output: a run killed between the two
redoes that one image (same bytes, written atomically again), never skips a missing one.

The folder is hidden: listings of ``--out`` (and a later run reading ``--out`` as an input
folder) leave it out. Nothing else in ``--out`` is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DONE_FOLDER = ".dfosd-done"


def done_record_path(out_dir: Path, dst: Path) -> Path:
    return Path(out_dir) / DONE_FOLDER / (str(Path(dst).relative_to(out_dir)) + ".json")


def _stat(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_done(out_dir: Path, src: Path, dst: Path, identity: dict[str, Any]) -> None:
    """Record that ``dst`` is the complete output of ``src`` under ``identity`` (export + options)."""
    from dfosd.core.atomic import write_json_atomic

    write_json_atomic(done_record_path(out_dir, dst), {
        "input": str(Path(src).resolve()), "input_file": _stat(src), "output_file": _stat(dst), **identity})


def is_done(out_dir: Path, src: Path, dst: Path, identity: dict[str, Any]) -> bool:
    """Whether ``dst`` holds the output of ``src``, as it is now, under ``identity`` (see the docstring)."""
    try:
        record = json.loads(done_record_path(out_dir, dst).read_text())
        return (isinstance(record, dict) and record.get("input") == str(Path(src).resolve())
                and record.get("input_file") == _stat(src) and record.get("output_file") == _stat(dst)
                and all(record.get(k) == v for k, v in identity.items()))
    except (OSError, ValueError):
        return False
