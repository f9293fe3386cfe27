"""dfosd-export through click's CliRunner: success, reuse, and the error paths."""

import json

from click.testing import CliRunner

from dfosd.cli import main as dfosd_main
from dfosd.export.cli import main as export_main

from conftest import TILE


def test_export_then_reuse(tiny_ckpt, tmp_path):
    out = tmp_path / "eng"
    args = ["--ckpt", str(tiny_ckpt), "--precision", "fp32", "--tile", str(TILE), "--out", str(out)]
    r = CliRunner().invoke(export_main, args)
    assert r.exit_code == 0, r.output
    assert "auto picked onnxruntime" in r.output and "base: synthetic:tiny (from the checkpoint" in r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["precision"] == "fp32" and len(man["components"]) == 3
    r2 = CliRunner().invoke(export_main, args)
    assert r2.exit_code == 0 and "reusing" in r2.output


def test_group_runs_export_with_precision_auto(tiny_ckpt, tmp_path):
    """Issue 12.15: no --precision: auto picks what the chosen backend runs fast and says why
    (fp32 for ONNX Runtime on a CPU, fp16 on CUDA)."""
    from dfosd.engines.base import select_backend

    backend_cls, _ = select_backend("auto")
    device = backend_cls().device if backend_cls.name != "tensorrt" else "cuda"
    want = "fp16" if device == "cuda" else "fp32"
    r = CliRunner().invoke(dfosd_main, ["export", "--ckpt", str(tiny_ckpt), "--tile", str(TILE), "--out",
                                        str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert f"precision auto: {want}, because {backend_cls.name} runs on" in r.output
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["precision"] == want


def test_auto_precision_per_backend():
    from dfosd.engines.base import auto_precision, backend_class

    assert auto_precision(backend_class("tensorrt"))[0] == "fp16"  # the class imports without TensorRT
    ort = backend_class("onnxruntime")
    precision, why = auto_precision(ort)
    assert (precision, "CPU" in why) == (("fp32", True) if ort().device == "cpu" else ("fp16", False))
    assert auto_precision(backend_class("openvino-bf16"))[0] == "fp32"  # bf16 compute of the fp32 graph


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    r = CliRunner().invoke(export_main, ["--ckpt", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 1
    assert "nope.safetensors does not exist" in r.output and "Traceback" not in r.output


def test_checkpoint_base_mismatch(tiny_ckpt, tmp_path):
    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import write_random_checkpoint

    # a checkpoint built for another embedding width than the tiny base's 32
    base = load_base("synthetic:tiny")
    base.unet.register_to_config(cross_attention_dim=48)
    bad = write_random_checkpoint(tmp_path / "w.safetensors", base)
    r = CliRunner().invoke(export_main, ["--ckpt", str(bad), "--base", "synthetic:tiny", "--tile", str(TILE),
                                         "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "cross_attention_dim is 32" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_bad_options(tiny_ckpt, tmp_path):
    cases = [
        (["--precision", "int4"], "Invalid value for '--precision'"),
        (["--batch", "1,x"], "not a comma-separated list"),
        (["--batch", "0"], "tile batches must be integers >= 1"),
        (["--base", "synthetic:huge"], "unknown synthetic base"),
        (["--base", "./no/such/dir"], "does not exist"),
        (["--backend", "tensorrt"], "not usable here"),
    ]
    for extra, expect in cases:
        r = CliRunner().invoke(export_main, ["--ckpt", str(tiny_ckpt), "--tile", str(TILE),
                                             "--out", str(tmp_path / "e"), *extra])
        assert r.exit_code != 0, extra
        assert expect in r.output, (extra, r.output)
        assert "Traceback" not in r.output


def test_unreachable_hub_names_the_fix(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = CliRunner().invoke(export_main, ["--ckpt", str(tiny_ckpt), "--base", "stabilityai/stable-diffusion-2-1-base",
                                         "--out", str(tmp_path / "e")])
    assert r.exit_code == 1
    assert "could not fetch base" in r.output and "pass the local folder" in r.output
