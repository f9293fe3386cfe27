"""OpenVINO backend and per-part backends on the tiny exports: real OpenVINO compiles, real
ONNX Runtime sessions, real manifests and cache folders.

Skipped with the reason when openvino is not installed (it is in the dev extra, so CI has it);
the missing-package message is tested either way, by hiding the package from the importer.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TILE

needs_openvino = pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None,
                                    reason="openvino not installed (pip install 'dfosd[openvino]')")


@pytest.fixture(scope="module")
def lr_tile(photo_lr):
    return photo_lr[None, :, :TILE, :TILE].contiguous()


@pytest.fixture(autouse=True)
def one_backend_thread(monkeypatch):
    """Tiny graphs on a shared 2-core machine: two spinning threads wait on each other under
    load (seconds per call instead of milliseconds), one thread does not."""
    monkeypatch.setenv("DFOSD_THREADS", "1")


def _quiet(_msg):
    pass


def _run(export, backend, x, **kw):
    from dfosd.runtime.step import OneStepRunner

    return OneStepRunner(export, backend=backend, batch=1, say=_quiet, **kw)(x).numpy().astype(np.int16)


@pytest.fixture()
def fp32_copy(tiny_export_fp32, tmp_path):
    """A private copy: these tests rewrite the manifest's runtime records and the cache."""
    return shutil.copytree(tiny_export_fp32, tmp_path / "export")


@needs_openvino
@pytest.mark.parametrize("export", ["tiny_export_fp32", "tiny_export_fp16"])
def test_openvino_equals_onnxruntime_within_one_level(export, request, lr_tile, tmp_path):
    folder = shutil.copytree(request.getfixturevalue(export), tmp_path / "e")
    ov, ort = _run(folder, "openvino", lr_tile), _run(folder, "onnxruntime", lr_tile)
    assert ov.shape == ort.shape == (1, 3, 4 * TILE, 4 * TILE)
    assert np.abs(ov - ort).max() <= 1
    assert np.abs(ov - ort).mean() < 0.1  # an off-by-one here and there, not a shifted image
    assert ov.std() > 1  # the random model still makes a non-constant image


@needs_openvino
def test_cache_is_compiled_once_and_recorded(fp32_copy, lr_tile):
    from dfosd.engines.machine import machine_identity

    first = _run(fp32_copy, "openvino", lr_tile)
    blobs = {p.name: p.stat().st_mtime_ns for p in (fp32_copy / "openvino-cache").glob("*.blob")}
    assert len(blobs) == 3  # one per part of tile batch 1
    rec = json.loads((fp32_copy / "runtime.json").read_text())["records"]["openvino_cache"]["identity"]
    assert rec["machine"] == machine_identity() and rec["openvino"].startswith("20")
    assert rec["config"]["PERFORMANCE_HINT"] == "LATENCY" and rec["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert int(rec["config"]["INFERENCE_NUM_THREADS"]) >= 1
    again = _run(fp32_copy, "openvino", lr_tile)
    assert {p.name: p.stat().st_mtime_ns for p in (fp32_copy / "openvino-cache").glob("*.blob")} == blobs
    assert np.array_equal(first, again)


@needs_openvino
@pytest.mark.parametrize("field,value", [("machine", {"cpu": "Some Other CPU", "isa": ["avx2"]}),
                                         ("openvino", "2024.0.0-0000-old")])
def test_cache_from_another_cpu_or_openvino_is_rebuilt(fp32_copy, lr_tile, field, value, caplog):
    want = _run(fp32_copy, "openvino", lr_tile)
    path = fp32_copy / "runtime.json"
    records = json.loads(path.read_text())
    current = records["records"]["openvino_cache"]["identity"][field]
    records["records"]["openvino_cache"]["identity"][field] = value
    path.write_text(json.dumps(records))
    before = {p.name: p.stat().st_mtime_ns for p in (fp32_copy / "openvino-cache").glob("*.blob")}
    with caplog.at_level("WARNING"):
        got = _run(fp32_copy, "openvino", lr_tile)
    assert f"is stale ({field})" in caplog.text
    after = {p.name: p.stat().st_mtime_ns for p in (fp32_copy / "openvino-cache").glob("*.blob")}
    assert len(after) == 3 and all(after[n] != before.get(n) for n in after)  # every blob written anew
    assert json.loads(path.read_text())["records"]["openvino_cache"]["identity"][field] == current
    assert np.array_equal(want, got)


@needs_openvino
def test_mixed_backends_chain_the_single_backend_parts(fp32_copy, lr_tile):
    """A mixed run is exactly the parts of the single-backend runs chained, and within one
    level of either."""
    import torch

    from dfosd.runtime.step import OneStepRunner

    mixed = OneStepRunner(fp32_copy, backend="encoder=openvino,unet=onnxruntime,decoder=openvino", batch=1,
                          say=_quiet)
    assert mixed.backend.name == "per-part" and mixed.plan.mixed
    got = mixed(lr_tile).numpy().astype(np.int16)
    ov = OneStepRunner(fp32_copy, backend="openvino", batch=1, say=_quiet)
    ort = OneStepRunner(fp32_copy, backend="onnxruntime", batch=1, say=_quiet)
    by_part = {"encoder": ov, "unet": ort, "decoder": ov}
    bufs = {}
    for part in ("encoder", "unet", "decoder"):
        r = by_part[part]
        c = r.contracts[part]
        for s in c.inputs + c.outputs:
            bufs.setdefault(s.name, s.empty("cpu"))
    bufs[ov.contracts["encoder"].inputs[0].name].copy_(lr_tile)
    for part in ("encoder", "unet", "decoder"):
        c = by_part[part].contracts[part]
        by_part[part].engines[part].run({s.name: bufs[s.name] for s in c.inputs},
                                        {s.name: bufs[s.name] for s in c.outputs})
    chained = bufs[ov.contracts["decoder"].outputs[0].name].numpy().astype(np.int16)
    assert np.array_equal(got, chained)
    for single in (ov, ort):
        assert np.abs(got - single(lr_tile).numpy().astype(np.int16)).max() <= 1
    assert torch.equal(mixed(lr_tile), mixed(lr_tile))  # static buffers: a second call, same image


@needs_openvino
def test_auto_measures_once_per_machine(fp32_copy, lr_tile):
    from dfosd.runtime.step import OneStepRunner

    said = []
    first = OneStepRunner(fp32_copy, backend="auto", batch=1, say=said.append)
    assert not first.plan.cached and any("timing onnxruntime, openvino" in s for s in said)
    ms = first.plan.median_ms
    assert set(ms) == {"encoder", "unet", "decoder"}
    for part, per_backend in ms.items():  # the kept backend is the faster one, per part
        assert set(per_backend) == {"onnxruntime", "openvino"}
        assert first.plan.names[part] == min(per_backend, key=per_backend.get)
    out = first(lr_tile)
    record = json.loads((fp32_copy / "runtime.json").read_text())["records"]["backend_choice_b1"]
    assert record["parts"] == first.plan.names
    second = OneStepRunner(fp32_copy, backend="auto", batch=1, say=_quiet)
    assert second.plan.cached and second.plan.names == first.plan.names
    assert np.array_equal(second(lr_tile).numpy(), out.numpy())
    # a choice made on another machine is measured again
    path = fp32_copy / "runtime.json"
    records = json.loads(path.read_text())
    records["records"]["backend_choice_b1"]["identity"]["machine"]["cpu"] = "Some Other CPU"
    path.write_text(json.dumps(records))
    assert not OneStepRunner(fp32_copy, backend="auto", batch=1, say=_quiet).plan.cached


def test_without_openvino_the_error_says_how_to_install(tiny_export_fp32, tmp_path, monkeypatch):
    """None in sys.modules makes ``import openvino`` fail the way a missing package does."""
    from dfosd.core.errors import DfosdError
    from dfosd.engines.base import select_backend
    from dfosd.runtime.backend_choice import cpu_candidates
    from dfosd.runtime.cli import main

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(DfosdError, match="backend openvino is not usable here") as info:
        select_backend("openvino")
    assert "pip install 'dfosd[openvino]'" in info.value.hint
    assert cpu_candidates() == ["onnxruntime"]  # auto then runs everything on ONNX Runtime, untimed
    src = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (TILE, TILE), (90, 120, 30)).save(src)
    r = CliRunner().invoke(main, [str(src), "--engines", str(tiny_export_fp32), "--out", str(tmp_path / "o"),
                                  "--backend", "openvino", "--no-progress"])
    assert r.exit_code == 1 and "pip install 'dfosd[openvino]'" in r.output and "Traceback" not in r.output
    assert not list((tmp_path / "o").glob("*.png"))  # no image written (the run's report may be)


@pytest.mark.parametrize("spec,expect", [
    ("openvno", "unknown backend"),
    ("encoder=openvino,unet=onnxruntime", "names every part"),
    ("encoder=openvino,unet=onnxruntime,decoder=cuda", "not part=backend"),
    ("encoder=openvino,encoder=onnxruntime,decoder=openvino", "not part=backend"),
])
def test_bad_backend_specs_name_the_fix(spec, expect):
    from dfosd.core.errors import DfosdError
    from dfosd.runtime.backend_choice import parse_backend_spec

    with pytest.raises(DfosdError, match=expect):
        parse_backend_spec(spec)


@needs_openvino
@pytest.mark.parametrize("export", ["int8_export", "fp8_export"])
def test_openvino_runs_8bit_qdq_exports_with_onnxruntimes_parity(export, request, lr_tile, tiny_eager, tmp_path):
    """Q/DQ graphs: the runtimes round the quantized arithmetic differently, so the check is
    parity against eager fp32 close to ONNX Runtime's, not equal pixels (measured on one tile:
    int8 32.4 vs 33.5 dB, fp8 25.4 vs 25.6 dB; a 128x128 tile's PSNR moves by about 1 dB)."""
    import torch

    from dfosd.core.metrics import psnr_uint8

    folder = shutil.copytree(request.getfixturevalue(export), tmp_path / "e")
    with torch.inference_mode():
        ref = tiny_eager(lr_tile).numpy()
    ov = _run(folder, "openvino", lr_tile).astype(np.uint8)
    ort = _run(folder, "onnxruntime", lr_tile).astype(np.uint8)
    assert psnr_uint8(ov, ref) > psnr_uint8(ort, ref) - 2.0
    assert psnr_uint8(ov, ref) > 20.0  # quantized, not broken
