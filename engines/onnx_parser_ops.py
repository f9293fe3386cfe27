"""Would TensorRT's ONNX parser take these graphs? A static check, no TensorRT needed.

TensorRT cannot be installed on most machines dfosd exports on, and a graph the parser
refuses is found only when an engine is built on the GPU machine. This check reads each
exported ONNX graph (without its weights) and compares it with what the parser accepts:

- every operator has an importer in TensorRT's ONNX parser (``data/onnx-parser-ops-10.1.txt``:
  the ``DEFINE_BUILTIN_OP_IMPORTER`` names of onnx-tensorrt 10.1-GA; later parsers are
  supersets in practice), in the default ONNX domain, nested graphs included;
- the opset is one TensorRT 10's parser reads (9..20);
- UINT8 only at the graph's edge (a network input or output); INT8, INT4 and FP8 only as
  Q/DQ (``QuantizeLinear`` outputs, ``DequantizeLinear`` inputs), never as plain tensors;
- Q/DQ zero points are 0; Resize uses nearest/linear/cubic, no antialias, and scales only
  the last two (cubic) or three (linear) axes; Conv/ConvTranspose weights are constants (or
  a Q/DQ of one); the ``axes``/``pads`` inputs of Pad, Slice, Squeeze and
  Unsqueeze are constants.

Facts from ``shared/tensorrt-api/README.md`` (read from the parser's source and docs).
An op inside the list can still be refused for other attributes or types: this is a
red-flag check, the engine build remains the proof.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dfosd.core.manifest import ExportDir

PARSER_OPS_FILE = Path(__file__).resolve().parent / "data" / "onnx-parser-ops-10.1.txt"
OPSET_RANGE = (9, 20)
DEFAULT_DOMAINS = ("", "ai.onnx")
# Types the parser takes only as Q/DQ ("quantized types"), by ONNX TensorProto name.
QUANTIZED_TYPES = ("INT8", "INT4", "UINT4", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
RESIZE_MODES = ("nearest", "linear", "cubic")
Q_DQ = ("QuantizeLinear", "DequantizeLinear")
# op -> input indices that must be constants (axes / pads, as the parser reads them at import).
CONSTANT_INPUTS = {"Pad": (1, 3), "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,)}


@lru_cache(maxsize=1)
def parser_ops() -> frozenset[str]:
    if not PARSER_OPS_FILE.is_file():  # part of the package: a broken install, not a user error
        raise FileNotFoundError(f"{PARSER_OPS_FILE}: TensorRT's ONNX parser op list is missing from dfosd")
    return frozenset(ln.strip() for ln in PARSER_OPS_FILE.read_text().splitlines() if ln.strip())


def _constants(graph) -> dict[str, object]:
    """Initializers and Constant-node outputs by name: the array when it is inline, else None."""
    from onnx import numpy_helper

    out: dict[str, object] = {}
    for init in graph.initializer:
        out[init.name] = None if init.data_location == init.EXTERNAL else numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            out[node.output[0]] = None if value is None else numpy_helper.to_array(value)
    return out


def _tensor_types(model) -> dict[str, int]:
    """Element type of every tensor the graph declares or shape inference can tell."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a help here, not a requirement
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.value_info, *g.input, *g.output)
             if vi.type.HasField("tensor_type")}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _check_graph(graph, consts, types, edge, problems, where, qdq_ok: set | None = None) -> None:
    """``types`` holds every tensor of the model, nested graphs' included: they are checked once, by
    the top-level call, after the nested graphs added their Q/DQ tensors to ``qdq_ok``."""
    import numpy as np
    import onnx

    ops = parser_ops()
    tp = onnx.TensorProto
    quantized = {getattr(tp, t) for t in QUANTIZED_TYPES if hasattr(tp, t)}
    top = qdq_ok is None
    qdq_ok = set() if top else qdq_ok  # tensors allowed a quantized type: Q outputs, DQ inputs
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            qdq_ok.update(node.output)
            qdq_ok.update(node.input[2:3])  # a UINT8 zero point is read as INT8
        if node.op_type == "DequantizeLinear":
            qdq_ok.update(node.input)
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        label = f"{where}node {node.name or '?'} ({node.op_type})"
        if node.domain not in DEFAULT_DOMAINS:
            problems.append(f"{label}: custom domain {node.domain!r} has no importer in TensorRT's parser")
        elif node.op_type not in ops:
            problems.append(f"{label}: no importer for {node.op_type} in TensorRT's ONNX parser")
        for a in node.attribute:  # nested graphs (If, Loop, Scan)
            for sub in ([a.g] if a.type == a.GRAPH else list(a.graphs) if a.type == a.GRAPHS else []):
                _check_graph(sub, {**consts, **_constants(sub)}, types, edge, problems, f"{label} > ", qdq_ok)
        if node.op_type == "Cast":
            to = _attr(node, "to")
            if to == tp.UINT8 and not set(node.output) <= edge:
                problems.append(f"{label}: casts to UINT8 inside the graph (UINT8 only as network input/output)")
            if to in quantized:
                problems.append(f"{label}: casts to {tp.DataType.Name(to)} (quantized types only through Q/DQ)")
        if node.op_type in Q_DQ and len(node.input) > 2 and node.input[2]:
            zp = consts.get(node.input[2])
            if node.input[2] not in consts:
                problems.append(f"{label}: zero point {node.input[2]} is not a constant")
            elif zp is not None and np.any(np.asarray(zp).astype(np.float32) != 0):
                problems.append(f"{label}: zero point is not 0 (TensorRT takes symmetric quantization only)")
        if node.op_type == "Resize":
            _check_resize(node, label, consts, problems)
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = node.input[1]
            src = w
            while src not in consts and src in producers and producers[src].op_type in Q_DQ:
                src = producers[src].input[0]  # weight -> [QuantizeLinear ->] DequantizeLinear -> Conv
            if src not in consts:
                problems.append(f"{label}: weights {w} are computed, not an initializer (or a Q/DQ of one)")
        for i in CONSTANT_INPUTS.get(node.op_type, ()):
            if len(node.input) > i and node.input[i] and node.input[i] not in consts:
                problems.append(f"{label}: input {i} ({node.input[i]}) must be a constant for TensorRT's importer")
    if not top:
        return
    for name, t in types.items():
        if t == tp.UINT8 and name not in edge and name not in qdq_ok:
            problems.append(f"{where}tensor {name}: UINT8 inside the graph (only as network input/output)")
        elif t in quantized and name not in qdq_ok:
            problems.append(f"{where}tensor {name}: {tp.DataType.Name(t)} outside Q/DQ")


def _check_resize(node, label, consts, problems) -> None:
    import numpy as np

    mode = _attr(node, "mode", "nearest")
    if mode not in RESIZE_MODES:
        problems.append(f"{label}: mode {mode!r} (TensorRT: {', '.join(RESIZE_MODES)})")
    if _attr(node, "antialias", 0):
        problems.append(f"{label}: antialias is not supported")
    if len(node.input) > 2 and node.input[2]:
        scales = consts.get(node.input[2], "computed")
        if isinstance(scales, str):
            return  # a computed scale: the parser then needs all axes, which it checks itself
        if scales is not None and mode in ("cubic", "linear"):
            free = 2 if mode == "cubic" else 3
            fixed = np.asarray(scales, dtype=np.float64)[:-free]
            if np.any(fixed != 1):
                problems.append(f"{label}: {mode} resize scales an axis before the last {free} ({list(scales)})")


def check_onnx_file(path: str | Path) -> list[str]:
    """Problems TensorRT's ONNX parser would have with one graph ([] when none)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)  # weights are not needed: names, types, attributes
    problems: list[str] = []
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS and not OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]:
            problems.append(f"opset {imp.version}: TensorRT 10's parser reads opsets {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    g = model.graph
    edge = {v.name for v in (*g.input, *g.output)}
    _check_graph(g, _constants(g), _tensor_types(model), edge, problems, "")
    return [f"{path.name}: {p}" for p in problems]


def check_export(export: "ExportDir") -> dict[str, list[str]]:
    """Problems per ONNX graph of an export directory (every part of every tile batch)."""
    names = sorted(entry["onnx"] for entry in export.components.values())
    return {name: check_onnx_file(export.file(name)) for name in names}
