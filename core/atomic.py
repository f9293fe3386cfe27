"""Atomic file writes, the one home: a temporary file beside the target, then one rename.

Readers never see half a file (``os.replace`` is atomic on one file system); a failure,
Ctrl-C included, removes the temporary file and leaves the target as it was. The
temporary name is ``.<name>.<random>.tmp``: a dot-name that globs of the outputs skip and
that does not end in the target's suffix. The file gets the user's umask, like any file the
user's programs write (``tempfile.mkstemp`` alone makes 0600).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def umask_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    try:  # Linux >= 4.7 shows the umask without changing it (no race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_target(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write (by name, any library);
    on a clean exit it gets the umask mode and is renamed over ``path``, on any exception it is
    removed. ``fsync``: flush the data to disk before the rename (the rename must not outlive
    the data in a crash; costs a disk flush per file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, umask_file_mode())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes | str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
