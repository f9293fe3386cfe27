"""ONNX export of a quantized part: QuantizeLinear/DequantizeLinear graphs.

The tracing, clean-up, folding and atomic write are ``export.onnx_export.export_part``'s
(TorchScript exporter, ``dynamo=False``: the dynamo exporter fails on ModelOpt quantizers).
Folding never touches Q/DQ nodes (onnx-graphsurgeon leaves them), so weights keep their
Q/DQ pair, which is what TensorRT needs to pick 8-bit kernels.

INT8 comes out as standard ONNX Q/DQ (per-channel weights need opset >= 13; fp16 scales
need opset 19). ModelOpt writes FP8 as TensorRT custom ops (``trt::TRT_FP8QuantizeLinear``);
they are rewritten here to the standard opset-19 QuantizeLinear/DequantizeLinear with a
FLOAT8E4M3FN zero point, which TensorRT's ONNX parser reads as FP8 and ONNX Runtime's CPU
provider can run, then the graph is folded (the first fold could not evaluate the custom ops).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError
from dfosd.export.onnx_export import FOLD_SIZE_THRESHOLD, export_part, place_onnx, staging_dir

FP8_MIN_OPSET = 19
FP8_ZERO_POINT = "dfosd_fp8_zero_point"
_TRT_FP8_OPS = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}


@contextlib.contextmanager
def _quiet_graphsurgeon():
    """onnx-graphsurgeon warns about what it cannot fold (custom ops, FP8 constants): expected here."""
    from onnx_graphsurgeon.logger import G_LOGGER

    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = old


def fp8_ops_to_standard(model) -> int:
    """Rewrite ModelOpt's TRT_FP8 Q/DQ custom ops to standard ONNX ops, in place; returns the count."""
    import onnx

    count = 0
    q_outputs = set()
    for node in model.graph.node:
        if node.domain == "trt" and node.op_type in _TRT_FP8_OPS:
            node.domain, node.op_type = "", _TRT_FP8_OPS[node.op_type]
            if len(node.input) == 2:
                node.input.append(FP8_ZERO_POINT)
            if node.op_type == "QuantizeLinear":
                q_outputs.add(node.output[0])
            count += 1
    if not count:
        return 0
    model.graph.initializer.append(onnx.helper.make_tensor(FP8_ZERO_POINT, onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
    for vi in model.graph.value_info:  # torch declared the custom op's output as uint8
        if vi.name in q_outputs:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT8E4M3FN
    if any(n.domain == "trt" for n in model.graph.node):
        left = sorted({n.op_type for n in model.graph.node if n.domain == "trt"})
        raise DfosdError(f"the FP8 export holds TensorRT custom ops dfosd cannot convert: {', '.join(left)}",
                         hint="use --precision int8, or the ModelOpt version in dfosd[quant]")
    opsets = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return count


def _rewrite_fp8(onnx_path: Path, external_data: str | None) -> int:
    """Standardize an exported FP8 file in place (atomically, keeping its external-data layout)."""
    import onnx
    import onnx_graphsurgeon as gs

    model = onnx.load(str(onnx_path))
    count = fp8_ops_to_standard(model)
    if not count:
        return 0
    with _quiet_graphsurgeon():  # fold what export_part could not evaluate with the custom ops in
        graph = gs.import_onnx(model)
        graph.fold_constants(size_threshold=FOLD_SIZE_THRESHOLD).cleanup().toposort()
        folded = gs.export_onnx(graph)
    folded.producer_name, folded.doc_string = model.producer_name, model.doc_string
    model = folded
    with staging_dir(onnx_path) as tmp:  # the same layout and order as export_part's
        place_onnx(model, onnx_path, Path(tmp), external=bool(external_data))
    return count


def qdq_stats(onnx_path: str | Path) -> dict[str, Any]:
    """Q/DQ facts of an ONNX file (graph only; weights are not loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    per_channel = sum(1 for n in dq if n.input[1] in inits and len(inits[n.input[1]].dims) == 1
                      and inits[n.input[1]].dims[0] > 1)
    zero_types = sorted({onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type)
                         for n in q if len(n.input) > 2 and n.input[2] in inits})
    return {"quantize_linear": len(q), "dequantize_linear": len(dq), "per_channel_dequantize": per_channel,
            "zero_point_types": zero_types, "custom_ops": sorted({n.op_type for n in model.graph.node if n.domain})}


def export_quantized_part(module, contract: ComponentContract, onnx_path: str | Path, *, opset: int,
                          precision: str) -> dict[str, Any]:
    """Export a ModelOpt-quantized part to a Q/DQ ONNX file; returns export_part's facts plus Q/DQ stats."""
    onnx_path = Path(onnx_path)
    if precision == "fp8" and opset < FP8_MIN_OPSET:
        raise DfosdError(f"FP8 Q/DQ needs ONNX opset >= {FP8_MIN_OPSET} (got {opset})",
                         hint=f"pass --opset {FP8_MIN_OPSET} or leave --opset unset")
    # The module is already in the export's float precision (calibration.quantize.for_export):
    # export_part traces it as it is, without its fp32 -> fp16 graph conversion.
    with _quiet_graphsurgeon() if precision == "fp8" else contextlib.nullcontext():
        info = export_part(module, contract, onnx_path, opset=opset)
    info["precision"] = precision
    if precision == "fp8":
        info["fp8_ops_standardized"] = _rewrite_fp8(onnx_path, info["external_data"])
    info["qdq"] = qdq_stats(onnx_path)
    if not info["qdq"]["quantize_linear"]:
        raise DfosdError(f"{contract.stem}: the {precision} export holds no QuantizeLinear node",
                         hint="the part's quantizers were all disabled: check the quantizer summary above")
    return info
