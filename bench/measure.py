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


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Round-robin: every round times each function once, so a change in the machine's load
    (other jobs on a shared machine) hits every engine alike; ratios are then taken per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            runs[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: Timing(tuple(r)) for name, r in runs.items()}


def paired_ratio(reference: Timing, other: Timing) -> float:
    """Median over rounds of reference/other: the speed-up with each round's load cancelled."""
    return statistics.median(a / b for a, b in zip(reference.runs_ms, other.runs_ms))
