"""``dfosd build DIR --backend X``: one build command over every backend's ``prepare``, and its
deprecated aliases; through click's CliRunner on the tiny export, error paths included."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

@pytest.fixture(autouse=True)
def one_backend_thread(monkeypatch):
    monkeypatch.setenv("DFOSD_THREADS", "1")


def _build(*args):
    from dfosd.engines.build_cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_build_prepares_the_backend_and_reuses_it(tiny_export_fp32, tmp_path):
    export = shutil.copytree(tiny_export_fp32, tmp_path / "e", ignore=shutil.ignore_patterns("onnxruntime-*"))
    parts = {f"{p}_b{b}" for p in ("encoder", "unet", "decoder") for b in (1, 2)}  # the tiny export's two batches

    def graphs():
        return {p.name: p.stat().st_mtime_ns for p in (export / "onnxruntime-optimized").glob("*.opt.onnx")}

    r = _build(export, "--backend", "onnxruntime", "--device", "cpu")
    assert r.exit_code == 0, r.output
    built = graphs()
    assert set(built) == {f"{p}.opt.onnx" for p in parts} and r.output.count("onnxruntime: ") == len(parts)
    entries = json.loads((export / "runtime.json").read_text())["records"]["onnxruntime_optimized"]["entries"]
    assert set(entries) == parts
    assert _build(export, "--backend", "onnxruntime", "--device", "cpu").exit_code == 0
    assert graphs() == built  # current: loaded, not optimized again
    r = _build(export, "--backend", "onnxruntime", "--device", "cpu", "--force")
    assert r.exit_code == 0, r.output
    now = graphs()
    assert set(now) == set(built) and all(now[n] != built[n] for n in now)


def test_build_errors_are_clean(tiny_export_fp32, tmp_path):
    r = _build(tmp_path / "nothing", "--backend", "onnxruntime")
    assert r.exit_code == 1 and "no manifest.json" in r.output and "Traceback" not in r.output
    r = _build(tiny_export_fp32, "--backend", "onnxruntime", "--workspace-gib", "4")
    assert r.exit_code == 1 and "--workspace-gib does not apply to --backend onnxruntime" in r.output
    r = _build(tiny_export_fp32, "--backend", "tensorrt")
    if not __import__("importlib").util.find_spec("tensorrt"):
        assert r.exit_code == 1 and "backend tensorrt is not usable here" in r.output
    r = _build(tiny_export_fp32, "--backend", "bogus")
    assert r.exit_code == 2 and "Invalid value for '--backend'" in r.output


def test_old_build_commands_are_aliases_with_an_end_date(tmp_path):
    from dfosd.engines.aoti_cli import main as aoti_export
    from dfosd.engines.build_cli import ALIASES_END
    from dfosd.engines.tensorrt_build import main as tensorrt_build

    r = CliRunner().invoke(aoti_export, ["--engines", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 1 and "no manifest.json" in r.output
    assert f"`dfosd aoti-export --engines DIR` is deprecated and goes after {ALIASES_END}" in r.output
    assert "dfosd build DIR --backend aoti" in r.output
    with pytest.raises(SystemExit) as done:
        tensorrt_build([str(tmp_path)])
    assert done.value.code == 1
