"""Measuring, shared by every bench: timed runs (median, p90), device sync, memory around a row."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Timing:
    runs_ms: tuple[float, ...]
    output: Any = field(default=None, compare=False, repr=False)  # what the last timed run returned

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def p90_ms(self) -> float:
        xs = sorted(self.runs_ms)
        # nearest-rank p90: with few runs it is the slowest but one, never an interpolation
        return xs[min(len(xs) - 1, max(0, int(round(0.9 * len(xs) + 0.5)) - 1))]


def device_sync() -> None:
    """Wait for queued GPU work, so a timer stops when the work is done (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_runs(fn: Callable[[], Any], *, warmup: int, repeats: int,
              sync: Callable[[], None] = device_sync) -> Timing:
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        runs.append((time.perf_counter() - t0) * 1000.0)
    return Timing(tuple(runs), out)


def free_memory() -> None:
    """Collect garbage and give cached GPU blocks back, so the next row starts from the same floor."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Memory:
    """torch's allocator peak and the device memory held, around one row (None without CUDA)."""

    def __init__(self, baseline_used: int):
        self.baseline_used = baseline_used

    @staticmethod
    def device_used() -> int:
        import torch

        if not torch.cuda.is_available():
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    def start(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, float | None]:
        import torch

        if not torch.cuda.is_available():
            return {"peak_alloc_mib": None, "device_mib": None}
        torch.cuda.synchronize()
        return {"peak_alloc_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "device_mib": round((self.device_used() - self.baseline_used) / 2**20, 1)}


# Runs that disagree by more than this (max - min over the median) are called out: on a shared or
# throttling machine, a ratio of two medians can swing from 3.9x to 1.06x between runs.
NOISY_SPREAD = 0.20


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                     sync: Callable[[], None] = device_sync) -> dict[str, Timing]:
    """Time several candidates in rounds, one run of each per round, the order rotated every round.

    A slow spell of the machine (another job, thermal throttling) then hits every candidate alike
    instead of whichever happened to run during it, so ratios of their medians mean something."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            runs[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: Timing(tuple(runs[name])) for name in names}


def spread(timing: Timing) -> float:
    """(max - min) / median of the runs: 0.2 means the runs disagree by 20 %."""
    return (max(timing.runs_ms) - min(timing.runs_ms)) / timing.median_ms


def ratio_range(reference: Timing, other: Timing) -> tuple[float, float, float]:
    """Per-round speed-ups reference/other (the runs of one round were taken back to back): min, median, max."""
    ratios = sorted(a / b for a, b in zip(reference.runs_ms, other.runs_ms))
    return ratios[0], statistics.median(ratios), ratios[-1]
