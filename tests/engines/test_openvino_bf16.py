"""openvino-bf16: OpenVINO computing the export's graph in bf16, asked for by name.

Real OpenVINO compiles of the tiny exports; the runs that need a CPU with native bf16
(AMX or AVX512-BF16) skip with the reason elsewhere. Where it is missing, the error and
the absence of the hint are tested by making OpenVINO's capability list say so.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TILE, TINY

needs_openvino = pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None,
                                    reason="openvino not installed (pip install 'dfosd[openvino]')")


def _native_bf16() -> tuple[bool, str]:
    try:
        from dfosd.engines.openvino_backend import cpu_has_native_bf16

        return cpu_has_native_bf16()
    except Exception as exc:  # noqa: BLE001 - any reason is a skip reason
        return False, str(exc)


_NATIVE, _WHY = _native_bf16()
needs_native_bf16 = pytest.mark.skipif(not _NATIVE, reason=f"openvino-bf16 unusable here: {_WHY}")


@pytest.fixture(autouse=True)
def one_backend_thread(monkeypatch):
    monkeypatch.setenv("DFOSD_THREADS", "1")  # tiny graphs on a shared 2-core machine (see test_openvino.py)


@pytest.fixture(scope="module")
def lr_tile(photo_lr):
    return photo_lr[None, :, :TILE, :TILE].contiguous()


def _blobs(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.blob")}


@needs_openvino
@needs_native_bf16
def test_bf16_is_close_to_fp32_and_keeps_its_own_cache(tiny_export_fp32, lr_tile, tmp_path):
    from dfosd.core.metrics import psnr_uint8
    from dfosd.runtime.step import OneStepRunner

    folder = shutil.copytree(tiny_export_fp32, tmp_path / "e")
    exact = OneStepRunner(folder, backend="openvino", batch=1, say=print)(lr_tile).numpy()
    f32_blobs = _blobs(folder / "openvino-cache")
    bf16_runner = OneStepRunner(folder, backend="openvino-bf16", batch=1, say=print)
    assert "bf16" in bf16_runner.backend.describe()
    approx = bf16_runner(lr_tile).numpy()
    # bf16 keeps 8 mantissa bits: close (measured 45.8 dB on this tile), not the same pixels
    assert 35.0 < psnr_uint8(approx, exact) < float("inf")
    assert approx.std() > 1
    # the two variants cache side by side: neither evicts the other
    assert _blobs(folder / "openvino-cache") == f32_blobs
    assert len(_blobs(folder / "openvino-bf16-cache")) == 3
    runtime = json.loads((folder / "runtime.json").read_text())["records"]
    assert runtime["openvino_bf16_cache"]["identity"]["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert runtime["openvino_cache"]["identity"]["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    # per part: bf16 for the UNet only chains with the exact encoder and decoder
    mixed = OneStepRunner(folder, backend="encoder=openvino,unet=openvino-bf16,decoder=openvino", batch=1,
                          say=print)
    assert mixed.plan.mixed
    part = mixed(lr_tile).numpy()
    assert 35.0 < psnr_uint8(part, exact)
    # auto keeps the exact backends and says where the faster approximate one is
    said = []
    auto = OneStepRunner(folder, backend="auto", batch=1, say=said.append)
    assert set(auto.plan.names.values()) <= {"onnxruntime", "openvino"}
    assert any("--backend openvino-bf16" in s and "auto keeps the export's numbers" in s for s in said)


@needs_openvino
def test_without_native_bf16_the_backend_says_why_and_auto_offers_nothing(tiny_export_fp32, tmp_path, monkeypatch,
                                                                          request):
    from dfosd.core.errors import DfosdError
    from dfosd.engines import openvino_backend
    from dfosd.engines.base import select_backend
    from dfosd.runtime.backend_choice import approximate_hint
    from dfosd.runtime.cli import main

    class NoBf16Core:
        def get_property(self, device, name):
            assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
            return ["FP32", "INT8", "EXPORT_IMPORT"]

    monkeypatch.setattr(openvino_backend._openvino(), "Core", NoBf16Core)
    openvino_backend.cpu_has_native_bf16.cache_clear()  # the answer is kept per process: ask again
    request.addfinalizer(openvino_backend.cpu_has_native_bf16.cache_clear)  # and again after the stand-in
    with pytest.raises(DfosdError, match="no native bf16") as info:
        select_backend("openvino-bf16")
    assert "--backend openvino" in info.value.hint
    assert approximate_hint() is None
    from PIL import Image

    src = tmp_path / "a.png"
    Image.new("RGB", (TILE, TILE), (90, 120, 30)).save(src)
    r = CliRunner().invoke(main, [str(src), "--engines", str(tiny_export_fp32), "--out", str(tmp_path / "o"),
                                  "--backend", "openvino-bf16", "--no-progress"])
    assert r.exit_code == 1 and "no native bf16" in r.output and "Traceback" not in r.output
    assert not list((tmp_path / "o").glob("*.png"))


@needs_openvino
@needs_native_bf16
def test_bench_rows_for_bf16_and_the_exact_per_part_best(tiny_ckpt, tmp_path):
    """The bench end to end on the tiny model: one interleaved run with the bf16 rows
    (OpenVINO and eager autocast) beside the exact ones; auto chooses among the exact."""
    from dfosd.bench.run import BenchConfig, run_bench, write_outputs

    cfg = BenchConfig(base=TINY, ckpt=str(tiny_ckpt), work_dir=str(tmp_path / "w"), tile=TILE, precisions=("fp32",),
                      backends=("onnxruntime", "openvino", "openvino-bf16", "auto"), warmup=0, repeats=2,
                      part_repeats=1)
    result = run_bench(cfg, say=lambda _m: None)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"eager PyTorch fp32", "eager PyTorch bf16 autocast", "onnxruntime fp32", "openvino fp32",
                         "openvino-bf16 fp32", "per-part best fp32"}
    for name in ("onnxruntime fp32", "openvino fp32", "per-part best fp32"):
        assert rows[name]["psnr_db"] > 50  # exact engines: rounding apart from eager
    for name in ("openvino-bf16 fp32", "eager PyTorch bf16 autocast"):
        assert 30 < rows[name]["psnr_db"] < 60  # bf16: close, not exact
    assert all(len(r["runs_ms"]) == 2 and r["median_ms"] > 0 for r in rows.values())
    assert set(result["per_part"]["fp32"]["parts"].values()) <= {"onnxruntime", "openvino"}
    files = write_outputs(result, tmp_path / "out")
    text = files["md"].read_text()
    assert "openvino-bf16 fp32" in text and "eager PyTorch bf16 autocast" in text


@needs_openvino
@needs_native_bf16
def test_export_time_compile_fills_the_bf16_cache_only(tiny_export_fp32, tmp_path):
    """What ``dfosd-export --backend openvino-bf16`` does after writing the ONNX files."""
    from dfosd.core.manifest import ExportDir
    from dfosd.engines.openvino_backend import OpenVinoBf16Backend

    folder = shutil.copytree(tiny_export_fp32, tmp_path / "e", ignore=shutil.ignore_patterns("openvino*"))
    said = []
    OpenVinoBf16Backend().prepare(ExportDir(folder), progress=said.append)
    entries = json.loads((folder / "manifest.json").read_text())["components"]
    assert len(_blobs(folder / "openvino-bf16-cache")) == len(entries) == len(said)
    assert all(s.startswith("openvino-bf16: ") for s in said)
    assert not (folder / "openvino-cache").exists()


@needs_openvino
@needs_native_bf16
@pytest.mark.parametrize("export", ["tiny_export_fp16", "int8_export"])
def test_bf16_compute_runs_fp16_and_qdq_exports(export, request, lr_tile, tmp_path):
    """What stays float in an fp16 or Q/DQ export is computed in bf16: close to OpenVINO's own run."""
    from dfosd.core.metrics import psnr_uint8
    from dfosd.runtime.step import OneStepRunner

    folder = shutil.copytree(request.getfixturevalue(export), tmp_path / "e")
    exact = OneStepRunner(folder, backend="openvino", batch=1, say=print)(lr_tile).numpy()
    approx = OneStepRunner(folder, backend="openvino-bf16", batch=1, say=print)(lr_tile).numpy()
    assert psnr_uint8(approx, exact) > 30.0 and approx.std() > 1
