"""`dfosd verify`: TensorRT's ONNX-parser check on every precision, and Polygraphy's comparator.

The parser check runs on the session's tiny exports of every precision (fp32, fp16, int8,
fp8), and on small hand-made graphs that break one rule each, so a check that flags
nothing cannot pass. The comparison runs ONNX Runtime against the eager PyTorch parts
(TensorRT is not installable here) through Polygraphy, on the tiny fp32/fp16 exports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

SHARED_OPS = Path(__file__).resolve().parents[1].parent / "shared" / "tensorrt-api" / "onnx-parser-ops-10.1.txt"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _verify(*args):
    from dfosd.bench.verify import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("fixture", ["tiny_export_fp32", "tiny_export_fp16", "int8_export", "fp8_export"])
def test_every_precision_passes_the_tensorrt_parser_check(fixture, request):
    from dfosd.bench.verify import check_tensorrt_ops, open_export
    from dfosd.engines.onnx_parser_ops import parser_ops

    export_dir, manifest = open_export(request.getfixturevalue(fixture))
    ops = check_tensorrt_ops(export_dir, manifest)
    assert ops["passed"], ops["files"]
    assert sorted(ops["files"]) == sorted(c["onnx"] for c in manifest["components"].values())
    if manifest["precision"] in ("int8", "fp8"):  # the Q/DQ rules were exercised, not skipped
        import onnx

        used = {n.op_type for f in ops["files"] for n in onnx.load(str(export_dir / f), load_external_data=False).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= used <= parser_ops()


def test_parser_op_list_ships_with_dfosd_and_matches_shared():
    from dfosd.engines.onnx_parser_ops import PARSER_OPS_FILE, parser_ops

    assert {"Conv", "Resize", "QuantizeLinear", "GroupNormalization"} <= parser_ops()
    assert "Col2Im" not in parser_ops() and "STFT" not in parser_ops()
    if SHARED_OPS.is_file():
        assert PARSER_OPS_FILE.read_text() == SHARED_OPS.read_text()


def _graph(nodes, inputs, outputs, initializers=(), opset=17):
    from onnx import TensorProto as T
    from onnx import helper

    def vi(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    g = helper.make_graph(nodes, "g", [vi(*i) for i in inputs], [vi(*o) for o in outputs], list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), T


def _bad_graph(case):
    """A small graph that TensorRT's parser refuses for one reason (``case``)."""
    import numpy as np
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    x = ("x", T.FLOAT, [1, 3, 8, 8])
    w = numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w")
    if case == "op":
        return _graph([helper.make_node("Col2Im", ["x", "s", "b"], ["y"])], [x], [("y", T.FLOAT, None)],
                      [numpy_helper.from_array(np.array([8, 8]), "s"), numpy_helper.from_array(np.array([1, 1]), "b")])
    if case == "domain":
        return _graph([helper.make_node("Relu", ["x"], ["y"], domain="com.example")], [x], [("y", T.FLOAT, None)])
    if case == "opset":
        return _graph([helper.make_node("Relu", ["x"], ["y"])], [x], [("y", T.FLOAT, None)], opset=21)
    if case == "uint8":
        return _graph([helper.make_node("Cast", ["x"], ["u"], to=T.UINT8), helper.make_node("Cast", ["u"], ["y"], to=T.FLOAT)],
                      [x], [("y", T.FLOAT, None)])
    if case == "int8":
        return _graph([helper.make_node("Cast", ["x"], ["y"], to=T.INT8)], [x], [("y", T.INT8, None)])
    if case == "zero-point":
        return _graph([helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["q"]),
                       helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["y"])], [x], [("y", T.FLOAT, None)],
                      [numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
                       numpy_helper.from_array(np.array(3, np.int8), "zp")])
    if case == "resize":
        return _graph([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic", antialias=1)], [x],
                      [("y", T.FLOAT, None)], [numpy_helper.from_array(np.array([1, 2, 2, 2], np.float32), "sc")])
    if case == "conv-weights":
        return _graph([helper.make_node("Relu", ["w"], ["w2"]), helper.make_node("Conv", ["x", "w2"], ["y"])], [x],
                      [("y", T.FLOAT, None)], [w])
    if case == "axes":
        return _graph([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "i0", "i1"], ["ax"]),
                       helper.make_node("Unsqueeze", ["x", "ax"], ["y"])], [x], [("y", T.FLOAT, None)],
                      [numpy_helper.from_array(np.array([0]), "i0"), numpy_helper.from_array(np.array([1]), "i1")])
    raise KeyError(case)


@pytest.mark.parametrize("case,expected", [
    ("op", "no importer for Col2Im"), ("domain", "custom domain 'com.example'"), ("opset", "opset 21"),
    ("uint8", "casts to UINT8 inside the graph"), ("int8", "casts to INT8"), ("zero-point", "zero point is not 0"),
    ("resize", "antialias"), ("conv-weights", "weights w2 are computed"), ("axes", "input 1 (ax) must be a constant"),
])
def test_parser_check_flags_what_tensorrt_refuses(case, expected, tmp_path):
    import onnx

    from dfosd.engines.onnx_parser_ops import check_onnx_file

    model, _ = _bad_graph(case)
    path = tmp_path / f"{case}.onnx"
    onnx.save(model, str(path))
    problems = check_onnx_file(path)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith(f"{case}.onnx: ") for p in problems)
    if case == "resize":
        assert any("cubic resize scales an axis before the last 2" in p for p in problems), problems


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
