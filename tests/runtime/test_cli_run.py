"""dfosd-trt-run through click's CliRunner on a real tiny export (ONNX Runtime, CPU):
mixed folders with bad files, exit codes, the report, --skip-existing, formats, user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dfosd.runtime.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo(size, mode="RGB"):
    from skimage import data

    return Image.fromarray(data.astronaut()).resize(size, Image.BICUBIC).convert(mode)


@pytest.fixture
def mixed_folder(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _photo((40, 24)).save(src / "wide.png")  # smaller than a tile on one axis, two tiles on the other
    _photo((20, 20), "L").save(src / "sub" / "gray.png")
    _photo((32, 32), "RGBA").save(src / "alpha.png")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")  # not an image name: skipped and named
    return src


def _run(args):
    return CliRunner().invoke(main, [*args, "--no-progress", "--backend", "onnxruntime"])


def test_mixed_folder_goes_on_past_bad_files_and_exits_1(tiny_export_fp32, mixed_folder, tmp_path):
    out = tmp_path / "out"
    r = _run([str(mixed_folder), "--engines", str(tiny_export_fp32), "--out", str(out)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("corrupt.png" in e for e in errors) and any("empty.jpg" in e for e in errors)
    assert "3 upscaled, 1 skipped, 2 failed" in r.stderr
    assert "skipped 1 file(s) that are not inputs: notes.txt" in r.stderr
    assert Image.open(out / "wide.png").size == (160, 96)
    gray = Image.open(out / "sub" / "gray.png")  # sub-folders mirrored, grayscale stays grayscale
    assert gray.mode == "L" and gray.size == (80, 80)
    alpha = Image.open(out / "alpha.png")
    assert alpha.mode == "RGBA" and alpha.size == (128, 128)
    assert sorted(p.name for p in out.rglob("*")) == ["alpha.png", "dfosd-report.json", "gray.png", "sub",
                                                       "wide.png"]  # no temp or partial files
    report = json.loads((out / "dfosd-report.json").read_text())
    assert report["state"] == "complete"
    assert report["summary"] == {"ok": 3, "skipped": 1, "failed": 2, "interrupted": 0, "not_started": 0}
    by_name = {r["input"].rsplit("/", 1)[-1]: r for r in report["images"]}
    assert by_name["corrupt.png"]["status"] == "failed" and "corrupt.png" in by_name["corrupt.png"]["error"]
    assert all(by_name[n]["status"] == "ok" and by_name[n]["seconds"] >= 0 for n in ("wide.png", "gray.png"))
    assert by_name["notes.txt"]["status"] == "skipped" and "not an image" in by_name["notes.txt"]["reason"]
    assert report["tiling"] == {"tile": 32, "overlap": 8, "batch": 2}


def test_output_equals_the_runner_on_a_one_tile_image(tiny_export_fp32, tmp_path):
    import torch

    from dfosd.runtime.step import OneStepRunner

    img = _photo((32, 32))
    img.save(tmp_path / "tile.png")
    r = _run([str(tmp_path / "tile.png"), "--engines", str(tiny_export_fp32), "--out", str(tmp_path / "o"),
              "--batch", "1"])
    assert r.exit_code == 0, r.output
    lr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    direct = OneStepRunner(tiny_export_fp32, backend="onnxruntime", batch=1)(lr)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "tile.png")), direct)


def test_skip_existing_formats_and_report_path(tiny_export_fp32, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _photo((24, 24), "RGBA").save(src / "a.png")
    _photo((24, 24)).save(src / "b.png")
    out, report = tmp_path / "out", tmp_path / "rep" / "r.json"
    args = [str(src), "--engines", str(tiny_export_fp32), "--out", str(out), "--format", "jpg",
            "--report", str(report)]
    r = _run(args)
    assert r.exit_code == 0, r.output
    assert Image.open(out / "a.jpg").mode == "RGB"  # jpg has no alpha
    rec = {x["input"].rsplit("/", 1)[-1]: x for x in json.loads(report.read_text())["images"]}
    assert any("alpha" in n for n in rec["a.png"]["notes"])
    before = (out / "b.jpg").stat().st_mtime_ns
    r = _run(args + ["--skip-existing"])
    assert r.exit_code == 0 and "0 upscaled, 2 skipped, 0 failed" in r.stderr
    assert (out / "b.jpg").stat().st_mtime_ns == before


@pytest.mark.parametrize("extra, needle", [
    (["--engines", "{missing}"], "manifest"),
    (["--tile", "64"], "--tile 64 differs"),
    (["--batch", "3"], "batch"),
])
def test_user_errors_are_one_line_and_exit_1(tiny_export_fp32, tmp_path, extra, needle):
    _photo((32, 32)).save(tmp_path / "x.png")
    extra = [e.replace("{missing}", str(tmp_path / "nowhere")) for e in extra]
    if "--engines" not in extra:
        extra = ["--engines", str(tiny_export_fp32), *extra]
    r = _run([str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), *extra])
    assert r.exit_code == 1, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_no_inputs_and_tensorrt_without_tensorrt(tiny_export_fp32, tmp_path):
    r = _run([str(tmp_path / "*.png"), "--engines", str(tiny_export_fp32), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    _photo((32, 32)).save(tmp_path / "x.png")
    r = CliRunner().invoke(main, [str(tmp_path / "x.png"), "--engines", str(tiny_export_fp32), "--backend",
                                  "tensorrt", "--no-progress", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "tensorrt" in r.output and "Traceback" not in r.output
