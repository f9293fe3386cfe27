"""Issue 12, "the first ten minutes": a test checkpoint in one command, and cheap errors first.

Every bad-input case runs in a fresh interpreter and must fail with its message before torch,
ONNX Runtime or diffusers is imported (what made trivial errors take 7 s before) and before
any export work.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND = "dfosd checkpoint random --base synthetic:tiny --out lora.safetensors"

PROBE = """
import importlib, sys
from click.testing import CliRunner
r = CliRunner().invoke(importlib.import_module({module!r}).{attr}, {args!r})
print("EXIT=" + str(r.exit_code))
print(r.output)
heavy = [m for m in ("torch", "onnxruntime", "diffusers", "onnx", "tensorrt") if m in sys.modules]
print("HEAVY=" + ",".join(heavy))
"""


def _probe(module: str, attr: str, args: list[str], cwd: Path) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, attr=attr, args=args)], cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    code = int(next(ln for ln in lines if ln.startswith("EXIT=")).split("=")[1])
    heavy = next(ln for ln in lines if ln.startswith("HEAVY=")).split("=", 1)[1]
    return code, out.stdout, heavy, seconds


def test_checkpoint_random_is_named_in_readme_and_in_the_missing_checkpoint_hint(tmp_path):
    from dfosd.core.checkpoint import read_checkpoint
    from dfosd.core.errors import DfosdError

    assert COMMAND in (REPO / "README.md").read_text()
    with pytest.raises(DfosdError) as exc:
        read_checkpoint(tmp_path / "lora.safetensors")
    assert "does not exist" in str(exc.value) and COMMAND in str(exc.value)


def test_checkpoint_random_writes_a_checkpoint_that_fits_its_base(tmp_path, tiny_base):
    from click.testing import CliRunner

    from dfosd.cli import main
    from dfosd.core.checkpoint import read_checkpoint
    from dfosd.core.readers import read_model
    from dfosd.core.srmodel import validate_model

    out = tmp_path / "lora.safetensors"
    r = CliRunner().invoke(main, ["checkpoint", "random", "--base", "synthetic:tiny", "--out", str(out), "--rank", "2"])
    assert r.exit_code == 0, r.output
    ckpt = read_checkpoint(out)
    validate_model(read_model(out), tiny_base)  # fits the base it was made for
    assert ckpt.metadata.lora_rank == 2 and ckpt.metadata.base_model == "synthetic:tiny"
    assert "not super-resolved" in r.output and f"dfosd-export --ckpt {out}" in r.output
    before = out.read_bytes()
    r = CliRunner().invoke(main, ["checkpoint", "random", "--out", str(out), "--seed", "1"])
    assert r.exit_code == 1 and "exists" in r.output and "--force" in r.output  # never overwritten silently
    assert out.read_bytes() == before
    r = CliRunner().invoke(main, ["checkpoint", "random", "--out", str(out), "--seed", "1", "--force"])
    assert r.exit_code == 0 and out.read_bytes() != before


CHEAP_CASES = [
    ("dfosd.core.checkpoint_cli", "main", ["random", "--out", "exists.safetensors"], "exists"),
    ("dfosd.core.checkpoint_cli", "main", ["random", "--out", "lora.pt"], ".safetensors file"),
    ("dfosd.export.cli", "main", ["--ckpt", "missing.safetensors"], COMMAND),
    ("dfosd.export.cli", "main", ["--ckpt", "exists.safetensors", "--precision", "int8", "--calib-data", "nowhere"],
     "does not exist"),
    ("dfosd.export.cli", "main", ["--ckpt", "exists.safetensors", "--tile", "7"], "--tile 7"),
    ("dfosd.export.cli", "main", ["--ckpt", "exists.safetensors", "--batch", "x"], "--batch"),
    ("dfosd.bench.cli", "main", ["--backends", "bogus", "--work", "bench"], "--backends bogus"),
    ("dfosd.bench.cli", "main", ["--precisions", "fp12", "--work", "bench"], "--precisions fp12"),
    ("dfosd.bench.cli", "main", ["--ckpt", "missing.safetensors", "--work", "bench"], COMMAND),
    ("dfosd.runtime.cli", "main", ["in.png", "--engines", "nowhere", "--out", "o"], "no manifest.json"),
    ("dfosd.runtime.cli", "main", ["in.png", "--engines", "nowhere", "--out", "o", "--backend", "bogus"],
     "unknown backend 'bogus'"),
    ("dfosd.runtime.cli", "main", ["in.png", "--engines", "nowhere", "--out", "o", "--backend", "cuda"],
     "unknown backend 'cuda'"),
    ("dfosd.serving.cli", "main", ["--engines", "nowhere"], "no manifest.json"),
]


@pytest.mark.parametrize("module,attr,args,expect", CHEAP_CASES, ids=[" ".join(c[2][:3]) for c in CHEAP_CASES])
def test_bad_input_is_reported_before_heavy_imports(tmp_path, module, attr, args, expect):
    (tmp_path / "exists.safetensors").write_bytes(b"not read: the checks before it fail")
    (tmp_path / "in.png").write_bytes(b"")
    code, output, heavy, seconds = _probe(module, attr, args, tmp_path)
    assert code != 0 and expect in output, output
    assert heavy == "", f"imported {heavy} before reporting: {output}"
    assert not (tmp_path / "bench").exists()  # no export work started
    assert not (tmp_path / "o").exists()  # a run that never started leaves no output folder (nor a report)
    assert "Traceback" not in output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_trt_run_with_tensorrt_missing_fails_before_torch_and_leaves_no_folder(tmp_path):
    (tmp_path / "in.png").write_bytes(b"")
    code, output, heavy, _ = _probe("dfosd.runtime.cli", "main", ["in.png", "--engines", "nowhere", "--out", "o",
                                                                   "--backend", "tensorrt"], tmp_path)
    assert code == 1 and "backend tensorrt is not usable here" in output and "not installed" in output, output
    assert heavy == "" and not (tmp_path / "o").exists()


def test_readme_step_by_step_export_folder_works_from_the_clone_and_the_package_stays_protected(tmp_path):
    import re

    from click.testing import CliRunner

    from dfosd.core.errors import DfosdError
    from dfosd.export.cli import main
    from dfosd.export.ownership import check_out_folder

    step = re.search(r"^dfosd-export --ckpt lora\.safetensors --tile 32 --out (\S+)", (REPO / "README.md").read_text(),
                     re.M)
    assert step, "the README's step-by-step export line moved"
    check_out_folder(REPO / step[1])  # run where the set-up line leaves you: the clone's root
    run = re.search(r"^dfosd-trt-run photo\.png --engines (\S+)", (REPO / "README.md").read_text(), re.M)
    assert run and run[1] == step[1]
    for inside in (REPO / "engines", REPO / "export" / "x", REPO):
        with pytest.raises(DfosdError, match="dfosd's own package folder"):
            check_out_folder(inside)
    (tmp_path / "lora.safetensors").write_bytes(b"not read")
    r = CliRunner().invoke(main, ["--ckpt", str(tmp_path / "lora.safetensors"), "--out", str(REPO / "engines")])
    assert r.exit_code == 1 and "dfosd's own package folder" in r.output and "--out dfosd-engines" in r.output


def test_export_int8_without_modelopt_says_so_before_loading_anything(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import dfosd.export.artifacts as artifacts
    from dfosd.export.cli import main

    monkeypatch.setitem(sys.modules, "modelopt", None)  # what find_spec sees when it is not installed
    monkeypatch.setattr(artifacts, "export_checkpoint", lambda *a, **k: pytest.fail("export started"))
    (tmp_path / "lora.safetensors").write_bytes(b"not read")
    (tmp_path / "calib").mkdir()
    r = CliRunner().invoke(main, ["--ckpt", str(tmp_path / "lora.safetensors"), "--precision", "int8",
                                  "--calib-data", str(tmp_path / "calib"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "needs NVIDIA ModelOpt" in r.output and "dfosd[quant]" in r.output, r.output


def test_export_ctrl_c_exits_130_like_the_runtime(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import dfosd.export.artifacts as artifacts
    from dfosd.export.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "export_checkpoint", interrupted)
    (tmp_path / "lora.safetensors").write_bytes(b"not read")
    r = CliRunner().invoke(main, ["--ckpt", str(tmp_path / "lora.safetensors"), "--out", str(tmp_path / "e"),
                                  "--backend", "onnxruntime"])
    assert r.exit_code == 130 and "interrupted (SIGINT)" in r.output and "Aborted" not in r.output, r.output


def test_progress_bars_only_on_a_terminal():
    import io

    from dfosd.core.cli_support import progress_bars

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_bars(True, Tty()) and not progress_bars(False, Tty())
    assert not progress_bars(True, io.StringIO())  # a log file or pipe: no carriage returns, no escape codes


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_bench_with_an_unusable_backend_fails_before_exporting(tmp_path):
    code, output, heavy, _ = _probe("dfosd.bench.cli", "main", ["--backends", "tensorrt", "--work", "bench",
                                                                 "--base", "synthetic:tiny"], tmp_path)
    assert code != 0 and "tensorrt" in output and "not installed" in output, output
    assert "torch" not in heavy.split(",") and not (tmp_path / "bench").exists()
