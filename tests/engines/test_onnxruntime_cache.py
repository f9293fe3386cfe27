"""ONNX Runtime's optimized graphs, saved on the first CPU load and loaded as they are after."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import TILE


@pytest.fixture(autouse=True)
def one_backend_thread(monkeypatch):
    """Tiny graphs on a shared 2-core machine: two spinning threads wait on each other under
    load (seconds per call instead of milliseconds), one thread does not."""
    monkeypatch.setenv("DFOSD_THREADS", "1")


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in (folder / "onnxruntime-optimized").glob("*.opt.onnx*")}


def test_optimized_graph_saved_once_reused_and_rebuilt_when_stale(tiny_export_fp32, photo_lr, tmp_path, caplog):
    from dfosd.engines.machine import machine_identity
    from dfosd.runtime.step import OneStepRunner

    export = shutil.copytree(tiny_export_fp32, tmp_path / "e")
    x = photo_lr[None, :, :TILE, :TILE].contiguous()
    first = OneStepRunner(export, backend="onnxruntime", batch=1, say=lambda m: None)(x)
    saved = _mtimes(export)
    assert {n for n in saved if n.endswith(".opt.onnx")} == {"encoder_b1.opt.onnx", "unet_b1.opt.onnx",
                                                           "decoder_b1.opt.onnx"}
    assert not list((export / "onnxruntime-optimized").glob(".*staging*"))
    manifest = json.loads((export / "manifest.json").read_text())
    records = json.loads((export / "runtime.json").read_text())
    rec = records["records"]["onnxruntime_optimized"]["identity"]
    assert rec["machine"] == machine_identity() and rec["build_key"] == manifest["build_key"]
    assert "runtime" not in manifest  # the export's own record is never rewritten by a run

    again = OneStepRunner(export, backend="onnxruntime", batch=1, say=lambda m: None)(x)
    assert _mtimes(export) == saved  # loaded, not optimized and written again
    assert np.array_equal(first.numpy(), again.numpy())

    rec["onnxruntime"] = "1.0.0"  # as if optimized by another ONNX Runtime
    (export / "runtime.json").write_text(json.dumps(records))
    with caplog.at_level("WARNING"):
        rebuilt = OneStepRunner(export, backend="onnxruntime", batch=1, say=lambda m: None)(x)
    assert "is stale (onnxruntime)" in caplog.text
    now = _mtimes(export)
    assert set(now) == set(saved) and all(now[n] != saved[n] for n in now)
    assert np.array_equal(first.numpy(), rebuilt.numpy())
