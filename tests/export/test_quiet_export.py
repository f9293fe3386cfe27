"""Issue 12.14: quiet by default. ONNX Runtime's optimizer warnings (printed by its C++ logger
while graphsurgeon folds constants) and the fp16 converter's per-tensor warnings are hidden
unless -v; the fp16 ones leave one summary line."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

EXPORT_ENCODER = """
from pathlib import Path
from dfosd.core.bases import load_base
from dfosd.core.cli_support import setup_logging
from dfosd.core.contracts import Geometry, component_contracts
from dfosd.core.onestep import build_from_model
from dfosd.core.readers import read_model
from dfosd.export.onnx_export import export_part
setup_logging({verbose})
base = load_base("synthetic:tiny")
geo = Geometry(tile=32, batch=1, upscale=4, vae_scale_factor=base.vae_scale_factor,
               latent_channels=base.latent_channels)
model = build_from_model(base, read_model({ckpt!r}))
export_part(model.part("encoder"), component_contracts(geo)["encoder"], Path({out!r}) / "encoder_b1.onnx")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_onnxruntime_fold_warnings_only_with_verbose(tiny_ckpt, tmp_path, verbose):
    # Folding the tiny VAE encoder's attention makes ORT warn "UnsqueezeElimination cannot remove
    # node" ten times; ORT writes from C++ to the process's stderr, hence a subprocess.
    script = EXPORT_ENCODER.format(verbose=verbose, ckpt=str(tiny_ckpt), out=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ort_lines = [ln for ln in out.stderr.splitlines() if "W:onnxruntime" in ln]
    assert bool(ort_lines) == verbose, out.stderr[-2000:]
    assert (tmp_path / "encoder_b1.onnx").is_file()


def _model_with_out_of_range_weights():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((4, 4), 0.5, np.float32)
    w[0, 0], w[1, 1], w[2, 2] = 1e-9, 1e6, -1e6  # below fp16's smallest normal, above its max
    # large enough (> 4 KiB) to go through the tensor-by-tensor path of to_fp16, too
    big = np.full((64, 32), 0.25, np.float32)
    big[0, 0] = 3e-9
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="/unet/mm"),
             helper.make_node("MatMul", ["y2", "big"], ["z"], name="/unet/mm2"),
             helper.make_node("Reshape", ["y", "shape"], ["y2"], name="/unet/reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(big, "big"),
                               numpy_helper.from_array(np.array([1, 64], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_clamping_warnings_are_one_summary_line(caplog):
    from dfosd.export.onnx_export import to_fp16

    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING, logger="dfosd"):
            to_fp16(_model_with_out_of_range_weights(), ("unet",))
    assert not [w for w in escaped if "truncated" in str(w.message)], [str(w.message) for w in escaped]
    lines = [r for r in caplog.records if r.name.startswith("dfosd.export")]
    assert len(lines) == 1 and "values outside fp16's range" in lines[0].getMessage(), lines
    assert "-v lists them" in lines[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="dfosd"):
        to_fp16(_model_with_out_of_range_weights(), ("unet",))
    detail = [r for r in caplog.records if r.levelno == logging.DEBUG and "truncated" in r.getMessage()]
    assert len(detail) >= 3, [r.getMessage() for r in caplog.records]  # -v: each one
