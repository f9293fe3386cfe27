"""A real Triton server on loopback: dfosd-serve started as a subprocess, called over HTTP and gRPC.

The server is the tritonserver binary of PyPI's nvidia-pytriton with dfosd's Python-backend
model; requests go through tritonclient. Outputs are compared exactly with the in-process
runtime (OneStepRunner + upscale_tiled on the same export and backend). Skipped, with the
reason, where nvidia-pytriton or tritonclient is missing.

Time on 2 CPU cores: ~20 s server start-up (the stub imports torch and loads the sessions),
10 s of 8 concurrent clients, ~15 s for the failing start; the export fixture is shared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import (MAX_BATCH, MAX_PIXELS, TILE_BATCH, ServeProcess, _cmdline, alive, descendants,
                           grpc_infer, http_infer, image, status)

HAVE_SERVER = importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None
pytestmark = pytest.mark.skipif(not HAVE_SERVER, reason="needs tritonserver (PyPI nvidia-pytriton) and tritonclient: "
                                "pip install --no-deps nvidia-pytriton==0.7.0 && pip install 'tritonclient[http,grpc]'")

CONCURRENT_SECONDS = 10.0


# ---------------------------------------------------------------- tests


def test_http_hwc_matches_in_process_runtime(server, local):
    img = image(45, 70, 0)  # 2x3 tiles of 32 with overlap 8: blending across tile batches
    out = http_infer(server.http_url, img.permute(1, 2, 0).numpy()[None])
    assert out.shape == (1, 180, 280, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], local(img).permute(1, 2, 0).numpy())
    # two same-size images in one request, and a request-level overlap
    pair = [image(33, 40, 1), image(33, 40, 2)]
    out = http_infer(server.http_url, np.stack([p.permute(1, 2, 0).numpy() for p in pair]), {"overlap": 4})
    for got, src in zip(out, pair):
        np.testing.assert_array_equal(got, local(src, overlap=4).permute(1, 2, 0).numpy())


def test_every_colour_fix_served_equals_dfosd_trt_run(server, tmp_path):
    """The request's colour fix (and the default: the family's, none for this DFOSD export)
    gives the bytes dfosd-trt-run writes locally with the same --color-fix, over HTTP and gRPC."""
    from click.testing import CliRunner
    from PIL import Image

    from dfosd.runtime.cli import main as run_main

    img = image(27, 41, 60)  # 2x2 tiles: the fix sees the blended image, not tiles
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "lr.png")
    for fix in ("none", "adain", "wavelet"):
        out = tmp_path / fix
        r = CliRunner().invoke(run_main, [str(tmp_path / "lr.png"), "--engines", str(server.engines), "--out", str(out),
                                          "--backend", "onnxruntime", "--batch", str(TILE_BATCH), "--color-fix", fix,
                                          "--no-progress"])
        assert r.exit_code == 0, r.output
        want = np.array(Image.open(out / "lr.png"))
        got = http_infer(server.http_url, img.permute(1, 2, 0).numpy()[None], {"color_fix": fix})[0]
        np.testing.assert_array_equal(got, want, err_msg=fix)
        got = grpc_infer(server.grpc_url, img.numpy()[None], {"layout": "CHW", "color_fix": fix})[0]
        np.testing.assert_array_equal(got.transpose(1, 2, 0), want, err_msg=fix)
        if fix == "none":  # the family's default
            np.testing.assert_array_equal(http_infer(server.http_url, img.permute(1, 2, 0).numpy()[None])[0], want)
        else:
            assert not np.array_equal(want, np.array(Image.open(tmp_path / "none" / "lr.png"))), fix
        # the same through dfosd-trt-run --server (the server fixes, the client does not fix again)
        r = CliRunner().invoke(run_main, [str(tmp_path / "lr.png"), "--server", server.http_url, "--out",
                                          str(out / "served"), "--color-fix", fix, "--no-progress"])
        assert r.exit_code == 0, r.output
        np.testing.assert_array_equal(np.array(Image.open(out / "served" / "lr.png")), want, err_msg=fix)
        assert json.loads((out / "served" / "dfosd-report.json").read_text())["color_fix"] == fix
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="color_fix='hsv': use one of none, adain, wavelet"):
        http_infer(server.http_url, img.permute(1, 2, 0).numpy()[None], {"color_fix": "hsv"})


def test_grpc_chw_matches_in_process_runtime(server, local):
    for img in (image(20, 13, 3), image(1, 40, 4), image(32, 32, 5)):  # smaller than a tile, a 1-pixel axis, one tile
        out = grpc_infer(server.grpc_url, img.numpy()[None], {"layout": "CHW"})
        np.testing.assert_array_equal(out[0], local(img).numpy())


def test_pooled_tiles_match_in_process_runtime_exactly(tiny_export_fp32, local):
    """No server: the model's pooling (tiles of several requests in one tile batch) on the real engines is exact."""
    import torch

    from dfosd.runtime.step import OneStepRunner
    from dfosd.serving.upscale_service import ServiceLimits, UpscaleRequest, UpscaleService

    runner = OneStepRunner(tiny_export_fp32, backend="onnxruntime", batch=TILE_BATCH, say=lambda m: None)
    calls = []

    def counting(tiles):
        calls.append(tiles.shape[0])
        return runner(tiles)

    counting.tile, counting.batch, counting.scale = runner.tile, runner.batch, runner.scale
    svc = UpscaleService(counting, overlap=runner.tile // 4, limits=ServiceLimits(MAX_PIXELS))
    imgs = [image(16, 16, 30), image(32, 32, 31), image(24, 40, 32), image(9, 9, 33), image(45, 70, 34)]
    requests = [UpscaleRequest(im.permute(1, 2, 0)[None]) for im in imgs[:3]] + [
        UpscaleRequest(imgs[3][None], layout="CHW"), UpscaleRequest(imgs[4].permute(1, 2, 0)[None], overlap=4)]
    results = svc.upscale_many(requests)
    assert calls == [2] * 5 + [1]  # 1 + 1 + 2 + 1 + 2x3 tiles, across requests (tiles change batch slots)
    for k, (img, got) in enumerate(zip(imgs, results)):
        want = local(img, overlap=4 if k == 4 else None)
        assert torch.equal(got[0], want if k == 3 else want.permute(1, 2, 0)), k


def test_health_ready_metadata_and_metrics(server):
    import tritonclient.grpc as tg

    assert status(f"{server.http_url}/v2/health/live") == 200
    assert status(f"{server.http_url}/v2/health/ready") == 200
    assert status(f"{server.http_url}/v2/models/dfosd/ready") == 200
    g = tg.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    assert g.is_server_ready() and g.is_model_ready("dfosd")
    g.close()
    meta = json.loads(urllib.request.urlopen(f"{server.http_url}/v2/models/dfosd", timeout=5).read())
    assert meta["inputs"][0]["name"] == "lr_image" and meta["inputs"][0]["datatype"] == "UINT8"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=5).read().decode()
    assert 'nv_inference_request_success{model="dfosd",version="1"}' in metrics


def test_malformed_requests_get_errors_and_server_keeps_serving(server, local):
    from tritonclient.utils import InferenceServerException

    url = server.http_url
    bad = [
        ("wrong dtype", np.zeros((1, 8, 8, 3), np.float32), {}, "FP32", "must be UINT8"),
        ("wrong rank", np.zeros((1, 8, 8), np.uint8), {}, "UINT8", "must be [n,H,W,3]"),
        ("rank 5", np.zeros((1, 8, 8, 3, 1), np.uint8), {}, "UINT8", "must be [n,H,W,3]"),
        ("empty", np.zeros((1, 0, 8, 3), np.uint8), {}, "UINT8", "is empty"),
        ("oversized", np.zeros((1, 97, 97, 3), np.uint8), {}, "UINT8", "limit of 9216"),
        ("too many in a batch", np.zeros((MAX_BATCH + 1, 4, 4, 3), np.uint8), {}, "UINT8", f"takes at most {MAX_BATCH}"),
        ("CHW sent as HWC", np.zeros((1, 3, 8, 8), np.uint8), {}, "UINT8", "send parameter layout=CHW"),
        ("unknown layout", np.zeros((1, 8, 8, 3), np.uint8), {"layout": "NHWC"}, "UINT8", "use HWC or CHW"),
        ("overlap too big", np.zeros((1, 8, 8, 3), np.uint8), {"overlap": 16}, "UINT8", "smaller than half"),
        ("overlap not a number", np.zeros((1, 8, 8, 3), np.uint8), {"overlap": "x"}, "UINT8", "not an integer"),
    ]
    for what, array, params, dtype, expect in bad:
        with pytest.raises(InferenceServerException) as exc:
            http_infer(url, array, params, dtype)
        assert expect in exc.value.message(), (what, exc.value.message())
        assert "400" in str(exc.value.status()), (what, exc.value.status())  # the client's fault, not a 500
    img = image(9, 9, 6)
    np.testing.assert_array_equal(grpc_infer(server.grpc_url, img.numpy()[None], {"layout": "CHW"})[0],
                                  local(img).numpy())
    assert status(f"{url}/v2/health/ready") == 200
    server.watch()


def _post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_bad_json_parameters_are_400_and_unparsable_bodies_do_not_hurt(server):
    """Issue 12.11: what the model decides is a 400. A body that is not JSON (or not an object) never
    reaches tritonserver: dfosd-serve's front answers 400 with the reason; the server goes on serving."""
    url = f"{server.http_url}/v2/models/dfosd/infer"
    pixels = list(range(12))

    def body(params):
        return json.dumps({"inputs": [{"name": "lr_image", "shape": [1, 2, 2, 3], "datatype": "UINT8",
                                       "data": pixels}], "parameters": params}).encode()

    for params, expect in (({"overlap": True}, "overlap=true is not an integer"),
                           ({"layout": 5}, "layout=5: use HWC or CHW"),
                           ({"overlap": 1.5}, "not an integer")):
        code, text = _post(url, body(params))
        assert code == 400 and expect in text, (params, code, text)
    for raw, expect in ((b"{", "not valid JSON"), (b"nul", "not valid JSON"), (b"[]", "must be a JSON object")):
        code, text = _post(url, raw)
        assert code == 400 and expect in text, (raw, code, text)
    code, text = _post(url, body({}))
    assert code == 200 and json.loads(text)["outputs"][0]["shape"] == [1, 8, 8, 3]
    assert status(f"{server.http_url}/v2/health/ready") == 200


def test_small_request_is_served_while_a_big_one_runs(server, local):
    """Issue 12.10 through the real server: a 1-tile request sent while maximal ones (this server's
    --max-pixels: 96x96, 16 tiles each) run comes back before them, exact, and they are exact too.
    Four big requests keep the server busy long enough that the small one surely overlaps them,
    also on a fast, idle machine (one alone can finish before the small one is sent)."""
    bigs, small = [image(96, 96, 50 + i) for i in range(4)], image(16, 16, 51)
    done = {}

    def send(name, img):
        t0 = time.monotonic()
        out = http_infer(server.http_url, img.permute(1, 2, 0).numpy()[None])
        done[name] = (time.monotonic(), time.monotonic() - t0, out)

    threads = [threading.Thread(target=send, args=(f"big{i}", b)) for i, b in enumerate(bigs)]
    for t in threads:
        t.start()
    time.sleep(0.1)  # the big ones are being tiled by now
    sent = time.monotonic()
    send("small", small)
    for t in threads:
        t.join(timeout=300)
    last_big = max(done[f"big{i}"][0] for i in range(len(bigs)))
    assert sent < last_big, "the big requests were all done before the small one was sent: no overlap to test"
    assert done["small"][0] < last_big, (done["small"][1], [done[f"big{i}"][1] for i in range(len(bigs))])
    np.testing.assert_array_equal(done["small"][2][0], local(small).permute(1, 2, 0).numpy())
    for i, big in enumerate(bigs):
        np.testing.assert_array_equal(done[f"big{i}"][2][0], local(big).permute(1, 2, 0).numpy())


def test_fairness_measurement_runs(server):
    """The command behind the README's small-request latency, on this server's maximal size (96x96)."""
    from dfosd.bench.serving_fairness import measure

    r = measure(f"127.0.0.1:{server.http}", big_side=96, delay_s=0.2)
    assert r["big_output_shape"] == [1, 384, 384, 3] and len(r["idle_small_s"]) == 5
    assert r["small_while_big_runs_s"] and r["small_while_big_max_s"] < r["big_s"]


def test_listens_on_loopback_only_by_default(server):
    """Issue 12.11: no --host given (ServeProcess passes none): every port is bound to 127.0.0.1."""
    from dfosd.serving.serve import ServeOptions

    assert ServeOptions(export_dir=Path(".")).host == "127.0.0.1"
    bound = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                addr, port = local.rsplit(":", 1)
                bound.setdefault(int(port, 16), set()).add(addr)
    server.watch()
    internal = [int(a.split("=", 1)[1]) for p in server.seen if "bin/tritonserver" in _cmdline(p)
                for a in _cmdline(p).split() if a.startswith("--http-port=")]
    assert internal and server.http not in internal  # tritonserver's own HTTP is behind the front
    for port in (server.http, server.grpc, server.metrics, *internal):
        # 127.0.0.1 (IPv4, or IPv4-mapped in tcp6 as gRPC binds it), nothing else
        assert bound.get(port) and bound[port] <= {"0100007F", "0000000000000000FFFF00000100007F"}, (port, bound)


def test_eight_concurrent_clients_no_failures_and_batching(server, local):
    """8 clients (4 HTTP, 4 gRPC) for a bounded time; every valid request must succeed and be exact."""
    import tritonclient.http as th

    images = [image(h, w, 10 + i) for i, (h, w) in enumerate([(16, 16), (32, 32), (24, 40), (40, 24)])]
    refs = [local(im).permute(1, 2, 0).numpy() for im in images]
    stop = time.monotonic() + CONCURRENT_SECONDS
    results, errors = [], []

    def client(k):
        n = 0
        while time.monotonic() < stop:
            i = (k + n) % len(images)
            array = images[i].permute(1, 2, 0).numpy()[None]
            try:
                out = (http_infer if k % 2 == 0 else grpc_infer)(
                    server.http_url if k % 2 == 0 else server.grpc_url, array)
                results.append(bool(np.array_equal(out[0], refs[i])))
            except Exception as exc:  # noqa: BLE001 - any failure counts
                errors.append(f"client {k}: {type(exc).__name__}: {exc}")
            n += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=CONCURRENT_SECONDS + 120)
    assert not errors, errors[:3]
    assert len(results) >= 8 and all(results), f"{results.count(False)} of {len(results)} outputs differ"
    client = th.InferenceServerClient(f"127.0.0.1:{server.http}")
    stats = client.get_inference_statistics("dfosd")
    client.close()
    batch_sizes = {int(b["batch_size"]) for b in stats["model_stats"][0]["batch_stats"]}
    assert max(batch_sizes) > 1, f"the dynamic batcher never batched requests: {batch_sizes}"
    server.watch()


def test_trt_run_with_server_reuses_the_cli(server, local, tmp_path):
    import torch
    from click.testing import CliRunner
    from PIL import Image

    from dfosd.runtime.cli import main

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    a, b = image(30, 50, 20), image(12, 12, 21)
    Image.fromarray(a.permute(1, 2, 0).numpy()).save(src / "a.png")
    Image.fromarray(b.permute(1, 2, 0).numpy()).convert("L").save(src / "sub" / "gray.png")
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(src / "big.png")  # over the server's pixel limit
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    for url in (server.http_url, server.grpc_url):
        r = CliRunner().invoke(main, [str(src), "--server", url, "--out", str(out), "--no-progress"])
        assert r.exit_code == 1, r.output  # two images fail, the rest go on
        report = json.loads((out / "dfosd-report.json").read_text())
        by_name = {Path(x["input"]).name: x for x in report["images"]}
        assert by_name["a.png"]["status"] == "ok" and by_name["gray.png"]["status"] == "ok"
        assert by_name["big.png"]["status"] == "failed" and "limit" in by_name["big.png"]["error"]
        assert by_name["broken.png"]["status"] == "failed"
        assert "Triton server" in report["backend"] and report["engines"] == url
        got = torch.from_numpy(np.array(Image.open(out / "a.png"))).permute(2, 0, 1)
        assert torch.equal(got, local(a))
        assert Image.open(out / "sub" / "gray.png").mode == "L"
        assert not list(out.rglob(".*"))  # no temporary files left
    r = CliRunner().invoke(main, [str(src / "a.png"), "--server", server.http_url, "--backend", "onnxruntime",
                                  "--out", str(tmp_path / "never")])
    assert r.exit_code == 1 and "do not apply with --server" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "never").exists()  # a run that never started leaves no output folder


def test_loadgen_measures_the_server(server, tmp_path):
    from dfosd.serving.loadgen import measure, percentile

    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0] * 9 + [10.0], 90) == 1.0
    results = measure(server.grpc_url, sizes=[(16, 16)], concurrency=[1, 2], seconds=1.0, warmup=0.2,
                      stats_url=server.http_url)
    assert [r.concurrency for r in results] == [1, 2]
    for r in results:
        assert r.completed >= 1 and r.failed == 0 and r.latency_ms_median <= r.latency_ms_p90 <= r.latency_ms_p99
        assert r.mean_batch_size is not None and r.mean_batch_size >= 1
    server.watch()


def test_zz_sigint_stops_everything(server):
    """Last of the tests on the session's server (conftest orders it after every other user of it): Ctrl-C on dfosd-serve stops tritonserver and its stubs; nothing is left."""
    server.watch()
    triton = [p for p in server.seen if "tritonserver" in _cmdline(p) or "backend_stub" in _cmdline(p)]
    assert triton, f"no tritonserver process was seen: {server.seen}"
    assert server.stop(signal.SIGINT) == 0, server.output()
    assert "stopped (tritonserver exit code 0)" in server.output()
    left = [p for p in server.seen | set(triton) if alive(p)]
    assert not left, f"left behind: {[(p, _cmdline(p)) for p in left]}"


def test_model_that_fails_to_start_is_reported_and_cleaned_up(tiny_export_fp32, tmp_path):
    """The model's initialize() raises (TensorRT asked for, not installed): tritonserver exits, we say why."""
    proc = ServeProcess(tiny_export_fp32, tmp_path / "server.log", "--backend", "tensorrt")
    try:
        deadline = time.monotonic() + 180
        while proc.proc.poll() is None and time.monotonic() < deadline:
            proc.watch()
            time.sleep(0.25)
        assert proc.proc.poll() == 1, proc.output()
        text = proc.output()
        assert "exited during start-up" in text and "tensorrt" in text.lower()
        assert "Traceback (most recent call last)" not in text.split("--- server log ---")[0]
        left = [p for p in proc.seen if alive(p)]
        assert not left, left
    finally:
        proc.stop()


def test_cli_refuses_a_folder_that_is_not_an_export(tmp_path):
    from click.testing import CliRunner

    from dfosd.serving.cli import main

    r = CliRunner().invoke(main, ["--engines", str(tmp_path)])
    assert r.exit_code == 1 and "no manifest.json" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- nothing lost, a server that tells the truth


def test_serve_never_replaces_a_users_folder(tiny_export_fp32, tmp_path):
    """--repo DIR: a folder dfosd did not write is refused before anything is written or deleted,
    also by dfosd triton-repo --force (which may only add to a non-empty folder)."""
    from click.testing import CliRunner

    from dfosd.serving.cli import main, triton_repo_main

    mine = tmp_path / "repo"
    (mine / "dfosd").mkdir(parents=True)
    (mine / "dfosd" / "notes.txt").write_text("my own model")
    r = CliRunner().invoke(main, ["--engines", str(tiny_export_fp32), "--repo", str(mine)])
    assert r.exit_code == 1 and "not empty and was not written by dfosd" in r.output, r.output
    r = CliRunner().invoke(triton_repo_main, ["--engines", str(tiny_export_fp32), "--out", str(mine),
                                              "--kinds", "python", "--force"])
    assert r.exit_code == 1 and "already holds dfosd, which dfosd did not write" in r.output, r.output
    assert (mine / "dfosd" / "notes.txt").read_text() == "my own model"
    assert sorted(p.name for p in mine.iterdir()) == ["dfosd"]
    # A repository dfosd wrote may be rewritten (its models replaced), and --force adds beside a user's files.
    ours = tmp_path / "ours"
    for _ in range(2):
        r = CliRunner().invoke(triton_repo_main, ["--engines", str(tiny_export_fp32), "--out", str(ours),
                                                  "--kinds", "python", "--link", "symlink"])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(triton_repo_main, ["--engines", str(tiny_export_fp32), "--out", str(mine),
                                              "--kinds", "python", "--name", "sr", "--force", "--link", "symlink"])
    assert r.exit_code == 0 and (mine / "sr" / "config.pbtxt").is_file(), r.output
    assert (mine / "dfosd" / "notes.txt").read_text() == "my own model"


def test_stale_work_folders_of_killed_servers_are_swept(tmp_path):
    """Only dfosd-serve-* folders with our owner file whose process is gone are removed."""
    from dfosd.serving.serve import OWNER_FILE, make_work_dir, process_start_time, sweep_stale_work_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = make_work_dir(tmp_path)  # this process: alive
    gone = make_work_dir(tmp_path)
    (gone / OWNER_FILE).write_text(json.dumps({"pid": dead.pid, "start_time": "1"}))
    reused = make_work_dir(tmp_path)  # a live pid with another start time: the pid was reused
    (reused / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start_time": "0"}))
    foreign = tmp_path / "dfosd-serve-foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("not ours")
    other_ns = make_work_dir(tmp_path)  # a dead pid, but of another pid namespace (a container)
    (other_ns / OWNER_FILE).write_text(json.dumps({"pid": dead.pid, "start_time": "1", "pid_ns": "pid:[1]"}))
    no_start = make_work_dir(tmp_path)  # no start time recorded (no /proc there): alive pid, kept
    (no_start / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start_time": None}))
    assert process_start_time(dead.pid) is None and process_start_time(os.getpid())
    assert sorted(sweep_stale_work_dirs(tmp_path)) == sorted([gone, reused])
    assert live.is_dir() and foreign.is_dir() and not gone.exists() and not reused.exists()
    assert other_ns.is_dir() and no_start.is_dir()


def test_kill_9_of_dfosd_serve_takes_the_server_and_the_next_start_cleans_up(tiny_export_fp32, tmp_path):
    """SIGKILL cannot be caught: tritonserver goes with its parent (parent-death signal) and the
    next dfosd-serve removes the work folder left behind."""
    from dfosd.serving.serve import sweep_stale_work_dirs

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = ServeProcess(tiny_export_fp32, tmp_path / "server.log", "--exit-timeout", "2", tmpdir=tmp)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(_cmdline(p).split(" ")[0].endswith("backend_stub")
                                                      for p in proc.seen):
            proc.watch()  # until the model is loading: its backend stub runs (the case that leaked it)
            time.sleep(0.1)
        assert any("bin/tritonserver" in _cmdline(p) for p in proc.seen), proc.output()
        work = list(tmp.glob("dfosd-serve-*"))
        assert len(work) == 1 and (work[0] / "models" / "dfosd" / "config.pbtxt").is_file()
        proc.proc.kill()
        proc.proc.wait(timeout=10)
        # SIGTERM reaches tritonserver at once; during start-up it finishes loading the model first and
        # then shuts down gracefully (--exit-timeout): seconds to a minute on a busy 2-core machine.
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and [p for p in proc.seen if alive(p)]:
            time.sleep(0.2)
        left = [(p, _cmdline(p)[:80]) for p in proc.seen if alive(p)]
        assert not left, f"outlived a killed dfosd-serve: {left}"
        assert work[0].is_dir()  # SIGKILL: nothing could clean up ...
        assert sweep_stale_work_dirs(tmp) == work and not work[0].exists()  # ... the next start does
    finally:
        proc.stop()


def test_dead_backend_stub_takes_readiness_down_restarts_then_exits_non_zero(tiny_export_fp32, tmp_path, local):
    """Issue 12.9: kill -9 of the Python-backend stub. tritonserver alone would stay "ready" while every
    request fails; dfosd-serve sees the stub die, stops the server (ready goes down), restarts it
    (--max-restarts 1) and serves exactly again; the second death exits 1 with the reason."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = ServeProcess(tiny_export_fp32, tmp_path / "server.log", "--max-restarts", "1", "--exit-timeout", "2",
                        tmpdir=tmp)
    ready = f"{proc.http_url}/v2/health/ready"
    img = image(20, 13, 40)
    try:
        for round_ in range(2):
            proc.wait_ready()
            np.testing.assert_array_equal(http_infer(proc.http_url, img.permute(1, 2, 0).numpy()[None])[0],
                                          local(img).permute(1, 2, 0).numpy())
            stubs = [p for p in descendants(proc.proc.pid) if _cmdline(p).split(" ")[0].endswith("backend_stub")]
            assert len(stubs) == 1, proc.output()
            os.kill(stubs[0], signal.SIGKILL)
            t0 = time.monotonic()
            while status(ready) == 200 and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            assert status(ready) != 200, "still ready 10 s after the stub died"
            assert time.monotonic() - t0 < 5, f"ready for {time.monotonic() - t0:.1f} s after the stub died"
        assert proc.proc.wait(timeout=120) == 1, proc.output()
        text = proc.output()
        assert "backend stub" in text and "died" in text and "restarting tritonserver (restart 1 of at most 1)" in text
        assert "not restarted (--max-restarts 1 used up)" in text
        assert not list(tmp.glob("dfosd-serve-*"))  # its work folders went with it
        assert not [p for p in proc.seen if alive(p)]
    finally:
        proc.stop()
