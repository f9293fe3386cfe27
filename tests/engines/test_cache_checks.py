"""What runs is what is checked: the runtime caches (ONNX Runtime's optimized graphs, OpenVINO's
blobs) are recorded with their hashes when written and checked at load, on real tiny exports.

Each case: weights shuffled in the optimized graph (same size, all finite) and a
truncated cache are detected and rebuilt without --force, told once; a moved export keeps its
caches; a cache folder that is a symlink to a user's folder is never written to nor emptied.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import TILE

needs_openvino = pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None,
                                    reason="openvino not installed (pip install 'dfosd[openvino]')")


@pytest.fixture(autouse=True)
def one_backend_thread(monkeypatch):
    monkeypatch.setenv("DFOSD_THREADS", "1")  # tiny graphs on a shared 2-core machine


@pytest.fixture(scope="module")
def lr_tile(photo_lr):
    return photo_lr[None, :, :TILE, :TILE].contiguous()


def _run(export, backend, x):
    from dfosd.runtime.step import OneStepRunner

    return OneStepRunner(export, backend=backend, batch=1, say=lambda m: None)(x).numpy()


def _mtimes(folder, pattern):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern)}


def _warnings(caplog, text):
    return [r for r in caplog.records if r.levelname == "WARNING" and text in r.getMessage()]


def test_shuffled_weights_in_the_optimized_graph_are_detected_and_rebuilt(tiny_export_fp32, lr_tile, tmp_path,
                                                                          caplog):
    export = shutil.copytree(tiny_export_fp32, tmp_path / "e", ignore=shutil.ignore_patterns("onnxruntime-*"))
    want = _run(export, "onnxruntime", lr_tile)
    data = export / "onnxruntime-optimized" / "unet_b1.opt.onnx.data"
    raw = np.fromfile(data, dtype=np.float32)
    np.random.default_rng(0).shuffle(raw)  # same size, every value finite: only a hash sees it
    raw.tofile(data)
    with caplog.at_level("WARNING"):
        got = _run(export, "onnxruntime", lr_tile)
    assert len(_warnings(caplog, "unet_b1.opt.onnx.data missing, truncated or changed")) == 1
    assert np.array_equal(got, want)  # the rebuilt graph ran, not the shuffled one
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert np.array_equal(_run(export, "onnxruntime", lr_tile), want)
    assert not _warnings(caplog, "rebuilding")  # rebuilt once, trusted after


@needs_openvino
@pytest.mark.parametrize("backend,folder,key,name", [
    ("onnxruntime", "onnxruntime-optimized", "onnxruntime_optimized", "decoder_b1.opt.onnx"),
    ("openvino", "openvino-cache", "openvino_cache", "unet_b1.blob")])
def test_a_truncated_cache_is_rebuilt_without_force(tiny_export_fp32, lr_tile, tmp_path, caplog, backend, folder,
                                                    key, name):
    export = shutil.copytree(tiny_export_fp32, tmp_path / "e", ignore=shutil.ignore_patterns(folder))
    want = _run(export, backend, lr_tile)
    path = export / folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        got = _run(export, backend, lr_tile)
    assert len(_warnings(caplog, f"{name} missing, truncated or changed since it was written: rebuilding")) == 1
    assert np.array_equal(got, want)
    records = json.loads((export / "runtime.json").read_text())["records"]
    entry = next(e for e in records[key]["entries"].values() if name in e)
    assert entry[name]["bytes"] == path.stat().st_size  # recorded anew, whole


@needs_openvino
def test_a_moved_export_keeps_its_caches(tiny_export_fp32, lr_tile, tmp_path):
    first = shutil.copytree(tiny_export_fp32, tmp_path / "first",
                            ignore=shutil.ignore_patterns("openvino-*", "onnxruntime-*"))
    want = {b: _run(first, b, lr_tile) for b in ("openvino", "onnxruntime")}
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    before = {f: _mtimes(moved / f, "*") for f in ("openvino-cache", "onnxruntime-optimized")}
    assert len(before["openvino-cache"]) == 3 and len(before["onnxruntime-optimized"]) >= 3
    for b in ("openvino", "onnxruntime"):
        assert np.array_equal(_run(moved, b, lr_tile), want[b])
    # imported and loaded where they are, not compiled again beside the old set
    assert {f: _mtimes(moved / f, "*") for f in before} == before


@needs_openvino
def test_a_symlinked_cache_folder_is_never_written_or_emptied(tiny_export_fp32, lr_tile, tmp_path, caplog):
    export = shutil.copytree(tiny_export_fp32, tmp_path / "e", ignore=shutil.ignore_patterns("openvino-*"))
    mine = tmp_path / "my-models"
    mine.mkdir()
    for n in ("unet_b1.blob", "keep.blob", "notes.txt"):
        (mine / n).write_bytes(b"the user's own " + n.encode())
    (export / "openvino-cache").symlink_to(mine, target_is_directory=True)
    # a record listing those names (an export copied from elsewhere, or edited) must not make them dfosd's
    records = {"kind": "dfosd-runtime-records", "records": {"openvino_cache": {
        "identity": {"openvino": "2020.1"}, "entries": {"unet_b1": {"unet_b1.blob": {"sha256": "0", "bytes": 1}}}}}}
    (export / "runtime.json").write_text(json.dumps(records))
    snapshot = {p.name: p.read_bytes() for p in mine.iterdir()}
    with caplog.at_level("WARNING"):
        out = _run(export, "openvino", lr_tile)
    assert out.std() > 1
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == snapshot
    assert len(_warnings(caplog, "is a symlink or not a folder")) == 1


@needs_openvino
def test_a_stale_cache_removes_only_what_its_record_lists(tiny_export_fp32, lr_tile, tmp_path):
    export = shutil.copytree(tiny_export_fp32, tmp_path / "e", ignore=shutil.ignore_patterns("openvino-*"))
    _run(export, "openvino", lr_tile)
    theirs = export / "openvino-cache" / "someone-elses.blob"
    theirs.write_bytes(b"not dfosd's")
    path = export / "runtime.json"
    records = json.loads(path.read_text())
    records["records"]["openvino_cache"]["identity"]["openvino"] = "2020.1"
    path.write_text(json.dumps(records))
    _run(export, "openvino", lr_tile)
    assert theirs.read_bytes() == b"not dfosd's"
    assert len(list((export / "openvino-cache").glob("*_b1.blob"))) == 3
