"""Tile progress of the requests in flight, from the model to dfosd-serve's front (and the page).

The model runs in tritonserver's backend stub, the front in dfosd-serve's own process: they share
a folder in dfosd-serve's work folder. For a request that carries a KServe ``id`` of 1-64 letters,
digits, ``-`` or ``_``, the scheduler writes ``<id>.json`` = {"done": tiles, "total": tiles} there
(atomically, at most every 0.25 s) and removes it when the request is answered; the front serves
it at ``GET /progress/<id>``. Nothing else is written there, and a request without such an id
costs nothing.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

VALID_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
EVERY_S = 0.25


def progress_name(request_id) -> str | None:
    return request_id if isinstance(request_id, str) and VALID_ID.fullmatch(request_id) else None


class ProgressFiles:
    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None
        self._last: dict[str, float] = {}

    def update(self, name: str | None, done: int, total: int, force: bool = False) -> None:
        if self.folder is None or name is None:
            return
        now = time.monotonic()
        if not force and now - self._last.get(name, 0.0) < EVERY_S:
            return
        self._last[name] = now
        tmp = self.folder / f".{name}.tmp"
        try:
            tmp.write_text(json.dumps({"done": done, "total": total}))
            os.replace(tmp, self.folder / f"{name}.json")
        except OSError:  # progress is a courtesy: never fails a request
            pass

    def finish(self, name: str | None) -> None:
        if self.folder is None or name is None:
            return
        self._last.pop(name, None)
        try:
            (self.folder / f"{name}.json").unlink(missing_ok=True)
        except OSError:
            pass


def read_progress(folder: Path | None, name: str) -> dict | None:
    """The front's side: the request's {"done", "total"}, or None (unknown, finished, or no folder)."""
    if folder is None or progress_name(name) is None:
        return None
    try:
        data = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
