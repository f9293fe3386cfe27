"""The report of a ``--ray`` run, in memory bounded by design: records go to a spool file.

The same JSON as a local run's report (the header, ``state``, ``summary``, ``images`` with
one record per input) without holding the records: each finished record is appended to a
hidden spool file beside the report (``.<report>.images.jsonl``), and every write streams
the spool into a temporary file that is renamed over the report. A write costs time in
proportion to the records so far, so while running it happens at most every
``REPORT_EVERY_S`` seconds and never takes more than ~5 % of the run's time; the running
report always has the counts. The spool is removed when the run's final report is written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dfosd.core.atomic import atomic_target
from dfosd.runtime.batch import REPORT_EVERY_S

STATUSES = ("ok", "skipped", "failed", "interrupted")


class StreamingReport:
    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = Path(path)
        self.header = header
        self.spool_path = self.path.with_name(f".{self.path.name}.images.jsonl")
        self._spool = open(self.spool_path, "w", encoding="utf-8")
        self._counts = dict.fromkeys(STATUSES, 0)
        self.started = time.time()
        self._t0 = time.perf_counter()
        self._next_write = 0.0

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def add(self, record: dict[str, Any]) -> None:
        self._spool.write(json.dumps(record) + "\n")
        self._counts[record["status"]] = self._counts.get(record["status"], 0) + 1
        if time.perf_counter() >= self._next_write:
            self.write("running")

    def write(self, state: str, **extra: Any) -> None:
        t = time.perf_counter()
        self._spool.flush()
        head = {**self.header, "state": state, "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "total_seconds": round(self.seconds(), 3), "summary": self.counts(), **extra}
        with atomic_target(self.path) as tmp, open(tmp, "w", encoding="utf-8") as out, \
                open(self.spool_path, encoding="utf-8") as spool:
            out.write(json.dumps(head, indent=2, sort_keys=True)[:-2] + ',\n  "images": [')
            for n, line in enumerate(spool):
                out.write(("\n    " if n == 0 else ",\n    ") + line.rstrip("\n"))
            out.write("\n  ]\n}\n")
        took = time.perf_counter() - t
        self._next_write = time.perf_counter() + max(REPORT_EVERY_S, 20 * took)

    def close(self) -> None:
        """After the final write: the spool's records are in the report."""
        self._spool.close()
        self.spool_path.unlink(missing_ok=True)
