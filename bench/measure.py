"""Timing helpers: warm-up, repeated runs, median and p90."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    runs_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def p90_ms(self) -> float:
        xs = sorted(self.runs_ms)
        # nearest-rank p90: with few runs it is the slowest but one, never an interpolation
        return xs[min(len(xs) - 1, max(0, int(round(0.9 * len(xs) + 0.5)) - 1))]


def time_runs(fn: Callable[[], object], *, warmup: int, repeats: int, sync: Callable[[], None] = lambda: None) -> Timing:
    for _ in range(warmup):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        runs.append((time.perf_counter() - t0) * 1000.0)
    return Timing(tuple(runs))
