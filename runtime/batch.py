"""The batch side of ``dfosd-trt-run``: one image at a time, a report that always tells the truth.

* ``process_image``: load, upscale, write one file. Every failure of that image (bad
  file, too many pixels, out of memory, a NaN from the engine, a full disk) becomes its
  record with status "failed"; the batch goes on.
* ``RunReport``: the JSON report. It is written when the run starts (so a report of an
  earlier run with other options never survives this one), rewritten every few seconds
  while it runs, and at the end marked complete, interrupted (Ctrl-C, SIGTERM) or failed.
* ``report_lock``: two runs writing one report at once would overwrite each other's; the
  second one is refused before any work.
* ``stop_on_signals``: SIGTERM unwinds like Ctrl-C, so temp files are removed and the
  report is written (SIGKILL cannot be caught: a run killed that way leaves "running").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dfosd.core.errors import DfosdError

log = logging.getLogger(__name__)

REPORT_EVERY_S = 2.0  # rewrite the running report at most this often


class Interrupted(BaseException):
    """A stop signal arrived (SIGTERM); unwinds like KeyboardInterrupt, which is not an Exception."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGTERM (and SIGHUP) into ``Interrupted`` while the block runs (main thread only)."""
    def handler(signum, frame):
        raise Interrupted(signum)

    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    saved = {}
    try:
        for s in wanted:
            saved[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for s, old in saved.items():
            signal.signal(s, old)


def exit_code_for(exc: BaseException) -> int:
    """The shell's convention for a run stopped by a signal: 128 + its number."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


def check_writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` and prove a file can be written there, before any compute."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DfosdError(f"{what} {folder} exists and is not a folder", hint=f"pass another {what}") from None
    except OSError as exc:
        raise DfosdError(f"cannot create {what} {folder}: {exc.strerror or exc}", hint=f"pass another {what}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".dfosd-write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DfosdError(f"cannot write into {what} {folder}: {exc.strerror or exc}",
                         hint=f"fix its permissions or pass another {what}") from None


# Keys every report RunReport.write writes: an existing file without them is not a dfosd report.
_REPORT_KEYS = ("state", "summary", "images")


def check_report_path(path: Path) -> None:
    """Refuse a ``--report`` that would overwrite a file this tool did not write: only a
    missing file or an earlier dfosd report (one a previous run wrote) may be replaced."""
    import json

    if path.is_dir():
        raise DfosdError(f"--report {path} is a folder", hint="pass a file path, e.g. --report run.json")
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not (isinstance(data, dict) and all(k in data for k in _REPORT_KEYS)):
        raise DfosdError(f"--report {path} exists and is not a dfosd report: it would be overwritten",
                         hint="pass a new file name for --report (or remove that file yourself)")


@contextlib.contextmanager
def report_lock(report_path: Path):
    """Hold an exclusive lock on ``report_path`` for the run; refuse if another live run holds it.

    The lock is an ``flock`` on a small file in the system temp folder named after the
    report's absolute path (nothing is added to the user's folders); the kernel drops it
    when the process ends, however it ends, so a killed run never blocks the next one.
    Where file locks are unavailable the run goes on unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    key = hashlib.sha256(str(report_path.resolve()).encode()).hexdigest()[:24]
    lock_dir = Path(tempfile.gettempdir()) / "dfosd-run-locks"
    try:
        lock_dir.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(lock_dir, 0o1777)  # shared by every user, like /tmp itself
        fd = os.open(lock_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        log.warning("running without a report lock (%s)", exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise DfosdError(f"another dfosd-trt-run (pid {holder}) is writing the report {report_path}; "
                             "two runs into one report would overwrite each other's",
                             hint="wait for it, or give this run its own --report FILE (or another --out)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class RunReport:
    """The run's JSON report (see the module docstring); ``header`` holds the options."""

    path: Path
    header: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # inputs not started yet
    started: float = field(default_factory=time.time)
    _t0: float = field(default_factory=time.perf_counter)
    _last_write: float = 0.0
    _current: str | None = None  # the input being processed

    def counts(self) -> dict[str, int]:
        out = {s: sum(r["status"] == s for r in self.records) for s in ("ok", "skipped", "failed", "interrupted")}
        out["not_started"] = len(self.pending)
        return out

    def interrupt(self) -> None:
        """The input being processed when the run was stopped: no output was written for it."""
        if self.pending and self.pending[0] == self._current:
            self.records.append({"input": self.pending.pop(0), "status": "interrupted",
                                 "error": "stopped while being upscaled; no output written"})

    def write(self, state: str, **extra: Any) -> None:
        from dfosd.core.manifest import write_json_atomic

        records = self.records + [{"input": p, "status": "not started"} for p in self.pending]
        write_json_atomic(self.path, {
            **self.header, "state": state, "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "total_seconds": round(time.perf_counter() - self._t0, 3), "summary": self.counts(),
            "images": records, **extra,
        })
        self._last_write = time.perf_counter()

    def start(self, src: str) -> None:
        self._current = src

    def add(self, record: dict[str, Any]) -> None:
        """Record one finished input; rewrite the running report if the last write is old enough."""
        self.records.append(record)
        if self.pending and self.pending[0] == record["input"]:
            self.pending.pop(0)
        if time.perf_counter() - self._last_write >= REPORT_EVERY_S:
            self.write("running")


def check_tile(tile: int | None, engines_tile: int) -> None:
    if tile is not None and tile != engines_tile:
        raise DfosdError(f"--tile {tile} differs from the engines' tile {engines_tile} (engines have static shapes)",
                         hint=f"omit --tile, or re-export with dfosd-export --tile {tile}")


def local_upscaler(export_dir, backend, batch: int | None, tile: int | None, overlap: int | None,
                   say: Callable[[str], None], *, seed: int | None = None, noise=None):
    """(runner, tiling, upscale(rgb, sink, progress)) on engines loaded here: what ``process_image``
    takes. The local CLI and each ``--ray`` worker build it the same way, so images are the same.
    A ResShift-backbone export (runtime/resshift_run.py) takes its noise field from ``seed`` or
    ``noise`` (a float32 [1, 3, H, W] array); the SD families' one step draws none."""
    from dfosd.export.resshift_export import resshift_record
    from dfosd.runtime.step import OneStepRunner
    from dfosd.runtime.tiling import TilingConfig, upscale_tiled

    if resshift_record(export_dir) is not None:
        from dfosd.core.vocab import DEFAULT_NOISE_SEED
        from dfosd.runtime.resshift_run import resshift_upscaler

        seed = DEFAULT_NOISE_SEED if seed is None and noise is None else seed
        return resshift_upscaler(export_dir, backend, batch, tile, overlap, say, seed=seed, noise=noise)
    runner = OneStepRunner(export_dir, backend=backend, batch=batch, say=say)
    check_tile(tile, runner.tile)
    tcfg = TilingConfig(tile=runner.tile, overlap=runner.tile // 4 if overlap is None else overlap,
                        batch=runner.batch, scale=runner.scale)

    def upscale(rgb, sink, progress):
        return upscale_tiled(rgb, runner, tcfg, sink=sink, progress=progress)
    return runner, tcfg, upscale


def _failure(exc: BaseException) -> str:
    if isinstance(exc, DfosdError):
        return exc.message + (f" (fix: {exc.hint})" if exc.hint else "")
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc):
        return f"out of memory ({type(exc).__name__}: {exc}); lower --max-pixels to refuse such images up front"
    return f"{type(exc).__name__}: {exc}"


def process_image(src: Path, rel: Path, upscale: Callable, scale: int, opts: dict[str, Any], out_dir: Path,
                  tile_progress: Callable[[str], Callable[[int, int], None] | None] | None = None) -> dict[str, Any]:
    """Upscale one file and write it; returns its report record (raises nothing for a bad image).

    ``upscale(rgb, sink, progress)`` blends the output rows into ``sink`` as they are
    finished (no colour fix: the output never exists as a whole tensor, see
    ``OutputCanvas``), or returns the whole uint8 output when ``sink`` is None.
    """
    from dfosd.runtime.color_fix import apply_color_fix
    from dfosd.runtime.images import OutputCanvas, compose_output, load_image, save_image_atomic
    from dfosd.runtime.inputs import output_path_for

    dst = output_path_for(Path(rel), out_dir, opts["fmt"])
    rec = {"input": str(src), "output": str(dst)}
    if opts["skip_existing"] and dst.exists():
        return {**rec, "status": "skipped", "reason": "output exists (--skip-existing)"}
    t0 = time.perf_counter()
    img = None
    try:
        img = load_image(src, max_pixels=opts["max_pixels"])
        progress = tile_progress(src.name) if tile_progress is not None else None
        if opts["color_fix"] == "none":
            canvas = OutputCanvas(img, scale)
            upscale(img.rgb, canvas.write_rows, progress)
            image = canvas.finish()
        else:  # the colour fix needs the whole output: output-sized tensors (README, "Limits")
            sr = apply_color_fix(upscale(img.rgb, None, progress), img.rgb, opts["color_fix"], scale)
            image = compose_output(sr, img, scale)
        notes = list(img.notes)
        try:
            notes += save_image_atomic(image, dst, opts["fmt"], quality=opts["quality"]) or []
        except OSError as exc:
            return {**rec, "status": "failed", "error": f"could not write {dst}: {getattr(exc, 'message', exc)}"}
    except Exception as exc:  # noqa: BLE001 - this image fails alone, the batch goes on
        log.debug("%s failed", src, exc_info=True)
        message = _failure(exc)
        return {**rec, "status": "failed", "error": message if str(src) in message else f"{src}: {message}"}
    h, w = img.rgb.shape[1:]
    return {**rec, "status": "ok", "seconds": round(time.perf_counter() - t0, 4), "input_size": [w, h],
            "output_size": [w * scale, h * scale], "notes": notes}
