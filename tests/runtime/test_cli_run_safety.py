"""dfosd-trt-run against a hostile user: nothing lost, nothing silent, big images.

Real tiny exports (ONNX Runtime, CPU) through click's CliRunner; the interrupt and the memory
bound run in a subprocess, since they need a real signal and a fresh process's peak memory.
"""

from __future__ import annotations

import json
import os
import shutil
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

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo(size, mode="RGB"):
    from skimage import data

    return Image.fromarray(data.astronaut()).resize(size, Image.BICUBIC).convert(mode)


def _run(args):
    return CliRunner().invoke(main, [*args, "--no-progress", "--backend", "onnxruntime"])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1: --out and the inputs

@pytest.mark.parametrize("out_rel, needle", [(".", "is the input folder"), ("sr", "is inside the input folder"),
                                             ("sub/sr", "is inside the input folder")])
def test_out_in_an_input_folder_is_refused_before_any_work(tmp_path, out_rel, needle):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _photo((24, 24)).save(src / "a.png")
    _photo((24, 24)).save(src / "sub" / "b.png")
    before = _tree(src)
    # --engines does not exist: the refusal comes first, before any model is looked at
    r = _run([str(src), "--out", str(src / out_rel), "--engines", str(tmp_path / "no-engines")])
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output, r.output
    assert "outputs would overwrite inputs" in r.output and "fix: pass an --out outside" in r.output
    assert _tree(src) == before  # not one byte written, not even a report


def test_an_output_over_its_own_input_file_is_refused(tmp_path):
    _photo((24, 24)).save(tmp_path / "a.png")
    r = _run([str(tmp_path / "a.png"), "--out", str(tmp_path), "--engines", str(tmp_path / "none")])
    assert r.exit_code == 1 and "would be written over the input" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("target", ["a.png", "notes.json"])
def test_a_report_over_a_file_dfosd_did_not_write_is_refused(tmp_path, target):
    """--report naming an input image, or any existing file that is not a dfosd report."""
    _photo((24, 24)).save(tmp_path / "a.png")
    (tmp_path / "notes.json").write_text('{"mine": true}')
    before = _tree(tmp_path)
    r = _run([str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--report", str(tmp_path / target),
              "--engines", str(tmp_path / "none")])
    assert r.exit_code == 1 and "is not a dfosd report" in r.output and "Traceback" not in r.output, r.output
    assert {k: v for k, v in _tree(tmp_path).items() if not k.startswith("out")} == before


def test_a_pattern_never_reads_outputs_as_inputs(tiny_export_fp32, tmp_path):
    """`dfosd-trt-run 'photos/**/*.png' --out photos/sr` twice: the second run must not upscale
    the first run's outputs (x16)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo((24, 24)).save(photos / "a.png")
    args = [str(photos / "**" / "*.png"), "--out", str(photos / "sr"), "--engines", str(tiny_export_fp32)]
    assert _run(args).exit_code == 0
    r = _run(args)
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png")) == ["a.png", "sr/a.png"]
    assert Image.open(photos / "sr" / "a.png").size == (96, 96)
    report = json.loads((photos / "sr" / "dfosd-report.json").read_text())
    skipped = {Path(r["input"]).name: r["reason"] for r in report["images"] if r["status"] == "skipped"}
    assert "outputs are never read as inputs" in skipped["a.png"]
    assert "skipped 1 file(s) that are not inputs: a.png" in r.stderr


# ----------------------------------------------------------------------------- 6: unwritable --out, skipped files

def test_unwritable_out_is_found_before_any_compute(tmp_path):
    _photo((24, 24)).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("a file, not a folder")
    # (tests run as root here, so a chmod-ed folder would still be writable: a path through a file is not)
    r = _run([str(tmp_path / "a.png"), "--out", str(tmp_path / "file" / "sr"), "--engines", str(tmp_path / "none")])
    assert r.exit_code == 1 and "cannot create --out" in r.output and "Traceback" not in r.output, r.output
    assert "manifest" not in r.output  # the engines were never looked at
    r = _run([str(tmp_path / "a.png"), "--report", str(tmp_path / "file" / "r.json"), "--out", str(tmp_path / "o"),
              "--engines", str(tmp_path / "none")])
    assert r.exit_code == 1 and "--report folder" in r.output and "is not a folder" in r.output, r.output


def test_only_non_images_is_a_clear_error_naming_them(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "readme.txt").write_text("x")
    r = _run([str(src), "--out", str(tmp_path / "o"), "--engines", str(tmp_path / "none")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "no input images found" in r.output and "skipped 1 file(s): readme.txt" in r.output
    assert "manifest" not in r.output  # said before any engine is looked at


# ----------------------------------------------------------------------------- 5: a NaN from the engine

@pytest.fixture(scope="module")
def nan_export(tiny_export_fp32, tmp_path_factory):
    """The tiny export with one UNet weight set to NaN (as an fp16 overflow makes), manifest updated."""
    import onnx
    from onnx import numpy_helper

    from dfosd.core.manifest import file_record, write_json_atomic

    out = tmp_path_factory.mktemp("nan") / "engines"
    shutil.copytree(tiny_export_fp32, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["components"].values():
        if entry["component"] != "unet":
            continue
        model = onnx.load(str(out / entry["onnx"]))
        init = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
                   key=lambda i: len(i.raw_data))
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] = np.nan
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(model, str(out / entry["onnx"]))
        manifest["files"][entry["onnx"]] = file_record(out / entry["onnx"])
    write_json_atomic(out / "manifest.json", manifest)
    return out


def test_non_finite_engine_output_fails_the_image_never_a_black_ok(nan_export, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _photo((32, 32)).save(src / "a.png")
    _photo((40, 24)).save(src / "b.png")
    out = tmp_path / "out"
    r = _run([str(src), "--out", str(out), "--engines", str(nan_export)])
    assert r.exit_code == 1, r.output
    assert r.stderr.count("the unet produced NaN or Inf") == 2 and "Traceback" not in r.output
    assert not list(out.glob("*.png"))  # no black image written
    report = json.loads((out / "dfosd-report.json").read_text())
    assert report["summary"]["failed"] == 2 and report["summary"]["ok"] == 0
    assert all("NaN or Inf" in rec["error"] for rec in report["images"])


# ----------------------------------------------------------------------------- 7: manifest edits

def _edit_manifest(export: Path, dst: Path, edit) -> Path:
    shutil.copytree(export, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("name, edit, needle", [
    ("tile", lambda m: m.update(tile=64), "do not fit tile 64"),
    ("upscale", lambda m: m.update(upscale=2), "do not fit tile 32, upscale 2"),
    ("precision", lambda m: m.update(precision="fp16"), "disagree"),
    ("precision-unknown", lambda m: m.update(precision="fp64"), "precision 'fp64' is not one of"),
    ("files-emptied", lambda m: m.update(files={}), "no hash record of"),
    ("file-record", lambda m: m["files"].update({k: {"sha256": "x"} for k in list(m["files"])[:1]}),
     "is not a record of sha256"),
    ("component-gone", lambda m: m["components"].pop("unet_b1"), "no component entries for unet_b1"),
    ("batches", lambda m: m.update(batches=[]), "batches [] is not a non-empty list"),
])
def test_edited_manifest_is_a_clear_error(tiny_export_fp32, tmp_path, name, edit, needle):
    engines = _edit_manifest(tiny_export_fp32, tmp_path / name, edit)
    _photo((24, 24)).save(tmp_path / "a.png")
    r = _run([str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--engines", str(engines), "--batch", "1"])
    assert r.exit_code == 1, r.output
    assert needle in r.output and "Traceback" not in r.output and "re-run dfosd-export" in r.output, r.output
    if name == "files-emptied":  # found when the engines load: the run had started, its report says so
        report = json.loads((tmp_path / "o" / "dfosd-report.json").read_text())
        assert report["state"] == "failed" and needle in report["error"]
    else:  # found when the manifest is read: the run never started, so no output folder, no report
        assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 8: big images

def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_a_huge_image_fails_alone_and_the_batch_goes_on(tiny_export_fp32, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_huge.png").write_bytes(_png_header_only(12000, 12000))  # 166 KB that would ask for 37 GB
    (src / "b_tall.png").write_bytes(_png_header_only(100, 100))  # under --max-pixels, but truncated data
    _photo((24, 24)).save(src / "c.png")
    out = tmp_path / "out"
    r = _run([str(src), "--out", str(out), "--engines", str(tiny_export_fp32), "--max-pixels", "1000000"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    report = {Path(x["input"]).name: x for x in json.loads((out / "dfosd-report.json").read_text())["images"]}
    assert "12000x12000 is 144.0 MP, over --max-pixels 1000000" in report["a_huge.png"]["error"]
    assert "truncated or corrupt" in report["b_tall.png"]["error"]
    assert report["c.png"]["status"] == "ok" and (out / "c.png").is_file()


def test_tile_progress_is_shown_within_a_large_image(tiny_export_fp32, tmp_path, monkeypatch):
    import dfosd.runtime.cli as run_cli

    _photo((96, 96)).save(tmp_path / "big.png")  # 16 tiles of 32 (overlap 8), 16 engine calls at batch 1
    args = [str(tmp_path / "big.png"), "--out", str(tmp_path / "o"), "--engines", str(tiny_export_fp32), "--backend",
            "onnxruntime", "--batch", "1", "--progress"]
    r = CliRunner().invoke(main, args)  # stderr is not a terminal here (a log): no bars, no escape codes
    assert r.exit_code == 0 and "\r" not in r.stderr and "\x1b[" not in r.stderr and "big.png:" not in r.stderr
    monkeypatch.setattr(run_cli, "progress_bars", lambda wanted, stream=None: wanted)  # as on a terminal
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    bars = [line for line in r.stderr.replace("\r", "\n").splitlines() if "big.png:" in line]
    assert bars and all("/16 [" in b and "tile" in b for b in bars), r.stderr  # how many: tqdm's refresh rate


def test_peak_memory_is_bounded_by_twice_the_output(tmp_path):
    """One 800x800 input through the run's image path in a fresh process (stand-in engine step):
    the peak over the baseline stays under 2x the uint8 output plus 80 MiB. Before banding
    it was ~14x the output (408 MiB here; 5.5 GiB for 3000x3000, BENCHMARKS.md)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "dfosd.bench.big_image_memory", "--size", "800",
                        "--json", str(tmp_path / "m.json")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["peak_over_baseline_mib"] <= 2 * m["uint8_output_mib"] + 80, m


# ----------------------------------------------------------------------------- 4: interrupted and concurrent runs

def test_a_stale_report_is_replaced_even_when_the_run_fails(tiny_export_fp32, tmp_path):
    _photo((24, 24)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert _run([str(tmp_path / "a.png"), "--out", str(out), "--engines", str(tiny_export_fp32)]).exit_code == 0
    r = _run([str(tmp_path / "a.png"), "--out", str(out), "--engines", str(tmp_path / "gone"), "--color-fix", "adain"])
    assert r.exit_code == 1
    report = json.loads((out / "dfosd-report.json").read_text())
    assert report["state"] == "failed" and report["color_fix"] == "adain" and "manifest" in report["error"]


def test_a_second_run_into_the_same_report_is_refused(tiny_export_fp32, tmp_path):
    from dfosd.runtime.batch import report_lock

    _photo((24, 24)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    first = {"the": "first run's report", "state": "running", "summary": {}, "images": []}
    (out / "dfosd-report.json").write_text(json.dumps(first))
    with report_lock(out / "dfosd-report.json"):  # as a first run holds it while it works
        r = _run([str(tmp_path / "a.png"), "--out", str(out), "--engines", str(tiny_export_fp32)])
        assert r.exit_code == 1 and f"another dfosd-trt-run (pid {os.getpid()})" in r.output, r.output
        assert json.loads((out / "dfosd-report.json").read_text()) == first
        # its own --report is fine
        r = _run([str(tmp_path / "a.png"), "--out", str(out), "--engines", str(tiny_export_fp32),
                  "--report", str(out / "second.json")])
        assert r.exit_code == 0, r.output
    r = _run([str(tmp_path / "a.png"), "--out", str(out), "--engines", str(tiny_export_fp32)])
    assert r.exit_code == 0  # the lock went with its holder


SIGTERM_PROBE = """
import os, signal, time
from dfosd.runtime.batch import Interrupted, exit_code_for, stop_on_signals
try:
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
    print("not interrupted")
except Interrupted as exc:
    print("code", exit_code_for(exc), "restored", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
"""


def test_sigterm_is_turned_into_an_interruption():
    # In its own interpreter: a signal sent to the test runner itself reaches every library it has
    # loaded (OpenVINO's and ONNX Runtime's thread pools among them); the CLI's own SIGTERM path is
    # covered end to end by the Ctrl-C test below and by dfosd-trt-run's report.
    out = subprocess.run([sys.executable, "-c", SIGTERM_PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["code", "143", "restored", "True"], out.stdout + out.stderr


def test_ctrl_c_writes_an_interrupted_report_and_leaves_no_temp_files(tiny_export_fp32, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        _photo((48, 48)).rotate(i * 9).save(src / f"img{i:02d}.png")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dfosd.runtime.cli", str(src), "--out", str(out), "--engines",
                             str(tiny_export_fp32), "--backend", "onnxruntime", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "img01.png").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted (SIGINT)" in err
    report = json.loads((out / "dfosd-report.json").read_text())
    counts = report["summary"]
    assert report["state"] == "interrupted" and counts["ok"] >= 2 and counts["failed"] == 0
    assert counts["ok"] + counts["interrupted"] + counts["not_started"] == 40 and counts["not_started"] > 0
    assert len(list(out.glob("*.png"))) == counts["ok"]  # every output listed ok exists, and no other
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no hidden temp file left


@pytest.mark.parametrize("exc, needle", [
    (MemoryError(), "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "out of memory"),
    (RuntimeError("ONNXRuntimeError: ... Non-zero status code"), "RuntimeError: ONNXRuntimeError"),
])
def test_any_failure_inside_one_image_is_that_image_s_record(tmp_path, exc, needle):
    """What the batch loop gets back when the upscale itself fails: a record, never an exception."""
    from dfosd.runtime.batch import process_image

    _photo((24, 24)).save(tmp_path / "a.png")

    def upscale(rgb, sink, progress):
        raise exc

    opts = {"fmt": "png", "quality": 95, "skip_existing": False, "color_fix": "none", "max_pixels": 10**6}
    rec = process_image(tmp_path / "a.png", Path("a.png"), upscale, 4, opts, tmp_path / "out")
    assert rec["status"] == "failed" and needle in rec["error"] and str(tmp_path / "a.png") in rec["error"]
    assert not (tmp_path / "out" / "a.png").exists()
