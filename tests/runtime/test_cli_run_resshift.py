"""dfosd-trt-run on a ResShift-backbone export (the golden tiny SinSR, ONNX Runtime CPU) through click's
CliRunner: the same per-image path, report and safety rules as the SD exports, plus the noise field
(--seed recorded, --noise for one image with its shape checked) and the refusals that go with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dfosd.core.metrics import psnr_uint8
from dfosd.runtime.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(resshift_golden, tmp_path_factory):
    """The goldens' 32x32 LR tile and its noise, a 48x40 image (several tiles, one overlap each way), a broken file."""
    _, io, _ = resshift_golden
    folder = tmp_path_factory.mktemp("resshift_inputs")
    Image.fromarray(io["lr"][0].permute(1, 2, 0).numpy()).save(folder / "lr.png")
    big = np.asarray(Image.fromarray(io["lr"][0].permute(1, 2, 0).numpy()).resize((40, 48), Image.BICUBIC))
    Image.fromarray(big).save(folder / "big.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(100)))
    np.save(folder / "noise.npy", io["noise"].numpy())
    return folder


def _run(*args):
    return CliRunner().invoke(main, [*map(str, args), "--no-progress"])


def _png(path):
    return np.asarray(Image.open(path)).transpose(2, 0, 1)[None].astype(np.float32)


def test_seeded_run_same_path_and_report(resshift_export, images, tmp_path):
    out = tmp_path / "sr"
    r = _run(images / "lr.png", images / "big.png", images / "broken.png", "--engines", resshift_export,
             "--out", out, "--seed", 3)
    assert r.exit_code == 1, r.output  # the broken file fails alone, the others are written
    assert "Traceback" not in r.output and "2 upscaled, 0 skipped, 1 failed" in r.output
    assert Image.open(out / "big.png").size == (160, 192) and Image.open(out / "lr.png").size == (128, 128)
    report = json.loads((out / "dfosd-report.json").read_text())
    assert report["state"] == "complete" and report["backbone"] == "resshift" and report["seed"] == 3
    assert report["noise"] is None and report["color_fix"] == "none" and report["precision"] == "fp32"
    assert report["tiling"] == {"tile": 32, "overlap": 8, "batch": 1} and "onnxruntime" in report["backend"]
    status = {rec["input"].rsplit("/", 1)[-1]: rec["status"] for rec in report["images"]}
    assert status == {"lr.png": "ok", "big.png": "ok", "broken.png": "failed"}
    assert sorted(p.name for p in out.iterdir()) == ["big.png", "dfosd-report.json", "lr.png"]  # no temp files
    # the seed is the field: the default (0) is recorded and gives another image than seed 3; the same seed
    # gives the same bytes; an existing output is left with --skip-existing
    again = tmp_path / "again"
    r = _run(images / "lr.png", "--engines", resshift_export, "--out", again)
    assert r.exit_code == 0, r.output
    assert json.loads((again / "dfosd-report.json").read_text())["seed"] == 0
    assert not np.array_equal(_png(again / "lr.png"), _png(out / "lr.png"))
    r = _run(images / "lr.png", "--engines", resshift_export, "--out", again, "--seed", 3)
    assert r.exit_code == 0 and (again / "lr.png").read_bytes() == (out / "lr.png").read_bytes(), r.output
    before = (again / "lr.png").read_bytes()
    r = _run(images / "lr.png", "--engines", resshift_export, "--out", again, "--skip-existing")
    assert r.exit_code == 0 and "0 upscaled, 1 skipped" in r.output and (again / "lr.png").read_bytes() == before


def test_noise_file_reproduces_upstream(resshift_export, resshift_golden, images, tmp_path):
    _, io, _ = resshift_golden
    out = tmp_path / "exact"
    r = _run(images / "lr.png", "--engines", resshift_export, "--out", out, "--noise", images / "noise.npy")
    assert r.exit_code == 0, r.output
    assert psnr_uint8(_png(out / "lr.png"), ((io["sr"] + 1) * 127.5).numpy()) >= 50.0  # upstream SinSR's image
    report = json.loads((out / "dfosd-report.json").read_text())
    assert report["seed"] is None and report["noise"] == str((images / "noise.npy").resolve())
    # OpenVINO (f32) runs the same parts: upstream's image too
    ov = pytest.importorskip("openvino")  # noqa: F841
    r = _run(images / "lr.png", "--engines", resshift_export, "--out", tmp_path / "ov", "--noise", images / "noise.npy",
             "--backend", "openvino")
    assert r.exit_code == 0, r.output
    assert psnr_uint8(_png(tmp_path / "ov" / "lr.png"), ((io["sr"] + 1) * 127.5).numpy()) >= 50.0
    assert json.loads((tmp_path / "ov" / "dfosd-report.json").read_text())["backend"].startswith("openvino (CPU")


def test_noise_errors(resshift_export, images, tmp_path):
    # a field of another image's size: that image fails with the shape it wants, in the report
    np.save(tmp_path / "other.npy", np.zeros((1, 3, 40, 48), dtype=np.float32))
    out = tmp_path / "o1"
    r = _run(images / "lr.png", "--engines", resshift_export, "--out", out, "--noise", tmp_path / "other.npy")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    rec = json.loads((out / "dfosd-report.json").read_text())["images"][0]
    assert rec["status"] == "failed" and "shape [1, 3, 40, 48] (want [1, 3, 32, 32] for this 32x32 image)" in rec["error"]
    assert not (out / "lr.png").exists()
    # refused before any report or folder: two inputs, a wrong dtype, no file, both --seed and --noise
    np.save(tmp_path / "f64.npy", np.zeros((1, 3, 32, 32)))
    cases = [
        ((images / "lr.png", images / "big.png", "--noise", images / "noise.npy"),
         "--noise gives the noise field of one image; 2 input images were found"),
        ((images / "lr.png", "--noise", tmp_path / "f64.npy"), "dtype float64 (want float32)"),
        ((images / "lr.png", "--noise", tmp_path / "nope.npy"), "nope.npy does not exist"),
        ((images / "lr.png", "--noise", images / "noise.npy", "--seed", 1), "--seed and --noise both given"),
        ((images / "lr.png", "--ray", "local"), "--ray does not run ResShift-backbone exports yet"),
    ]
    for args, message in cases:
        r = _run(*args, "--engines", resshift_export, "--out", tmp_path / "never")
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (args, r.output)
        assert not (tmp_path / "never").exists()


def test_option_errors(resshift_export, tiny_export_fp32, images, tmp_path):
    # the export's tile is fixed; a tile that the Swin windows could not take says the rule too
    cases = [
        (("--tile", 24), "--tile 24 differs from the engines' tile 32", "multiple of 16 (Swin window 4"),
        (("--tile", 64), "--tile 64 differs from the engines' tile 32", None),
        (("--backend", "tensorrt"), None, None),  # not usable here, or not for this backbone: refused either way
        (("--batch", 2), "takes one tile per call", None),
    ]
    for args, message, rule in cases:
        out = tmp_path / f"o{args[1]}"
        r = _run(images / "lr.png", "--engines", resshift_export, "--out", out, *args)
        assert r.exit_code == 1 and (message or "") in r.output and "Traceback" not in r.output, (args, r.output)
        assert (rule in r.output) if rule else "Swin" not in r.output
        assert not (out / "lr.png").exists()
    # --seed / --noise on an SD export, or with --server: refused, nothing written
    r = _run(images / "lr.png", "--engines", tiny_export_fp32, "--out", tmp_path / "sd", "--seed", 1)
    assert r.exit_code == 1 and "only a ResShift-backbone export" in r.output and not (tmp_path / "sd").exists()
    r = _run(images / "lr.png", "--server", "http://127.0.0.1:9", "--out", tmp_path / "srv", "--seed", 1)
    assert r.exit_code == 1 and "--seed configure local engines" in r.output, r.output


def test_non_finite_unet_output_fails_the_image(resshift_export, resshift_golden):
    # the decoder's uint8 cast would turn NaN into black pixels: the runner refuses the tile instead
    from dfosd.runtime.resshift_run import ResShiftRunner
    from dfosd.runtime.step import NonFiniteOutput

    _, io, _ = resshift_golden
    runner = ResShiftRunner.from_export(resshift_export)
    real = runner.sessions["unet"]

    class NaNUNet:
        def run(self, names, feeds):
            out = real.run(names, feeds)
            out[0][..., 0, 0] = np.nan
            return out

    runner.sessions["unet"] = NaNUNet()
    with pytest.raises(NonFiniteOutput, match="the unet produced NaN or Inf"):
        runner(io["lr"][0], seed=0)
