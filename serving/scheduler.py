"""Fair tile scheduling across requests: a small request is not starved behind a big one.

Triton hands a Python model's instance one dynamic batch at a time and, while ``execute``
runs, queues everything else. When ``execute`` upscaled its requests itself, a 16x16
request arriving during a maximal (1024x1024: 1849 tiles of 32 at overlap 8) one waited
for all of it (> 60 s observed on 2 CPU cores). Instead, ``execute`` hands its requests to
this scheduler and returns at once; each request is answered through its own response
sender when its last tile is blended (the Python backend allows that for non-decoupled
models: one final response per request, ``execute`` returning None).

One thread runs the runner (its static buffers serve one batch at a time). Each tile batch
is filled round-robin: one tile from each pending request in turn, starting one request
further on each batch. A request of k tiles that arrives while others run therefore needs
about k batches, whatever the others' size (with n requests pending, each gets about
batch/n slots per batch), and requests of one dynamic batch still share tile batches.

Every request has a deadline (``timeout_s`` after it arrived, default 600 s): one not done
by then fails with a clear error and its remaining tiles are dropped, so a client never
waits without end. Memory: the tiles and blend buffers of the pending requests, which the
server's ``--max-pixels`` and ``--max-batch`` bound per request.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from dfosd.serving.progress import ProgressFiles, progress_name
from dfosd.serving.upscale_service import RequestError, UpscaleRequest, UpscaleService

DEFAULT_TIMEOUT_S = 600.0

log = logging.getLogger(__name__)


class RequestTimeout(RequestError):
    """A request not finished within its deadline (the client gets the message)."""


@dataclass(eq=False)  # identity: `in` and remove() must not compare tensors
class _Pending:
    layout: str
    jobs: list                     # TiledImage per image of the request
    color_fix: str
    done: Callable[[object], None]  # called once with the output tensor or the exception
    deadline: float
    job_index: int = 0             # next tile to hand out: jobs[job_index], tile tile_index
    tile_index: int = 0
    outputs: list = field(default_factory=list)  # the finished TiledImages, in order
    name: str | None = None        # the request's id, when it may report progress (serving/progress.py)

    def tiles_done(self) -> tuple[int, int]:
        return sum(j.done for j in self.jobs), sum(len(j) for j in self.jobs)

    def has_tiles(self) -> bool:
        return self.job_index < len(self.jobs)

    def take(self):
        job, i = self.jobs[self.job_index], self.tile_index
        self.tile_index += 1
        if self.tile_index == len(job):
            self.job_index, self.tile_index = self.job_index + 1, 0
        return job, i


class FairTileScheduler:
    """Requests in, results out through callbacks; ``step`` runs one tile batch (the thread calls it)."""

    def __init__(self, service: UpscaleService, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic, progress_dir=None):
        self.service = service
        self.progress = ProgressFiles(progress_dir)
        self.timeout_s = timeout_s
        self.clock = clock
        self._pending: list[_Pending] = []
        self._start = 0  # round-robin position: which pending request gives the first tile of a batch
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- submitting (any thread)

    def submit(self, request: UpscaleRequest, done: Callable[[object], None], request_id=None) -> None:
        """Queue one request; ``done`` gets its output tensor, or the exception that failed it. With a
        ``request_id`` (the client's KServe id), its tile progress is written for the front to read."""
        try:
            layout, jobs, color_fix = self.service._prepare(request)
        except Exception as exc:  # noqa: BLE001 - a bad request is answered at once
            done(exc)
            return
        with self._cond:
            closing = self._closing
            if not closing:
                self._pending.append(_Pending(layout, jobs, color_fix, done, self.clock() + self.timeout_s,
                                              name=progress_name(request_id)))
                self._cond.notify()
        if closing:
            done(RequestError("the model is shutting down"))

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- running (the scheduler thread, or a test calling step directly)

    def _deliver(self, answers: list) -> None:
        """Call each (pending, result) pair's callback, outside the lock: a callback that sends a
        response may block or raise, and must neither hold up submit() nor stop the scheduler."""
        for p, result in answers:
            self.progress.finish(p.name)
            try:
                p.done(result)
            except Exception:  # noqa: BLE001 - one client's failed answer must not stop the others
                log.exception("dfosd: answering a request failed")

    def _expire(self) -> list:
        """Take the requests past their deadline out of the queue (lock held); their answers."""
        now = self.clock()
        answers = []
        for p in [p for p in self._pending if p.deadline <= now]:
            self._pending.remove(p)
            answers.append((p, RequestTimeout(f"the request was not done within {self.timeout_s:g} s "
                                              f"({sum(j.done for j in p.jobs)} of {sum(len(j) for j in p.jobs)} "
                                              "tiles)")))
        return answers

    def _fill_batch(self) -> list:
        """Up to runner.batch (pending, job, tile) picks, one per request in turn."""
        chunk = []
        order = self._pending[self._start:] + self._pending[:self._start]
        while len(chunk) < self.service.runner.batch:
            took = False
            for p in order:
                if p.has_tiles() and len(chunk) < self.service.runner.batch:
                    job, i = p.take()
                    chunk.append((p, job, i))
                    took = True
            if not took:
                break
        if self._pending:
            self._start = (self._start + 1) % len(self._pending)
        return chunk

    def step(self) -> bool:
        """Run one tile batch; False when there was nothing to do."""
        with self._cond:
            expired = self._expire()
            chunk = self._fill_batch()
        self._deliver(expired)
        if not chunk:
            return False
        try:
            out = self.service.run_tiles([(job, i) for _, job, i in chunk])
        except Exception as exc:  # noqa: BLE001 - fails the requests with tiles in this batch
            failed = []
            with self._cond:
                for p, _, _ in chunk:
                    if p in self._pending:  # once per request: removed at its first tile here
                        self._pending.remove(p)
                        failed.append((p, exc))
            self._deliver(failed)
            return True
        finished = []
        with self._cond:
            for k, (p, job, i) in enumerate(chunk):
                if p not in self._pending:  # timed out meanwhile
                    continue
                job.add(i, out[k:k + 1])
                if job.done == len(job):
                    p.outputs.append(job)
                    if len(p.outputs) == len(p.jobs):
                        self._pending.remove(p)
                        finished.append(p)
        for p in {id(p): p for p, _, _ in chunk if p.name is not None and p not in finished}.values():
            self.progress.update(p.name, *p.tiles_done())
        self._deliver([(p, self._result(p)) for p in finished])  # the colour fix runs outside the lock
        return True

    def _result(self, p: _Pending):
        """The request's output (its images finished and colour-fixed), or the exception that failed it."""
        try:
            return self.service.assemble(p.layout, [self.service.finish(job, p.color_fix) for job in p.outputs])
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            return exc

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait(timeout=1.0)
                if self._closing and not self._pending:
                    return
            self.step()

    def start(self) -> "FairTileScheduler":
        self._thread = threading.Thread(target=self._loop, name="dfosd-tiles", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish what is pending (up to ``timeout_s``), then fail the rest and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            left, self._pending = self._pending, []
        self._deliver([(p, RequestError("the model was unloaded before the request was done")) for p in left])
