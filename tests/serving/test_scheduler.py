"""Issue 12.10: fair tile scheduling across requests, and a request timeout, on the real engines
(tiny export, ONNX Runtime), in-process: the scheduler is stepped by the test."""

from __future__ import annotations

import pytest
import torch

TILE_BATCH = 2


@pytest.fixture(scope="module")
def service(tiny_export_fp32):
    from dfosd.runtime.step import OneStepRunner
    from dfosd.serving.upscale_service import ServiceLimits, UpscaleService

    runner = OneStepRunner(tiny_export_fp32, backend="onnxruntime", batch=TILE_BATCH, say=lambda m: None)
    return UpscaleService(runner, overlap=runner.tile // 4, limits=ServiceLimits(256 * 256))


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _local(service, img):
    from dfosd.runtime.tiling import upscale_tiled

    return upscale_tiled(img, service.runner, service.default_tiling)


def test_small_request_is_not_starved_behind_a_big_one(service):
    from dfosd.serving.scheduler import FairTileScheduler
    from dfosd.serving.upscale_service import UpscaleRequest

    sched = FairTileScheduler(service)
    big, small, other = _image(96, 120, 1), _image(16, 16, 2), _image(20, 40, 3)  # 4x5 = 20 tiles, 1, 2
    finished = {}

    def done(name):
        return lambda result: finished.setdefault(name, (steps, result))

    steps = 0
    sched.submit(UpscaleRequest(big.permute(1, 2, 0)[None]), done("big"))
    for _ in range(3):  # the big one runs alone for a while ...
        assert sched.step()
        steps += 1
    sched.submit(UpscaleRequest(small[None], layout="CHW"), done("small"))  # ... then two others arrive
    sched.submit(UpscaleRequest(other.permute(1, 2, 0)[None]), done("other"))
    while sched.step():
        steps += 1
    assert not sched.step() and sched.pending() == 0
    # one tile per request in turn: the 1-tile request is done in the first batch after it came,
    # the 2-tile one by the third (it shares batches with two others),
    # FIFO would have made both wait for the big one's 17 remaining tiles
    # (finished[...][0] is the index of the batch that completed it; batches 0-2 ran before they came)
    assert finished["small"][0] == 3 and finished["other"][0] <= 5 and finished["big"][0] == steps - 1
    assert steps == -(-(20 + 1 + 2) // TILE_BATCH)  # every batch but the last full: fairness wastes no slot
    torch.testing.assert_close(finished["small"][1][0], _local(service, small), rtol=0, atol=0)
    torch.testing.assert_close(finished["other"][1][0], _local(service, other).permute(1, 2, 0), rtol=0, atol=0)
    torch.testing.assert_close(finished["big"][1][0], _local(service, big).permute(1, 2, 0), rtol=0, atol=0)


def test_requests_time_out_with_a_clear_error_and_bad_ones_fail_at_once(service):
    from dfosd.serving.scheduler import FairTileScheduler, RequestTimeout
    from dfosd.serving.upscale_service import RequestError, UpscaleRequest

    now = [0.0]
    sched = FairTileScheduler(service, timeout_s=10.0, clock=lambda: now[0])
    got = {}
    sched.submit(UpscaleRequest(_image(96, 96, 4).permute(1, 2, 0)[None]), lambda r: got.setdefault("slow", r))
    sched.submit(UpscaleRequest(torch.zeros(1, 8, 8, 3, dtype=torch.float32)), lambda r: got.setdefault("bad", r))
    assert isinstance(got["bad"], RequestError) and "uint8" in str(got["bad"])  # answered without waiting
    assert sched.step()
    now[0] = 11.0
    assert not sched.step()  # expired before the next batch: nothing left to run
    assert isinstance(got["slow"], RequestTimeout) and "not done within 10 s (2 of 16 tiles)" in str(got["slow"])


def test_thread_serves_and_close_fails_what_is_left(service):
    import threading

    from dfosd.serving.scheduler import FairTileScheduler
    from dfosd.serving.upscale_service import UpscaleRequest

    sched = FairTileScheduler(service).start()
    ready = threading.Event()
    out = {}
    img = _image(24, 24, 5)
    sched.submit(UpscaleRequest(img.permute(1, 2, 0)[None]), lambda r: (out.setdefault("r", r), ready.set()))
    assert ready.wait(60)
    torch.testing.assert_close(out["r"][0], _local(service, img).permute(1, 2, 0), rtol=0, atol=0)
    sched.close()
    late = {}
    sched.submit(UpscaleRequest(img[None], layout="CHW"), lambda r: late.setdefault("r", r))
    assert "shutting down" in str(late["r"])


def test_progress_of_a_request_with_an_id_is_reported_then_removed(service, tmp_path, monkeypatch):
    """The page's progress. A request with a valid KServe id gets <id>.json = {done, total} in the
    progress folder as its tiles run (what the front serves at /progress/<id>); answered, the file goes."""
    from dfosd.serving import progress
    from dfosd.serving.scheduler import FairTileScheduler
    from dfosd.serving.upscale_service import UpscaleRequest

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    sched = FairTileScheduler(service, progress_dir=tmp_path)
    got = {}
    sched.submit(UpscaleRequest(_image(40, 60, 7).permute(1, 2, 0)[None]), lambda r: got.setdefault("a", r), "page-1a")
    sched.submit(UpscaleRequest(_image(16, 16, 8)[None], layout="CHW"), lambda r: got.setdefault("b", r), "../bad")
    seen = []
    while sched.step():
        seen.append(progress.read_progress(tmp_path, "page-1a"))
    assert seen[0] == {"done": 1, "total": 6} and seen[-2] == {"done": 5, "total": 6}  # 2x3 tiles, then answered
    assert seen[-1] is None and "a" in got and "b" in got
    assert list(tmp_path.iterdir()) == []  # no file left, none for the invalid id
    assert progress.read_progress(tmp_path, "../etc") is None
