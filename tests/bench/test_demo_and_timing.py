"""Honest timing (interleaved rounds, spread, a plain warning) and a demo that says
where it writes and stays out of git."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from dfosd.bench.measure import NOISY_SPREAD, Timing, ratio_range, spread, time_interleaved


def test_interleaved_rounds_rotate_and_time_every_candidate():
    order = []

    def candidate(name, seconds):
        def run():
            order.append(name)
            time.sleep(seconds)
        return run

    timings = time_interleaved({"a": candidate("a", 0.002), "b": candidate("b", 0.02), "c": candidate("c", 0.002)},
                               warmup=1, repeats=3)
    assert order == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up, then rotated rounds
    assert [len(t.runs_ms) for t in timings.values()] == [3, 3, 3]
    assert timings["b"].median_ms > timings["a"].median_ms and min(timings["b"].runs_ms) >= 20.0
    lo, mid, hi = ratio_range(timings["b"], timings["a"])
    assert lo <= mid <= hi and mid > 1.0


def test_spread_and_the_noise_threshold():
    assert spread(Timing((100.0, 105.0, 110.0))) == pytest.approx(0.1 / 1.05)
    assert spread(Timing((100.0, 100.0, 130.0))) > NOISY_SPREAD == 0.20
    assert ratio_range(Timing((100.0, 200.0)), Timing((50.0, 50.0))) == (2.0, 3.0, 4.0)


def test_table_shows_spread_range_and_a_plain_warning():
    from dfosd.bench.run import markdown_table

    rows = [{"name": "eager PyTorch fp32", "device": "cpu", "median_ms": 100.0, "p90_ms": 130.0, "images_per_s": 10.0,
             "psnr_db": None, "max_abs_diff": None, "runs_ms": [90.0, 100.0, 130.0], "spread_pct": 40.0,
             "speedup_range": [1.0, 1.0, 1.0]},
            {"name": "onnxruntime fp32", "device": "cpu", "median_ms": 50.0, "p90_ms": 52.0, "images_per_s": 20.0,
             "psnr_db": 80.0, "max_abs_diff": 1, "runs_ms": [49.0, 50.0, 52.0], "spread_pct": 6.0,
             "speedup_range": [1.8, 2.0, 2.6]}]
    table = markdown_table({"rows": rows, "warnings": ["eager PyTorch fp32: its 3 runs disagree by 40.0 %"]})
    assert "| 90.0-130.0 (40.0 %) |" in table and "| 2.00x (1.80-2.60) |" in table
    assert "**Warning:** eager PyTorch fp32: its 3 runs disagree by 40.0 %" in table


def test_the_spread_is_rounded_one_way_in_every_line():
    """A spread of 12.52 % was "12 %" in the table (stored as 12.5, then rounded half to even)
    and "13 %" in the warning (rounded from the raw value): one stored value, one format now."""
    from dfosd.bench.run import spread_text

    stored = round(100 * spread(Timing((100.0, 100.0, 112.52))), 1)
    assert stored == 12.5 and spread_text(stored) == "12.5 %"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_demo_says_where_it_writes_and_stays_out_of_git(tmp_path, monkeypatch):
    """The pipeline steps (each a subprocess the demo prints and runs) are recorded instead of run here;
    the checkpoint, the photos and the messages are real."""
    from click.testing import CliRunner

    from dfosd.bench import demo

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    ran = []
    monkeypatch.setattr(demo, "_run", lambda args: ran.append(args))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(demo.main, ["--work", "dfosd-demo"])
    assert r.exit_code == 0, r.output
    work = (tmp_path / "dfosd-demo").resolve()
    lines = r.output.strip().splitlines()
    assert lines[0] == f"dfosd demo: writing everything under {work}"
    assert f"Look at {work / 'sr'}" in lines[-1] and str(work / "bench" / "bench.md") in lines[-1]
    assert [a[0] for a in ran] == ["dfosd-export", "dfosd-export", "dfosd-trt-run", "dfosd-bench"]
    assert "--repeats" in ran[-1] and (work / "lora.safetensors").is_file()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", status  # the demo folder is ignored wherever it is
    (work / ".gitignore").write_text("mine\n")
    assert CliRunner().invoke(demo.main, ["--work", "dfosd-demo"]).exit_code == 0
    assert (work / ".gitignore").read_text() == "mine\n"  # a .gitignore that is there is not replaced
