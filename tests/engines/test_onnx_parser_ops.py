"""TensorRT's ONNX-parser check (engines/onnx_parser_ops.py) on every precision and on bad graphs.

The check runs on the session's tiny exports of every precision (fp32, fp16, int8, fp8: the
shared fixtures, no extra export) and on small hand-made graphs that break one rule each, so a
check that flags nothing cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_OPS = Path(__file__).resolve().parents[2].parent / "shared" / "tensorrt-api" / "onnx-parser-ops-10.1.txt"


@pytest.mark.parametrize("fixture", ["tiny_export_fp32", "tiny_export_fp16", "int8_export", "fp8_export"])
def test_every_precision_passes_the_tensorrt_parser_check(fixture, request):
    import onnx

    from dfosd.core.manifest import ExportDir
    from dfosd.core.vocab import QUANT_PRECISIONS
    from dfosd.engines.onnx_parser_ops import check_export, parser_ops

    export = ExportDir(request.getfixturevalue(fixture))
    problems = check_export(export)
    assert sorted(problems) == sorted(c["onnx"] for c in export.manifest["components"].values())
    assert not any(problems.values()), problems
    used = {n.op_type for f in problems for n in onnx.load(str(export.file(f)), load_external_data=False).graph.node}
    assert used <= parser_ops()
    if export.precision in QUANT_PRECISIONS:  # the Q/DQ rules were exercised, not skipped
        assert {"QuantizeLinear", "DequantizeLinear"} <= used


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


def test_q_dq_tensors_are_checked_once_with_nested_graphs(tmp_path):
    """Q/DQ at the top level beside an If: the nested graphs must not re-check the whole model's
    tensor types without the top level's Q/DQ tensors (that reported false INT8 problems)."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from dfosd.engines.onnx_parser_ops import check_onnx_file

    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["z_b"])], "b", [],
                               [helper.make_tensor_value_info("z_b", T.FLOAT, None)])
    model, _ = _graph([helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["xq"]),
                       helper.make_node("DequantizeLinear", ["xq", "sc", "zp"], ["y"]),
                       helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch)],
                      [("x", T.FLOAT, [1, 3, 8, 8]), ("c", T.BOOL, [])], [("z", T.FLOAT, None)],
                      [numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
                       numpy_helper.from_array(np.array(0, np.int8), "zp")])
    model = onnx.shape_inference.infer_shapes(model)
    path = tmp_path / "nested.onnx"
    onnx.save(model, str(path))
    assert not [p for p in check_onnx_file(path) if "outside Q/DQ" in p]
