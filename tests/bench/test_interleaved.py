"""Round-robin timing: every round runs each engine once, and ratios are taken per round."""

from __future__ import annotations

import time

import pytest


def test_rounds_visit_every_function_in_turn():
    from dfosd.bench.measure import time_interleaved

    calls = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    timings = time_interleaved({"a": make("a", 0.002), "b": make("b", 0.012)}, warmup=1, repeats=3,
                               sync=lambda: None)
    assert calls == ["a", "b"] * 4  # one warm-up round, three timed rounds, never two of one in a row
    assert {k: len(t.runs_ms) for k, t in timings.items()} == {"a": 3, "b": 3}
    assert all(t >= 2.0 for t in timings["a"].runs_ms) and all(t >= 12.0 for t in timings["b"].runs_ms)


def test_paired_ratio_cancels_a_slow_round():
    from dfosd.bench.measure import Timing, paired_ratio

    # round 2 ran with the machine twice as loaded: both engines took twice as long
    eager = Timing((100.0, 200.0, 100.0))
    engine = Timing((50.0, 100.0, 50.0))
    assert paired_ratio(eager, engine) == pytest.approx(2.0)
    # a ratio of medians would agree here; with the load spike hitting different rounds it would not
    assert paired_ratio(Timing((100.0, 300.0, 110.0)), Timing((50.0, 150.0, 55.0))) == pytest.approx(2.0)
