"""`dfosd verify`: the parser check and Polygraphy's comparator, through the command line.

The comparison runs ONNX Runtime against the eager PyTorch parts (TensorRT is not
installable here) through Polygraphy, on the session's tiny fp32/fp16 exports. The parser
check itself is tested in tests/engines/test_onnx_parser_ops.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _verify(*args):
    from dfosd.bench.verify import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_verify_fp32_against_eager_passes_with_polygraphys_report(tiny_export_fp32, tmp_path):
    report_path = tmp_path / "verify.json"
    r = _verify(tiny_export_fp32, "--batch", "1", "--against", "eager", "--report", report_path)
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output and "Accuracy Summary" in r.output  # Polygraphy's own report
    report = json.loads(report_path.read_text())
    comp = report["comparison"]
    assert report["passed"] and comp["reference"] == "eager" and report["tensorrt_ops"]["passed"]
    assert [p["stem"] for p in comp["parts"]] == ["encoder_b1", "unet_b1", "decoder_b1"]
    latent = comp["parts"][1]["outputs"]["denoised_latent"]
    assert 0 < latent["max_absdiff"] < 1e-3  # two real implementations: close, not bit-identical
    image = comp["parts"][2]["outputs"]["sr_image"]
    assert image["max_absdiff"] <= 2 and comp["parts"][2]["tolerances"]["sr_image"]["stat"] == "max"


def test_verify_exit_code_tells_a_failed_comparison(tiny_export_fp16):
    # fp16 against eager fp32 cannot meet a zero tolerance on the maximum error.
    r = _verify(tiny_export_fp16, "--against", "eager", "--atol", "0", "--rtol", "0", "--check-error-stat", "max", "-q")
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output.splitlines()[-1]
    assert "[E] Accuracy Summary" in r.output  # Polygraphy reports the failure, even with --quiet,
    assert "Activating and starting inference" not in r.output  # but not its progress


def test_verify_refuses_what_it_cannot_verify(tiny_export_fp32, tiny_base, tmp_path):
    from dfosd.core.checkpoint import write_random_checkpoint

    r = _verify(tmp_path)
    assert r.exit_code == 2 and "manifest.json" in r.output
    if importlib.util.find_spec("tensorrt") is None:
        r = _verify(tiny_export_fp32, "--against", "tensorrt")
        assert r.exit_code == 2 and "tensorrt package does not import" in r.output
    copy = Path(shutil.copytree(tiny_export_fp32, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    # the manifest names a checkpoint whose bytes are not the ones exported
    manifest["inputs"]["checkpoint"] = str(write_random_checkpoint(tmp_path / "moved.safetensors", tiny_base, seed=7))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    r = _verify(copy, "--against", "eager", "--batch", "1")
    assert r.exit_code == 2 and "moved.safetensors changed since" in r.output, r.output
    r = _verify(copy, "--against", "eager", "--batch", "3")
    assert r.exit_code == 2 and "no tile batch 3" in r.output, r.output
    assert _verify(copy, "--tensorrt-ops-only").exit_code == 0  # no model needed for the parser check
    (copy / "unet_b1.onnx").write_bytes(b"not the exported graph")
    r = _verify(copy, "--tensorrt-ops-only")
    assert r.exit_code == 2 and "unet_b1.onnx" in r.output and "changed since export" in r.output
