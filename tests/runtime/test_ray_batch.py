"""dfosd-trt-run --ray on a real two-node Ray cluster on loopback (ray.cluster_utils.Cluster, 1 CPU per node).

One cluster for the whole module (Ray's start-up is slow). With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
every Ray process binds 127.0.0.1. Checked: outputs byte-identical to the local run, a bad image
in the middle failing alone, an actor process killed mid-run (Ray restarts it and re-runs its
image), the driver killed mid-run and the same command resuming, a second run into the same
--out refused, the missing-extra message; and the streaming listing without a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dfosd.runtime.cli import main

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only

N_GOOD = 14
BAD = "g_bad.png"  # sorts into the middle of the images
OBJECT_STORE = 100 * 2**20


def _images(folder: Path) -> Path:
    rng = np.random.default_rng(19)
    (folder / "sub").mkdir(parents=True)
    for i in range(N_GOOD):
        h, w = 40 + 4 * (i % 5), 48 + 8 * (i % 3)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / ("sub" if i % 4 == 0 else "") / f"{chr(97 + i)}_{i}.png")
    (folder / BAD).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("ray_in") / "in")


@pytest.fixture(scope="module")
def local_out(tiny_export_fp32, photos, tmp_path_factory):
    """The local run's outputs: what every Ray run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ray_local") / "out"
    r = CliRunner().invoke(main, [str(photos), "--engines", str(tiny_export_fp32), "--out", str(out),
                                  "--backend", "onnxruntime", "--no-progress"])
    assert r.exit_code == 1 and BAD in r.output, r.output
    return out


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason="needs Ray: pip install 'dfosd[ray]'")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE,
                                                      "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    assert c.address.startswith("127.0.0.1:")
    yield c
    c.shutdown()


def _args(photos, export, out, cluster, *extra):
    return [str(photos), "--engines", str(export), "--out", str(out), "--backend", "onnxruntime",
            "--no-progress", *extra, "--ray", cluster.address, "--ray-actors", "2"]


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.png") if not p.name.startswith(".")
            and ".dfosd-done" not in p.parts}


def _check_complete(out: Path, local_out: Path, report: dict) -> None:
    """Every image once in the report, every output present and equal to the local run's."""
    inputs = [r["input"] for r in report["images"]]
    assert len(inputs) == len(set(inputs)) == N_GOOD + 1, inputs
    failed = [r for r in report["images"] if r["status"] == "failed"]
    assert len(failed) == 1 and BAD in failed[0]["error"]
    assert _outputs(out) == _outputs(local_out) and len(_outputs(out)) == N_GOOD


def _spawn(args, log: Path) -> subprocess.Popen:
    code = "import sys; from dfosd.runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "DFOSD_THREADS": "1"})


def _wait_for(pred, proc, timeout=120.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        assert proc.poll() is None, f"the run ended before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _done(out: Path) -> int:
    return len(list((out / ".dfosd-done").rglob("*.json"))) if (out / ".dfosd-done").is_dir() else 0


def _report(out: Path) -> dict:
    return json.loads((out / "dfosd-report.json").read_text())


def test_outputs_equal_the_local_run_and_a_bad_image_fails_alone(cluster, tiny_export_fp32, photos, local_out,
                                                                 tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, _args(photos, tiny_export_fp32, out, cluster))
    assert r.exit_code == 1, r.output  # the bad image
    assert f"{N_GOOD} upscaled, 0 skipped, 1 failed" in r.output and "images/s" in r.output
    report = _report(out)
    _check_complete(out, local_out, report)
    assert report["state"] == "complete" and report["ray"]["nodes"] == 2 and report["images_per_second"] > 0
    assert len({r["worker"] for r in report["images"] if r["status"] == "ok"}) == 2  # both actors worked
    # the same command again: every image is complete and current, nothing is upscaled again
    r = CliRunner().invoke(main, _args(photos, tiny_export_fp32, out, cluster))
    assert f"0 upscaled, {N_GOOD} skipped, 1 failed" in r.output, r.output


def test_a_worker_no_node_can_hold_is_refused_at_once(cluster, tiny_export_fp32, photos, tmp_path):
    t0 = time.monotonic()
    r = CliRunner().invoke(main, _args(photos, tiny_export_fp32, tmp_path / "out", cluster,
                                       "--ray-cpus-per-actor", "2"))
    assert r.exit_code == 1 and "asks for 2 CPU(s) and the largest node has 1" in r.output, r.output
    assert "Traceback" not in r.output and time.monotonic() - t0 < 60  # not Ray's endless pending actor


def test_a_killed_actor_is_restarted_and_nothing_is_lost(cluster, tiny_export_fp32, photos, local_out, tmp_path):
    out = tmp_path / "out"
    proc = _spawn(_args(photos, tiny_export_fp32, out, cluster), tmp_path / "log")
    try:
        _wait_for(lambda: _done(out) >= 1, proc, what="the first image")
        victim = _report(out)["ray"]["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)  # the actor's process, mid-run
        assert proc.wait(timeout=180) == 1, (tmp_path / "log").read_text()
    finally:
        proc.kill()
    assert _done(out) == N_GOOD, (tmp_path / "log").read_text()
    report = _report(out)
    _check_complete(out, local_out, report)
    assert report["state"] == "complete"
    started = {str(w["pid"]) for w in report["ray"]["workers"]}
    assert {r["worker"] for r in report["images"] if "worker" in r} - started  # Ray's restart did images too


def test_a_killed_driver_resumes_with_the_same_command(cluster, tiny_export_fp32, photos, local_out, tmp_path):
    out = tmp_path / "out"
    args = _args(photos, tiny_export_fp32, out, cluster)
    for sig, more in ((signal.SIGTERM, 2), (signal.SIGKILL, 2)):
        before = _done(out)  # this run's own progress: the earlier run may have done several already
        proc = _spawn(args, tmp_path / "log")
        try:
            _wait_for(lambda: _done(out) >= before + more, proc, what=f"{more} more images")
            proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
        if sig == signal.SIGTERM:  # stopped: the report says so, and what was in flight
            assert code == 128 + signal.SIGTERM, (tmp_path / "log").read_text()
            report = _report(out)
            assert report["state"] == "interrupted" and report["summary"]["interrupted"] >= 1
    first = _done(out)
    assert first < N_GOOD and _report(out)["state"] == "running"  # killed: the report could not say more
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    report = _report(out)
    _check_complete(out, local_out, report)
    skipped = [r for r in report["images"] if r["status"] == "skipped"]
    assert len(skipped) >= first and all("done by an earlier run" in r["reason"] for r in skipped)
    assert report["summary"]["ok"] + len(skipped) == N_GOOD


def test_refusals_before_any_work(tiny_export_fp32, photos, tmp_path):
    from dfosd.runtime.batch import report_lock

    out = tmp_path / "out"
    out.mkdir()
    with report_lock(out / "dfosd-report.json"):  # a live run holds this --out
        r = CliRunner().invoke(main, [str(photos), "--engines", str(tiny_export_fp32), "--out", str(out), "--ray"])
    assert r.exit_code == 1 and "another dfosd-trt-run" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [str(photos), "--engines", str(tiny_export_fp32), "--ray", str(photos)])
    assert r.exit_code == 1 and "put INPUTS before --ray" in r.output, r.output
    r = CliRunner().invoke(main, [str(photos), "--engines", str(tiny_export_fp32), "--out", str(photos / "o"), "--ray"])
    assert r.exit_code == 1 and "is inside the input folder" in r.output, r.output
    r = CliRunner().invoke(main, [str(photos), str(photos / "sub"), "--engines", str(tiny_export_fp32), "--out",
                                  str(tmp_path / "o2"), "--ray"])
    assert r.exit_code == 1 and "upscaled twice" in r.output and not (tmp_path / "o2").exists(), r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, [str(tmp_path / "empty"), str(tmp_path / "nothing.png"), "--engines",
                                  str(tiny_export_fp32), "--out", str(tmp_path / "o3"), "--ray"])
    assert r.exit_code == 1 and "no input images found" in r.output and "nothing.png" in r.output, r.output
    r = CliRunner().invoke(main, [str(photos), "--engines", str(tiny_export_fp32), "--out", str(tmp_path / "o4"),
                                  "--backend", "bogus", "--ray"])
    assert r.exit_code == 1 and "bogus" in r.output and not (tmp_path / "o4").exists(), r.output


def test_without_ray_the_message_says_how_to_install_it(tiny_export_fp32, photos, tmp_path):
    code = ("import sys, importlib.abc\n"
            "class NoRay(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'ray' or name.startswith('ray.'):\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, NoRay())\n"
            "from dfosd.runtime.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(photos), "--engines", str(tiny_export_fp32), "--out",
                        str(tmp_path / "out"), "--ray"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "pip install 'dfosd[ray]'" in r.stderr + r.stdout, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_placement_problem_names_what_no_node_has():
    from dfosd.runtime.ray_batch import placement_problem

    nodes = [{"Alive": True, "Resources": {"CPU": 4.0}}, {"Alive": False, "Resources": {"CPU": 16.0, "GPU": 1.0}}]
    assert placement_problem(nodes, 4, gpu=False) is None
    assert "largest node has 4" in placement_problem(nodes, 8, gpu=False)  # the dead node does not count
    assert "no node of the cluster has one" in placement_problem(nodes, 1, gpu=True)
    assert placement_problem([], 1, gpu=False)
