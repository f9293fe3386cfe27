"""Trace one part to ONNX and clean it up.

TorchScript exporter (``dynamo=False``): it is the one ModelOpt's Q/DQ export works
with (see the notes), it exports the tiny models in about a second, and it folds the
constant subgraphs torch can see (time embedding of the fixed timestep, the K/V
projections of the fixed text embedding). onnx-graphsurgeon then removes dead nodes
and, for graphs small enough to fold without exhausting memory, folds what is left.
Weights go to one external-data file once a model passes the 2 GiB protobuf limit.

fp16 is made on the graph, not by tracing a half-precision module: the fp32 graph is
converted with onnxconverter-common, and every node outside the part's network scopes
(``NETWORK_SCOPES``: the VAE/UNet submodules) is kept fp32. That keeps exactly the
islands the notes ask for (uint8 <-> float conversion, bicubic resize, latent scaling,
the x0 step, clamping) in fp32, puts explicit Casts at the borders (a strongly typed
graph for TensorRT), and avoids half-precision convolutions on the CPU, which have no
fast kernels and made a full-size fp16 trace take many minutes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from dfosd.core.contracts import ComponentContract
from dfosd.export.ownership import STAGING_MARK

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# protobuf refuses to serialise a message over 2 GiB; keep a margin for graph overhead.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
FOLD_SIZE_THRESHOLD = 64 << 20


def _initializer_bytes(model) -> int:
    from onnx import numpy_helper  # noqa: F401  (import keeps the onnx dependency explicit)

    total = 0
    for init in model.graph.initializer:
        if init.raw_data:
            total += len(init.raw_data)
        else:
            for ext in init.external_data:
                if ext.key == "length":
                    total += int(ext.value)
    return total


def infer_shapes(model):
    """ONNX shape inference (with data propagation) on a model of any size, in place.

    Inference needs dims and dtypes, not weight bytes, so it runs on a weightless copy of
    the graph (large initializers reduced to name, dtype and dims): a 3.5 GB UNet is
    inferred as a few MB, with no serialisation past protobuf's 2 GiB limit and no second
    copy of the weights (protobuf arenas do not give cleared memory back).
    """
    import onnx

    # The TorchScript exporter leaves value_info entries without shapes; inference keeps
    # them and then cannot resolve the Shape ops that depend on them. Start clean.
    del model.graph.value_info[:]
    light, _ = weightless(model)  # small constants stay: they feed data propagation (shapes, axes)
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _fold_inputs(model) -> set[str]:
    """Initializers that feed a node whose inputs are all constant: the only weights a
    constant fold reads. Every other weight meets an activation first (a Conv, a MatMul)."""
    consts = {i.name for i in model.graph.initializer}
    inits = set(consts)
    needed = set()
    for n in model.graph.node:  # ONNX nodes are topologically sorted
        if n.op_type == "Constant" or (n.input and all(i == "" or i in consts for i in n.input)):
            consts.update(n.output)
            needed.update(i for i in n.input if i in inits)
    return needed


def verbose_logging() -> bool:
    """-v (setup_logging(True)) shows the third-party warnings hidden by default."""
    return logging.getLogger("dfosd").isEnabledFor(logging.DEBUG)


class quiet_onnxruntime:
    """ONNX Runtime's optimizer warnings ("UnsqueezeElimination cannot remove node ...", ten per
    attention block) off while graphsurgeon folds constants with it, unless -v: they are about
    ORT's own graph rewrites of a throwaway session, and not actionable. Errors still show."""

    def __enter__(self):
        self.ort = None
        if not verbose_logging():
            try:
                import onnxruntime

                self.ort = onnxruntime
                onnxruntime.set_default_logger_severity(3)  # ERROR
            except ImportError:
                pass
        return self

    def __exit__(self, *exc):
        if self.ort is not None:
            self.ort.set_default_logger_severity(2)  # ORT's default: WARNING
        return False


def fold_static(model, max_passes: int = 4):
    """Shape inference + constant folding, repeated while it still removes nodes; in place.

    With static input shapes every Shape op, the attention scales and reshape targets,
    and the fixed timestep/embedding branches become constants; each pass can resolve
    what the previous fold exposed (e.g. integer Div of a head count). Folded constants
    larger than 64 MiB are never materialised.

    The fold runs on a skeleton that holds only the weights a fold can read (see
    ``_fold_inputs``); the folded graph is then put back around the original weight
    tensors. Folding the whole model made graphsurgeon copy every weight once per pass:
    the full-size UNet export peaked at 17 GiB in the fold alone (measured); this way the
    weights are never copied.
    """
    import onnx_graphsurgeon as gs

    skeleton, placeholders = weightless(model, keep=_fold_inputs(model), as_inputs=True)
    count = len(skeleton.graph.node)
    for _ in range(max_passes):
        graph = gs.import_onnx(infer_shapes(skeleton))
        with quiet_onnxruntime():
            graph.cleanup().toposort().fold_constants(size_threshold=FOLD_SIZE_THRESHOLD).cleanup().toposort()
        skeleton = gs.export_onnx(graph)
        del graph
        if len(skeleton.graph.node) == count or not any(n.op_type == "Shape" for n in skeleton.graph.node):
            break
        count = len(skeleton.graph.node)
    used = {i for n in skeleton.graph.node for i in n.input}
    return _put_back(model, skeleton, placeholders & used, placeholders)


def network_node(name: str, scopes: tuple[str, ...]) -> bool:
    return any(name.startswith(f"/{s}/") for s in scopes)


def weightless(model, *, keep: frozenset[str] | set[str] = frozenset(), as_inputs: bool = False,
                max_bytes: int = 4096):
    """A copy of ``model`` without the bytes of its large initializers (those over ``max_bytes``
    and not in ``keep``), and their names. Each keeps name, dtype and dims: as a data-less
    initializer, or with ``as_inputs`` as a graph input (a fold then sees a variable, shape
    inference still sees its shape). Built piece by piece: the weights are never copied."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(g, field).extend(getattr(model.graph, field))
    stripped = set()
    for init in model.graph.initializer:
        if init.name in keep or init.ByteSize() <= max_bytes:
            g.initializer.append(init)
            continue
        if as_inputs:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            g.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        stripped.add(init.name)
    return light, stripped


def _put_back(model, light, weights: set[str], placeholders: frozenset[str] | set[str] = frozenset()):
    """Make ``model`` the graph of ``light`` around ``model``'s own tensors named in ``weights``
    (in place, no copy); graph inputs in ``placeholders`` stood for weights and are dropped."""
    g = model.graph
    for field in ("node", "output", "value_info"):
        del getattr(g, field)[:]
        getattr(g, field).extend(getattr(light.graph, field))
    del g.input[:]
    g.input.extend(v for v in light.graph.input if v.name not in placeholders)
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in weights:
            del g.initializer[i]
    g.initializer.extend(i for i in light.graph.initializer if i.name not in weights)  # small and folded ones
    return model


def to_fp16(model, scopes: tuple[str, ...], keep_fp32: frozenset[str] | set[str] = frozenset()):
    """fp16 inside the network scopes, fp32 glue outside, fp32 graph inputs/outputs.

    The converter decides every type on a weightless copy of the graph; the weights it
    chose to make fp16 are then converted in place, one tensor at a time. Run on the full
    model, the converter's copies pushed a full-size fp16 UNet export past 23 GiB (killed
    on our 24 GiB machine); this way the peak is the fp32 weights plus their fp16 copy.
    ``keep_fp32``: network nodes kept in fp32 (the islands of export/fp16_islands.py).
    """
    from onnx import TensorProto, numpy_helper
    from onnxconverter_common import float16

    model = infer_shapes(model)  # the converter decides casts from inferred types
    light, stripped = weightless(model)
    # The converter warns once per tensor it clamps (a real checkpoint: dozens of lines); they are
    # collected into one summary line, and listed with -v.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        light = _convert_graph_fp16(light, scopes, keep_fp32)
        new_types = {i.name: i.data_type for i in light.graph.initializer if i.name in stripped}
        for init in model.graph.initializer:
            if (init.name in stripped and init.data_type == TensorProto.FLOAT
                    and new_types[init.name] == TensorProto.FLOAT16):
                # the converter's own clamping (tiny values -> 1e-7, huge -> 1e4), tensor by tensor
                half = float16.convert_np_to_float16(numpy_helper.to_array(init), 1e-7, 1e4)
                init.ClearField("float_data")
                init.raw_data = half.tobytes()
                init.data_type = TensorProto.FLOAT16
    report_fp16_warnings(caught)
    # the small initializers come from the converted copy, which may have retyped them
    return _put_back(model, light, stripped)


def report_fp16_warnings(caught) -> None:
    """One summary line for the fp16 converter's warnings (values clamped to fp16's range); each with -v."""
    if not caught:
        return
    for w in caught:
        log.debug("fp16 conversion: %s", w.message)
    clamped = sum("truncated" in str(w.message) for w in caught)
    log.warning("fp16 conversion: %d warning(s)%s; -v lists them", len(caught),
                f", {clamped} about values outside fp16's range clamped to [1e-7, 1e4]" if clamped else "")


def _convert_graph_fp16(model, scopes: tuple[str, ...], keep_fp32: frozenset[str] | set[str] = frozenset()):
    """onnxconverter-common's fp16 conversion with dfosd's fp32 islands and border fixes."""
    from onnx import TensorProto
    from onnxconverter_common import float16

    glue = [n.name for n in model.graph.node if not network_node(n.name, scopes) or n.name in keep_fp32]
    io_types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    model = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                             node_block_list=glue)
    # keep_io_types misses outputs whose producer is a blocked (fp32) node and re-declares
    # them fp16; the producing node is fp32 glue, so the original declaration is the truth.
    # It may also have put a Cast-to-fp16 on such an output; drop it and let the fp32
    # producer write the output directly.
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = io_types[v.name]
    outputs = {o.name for o in model.graph.output}
    for cast in [n for n in model.graph.node if n.op_type == "Cast" and n.output[0] in outputs]:
        if any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in cast.attribute) and \
                io_types[cast.output[0]] == TensorProto.FLOAT:
            src = cast.input[0]
            for n in model.graph.node:
                n.output[:] = [cast.output[0] if o == src else o for o in n.output]
                n.input[:] = [cast.output[0] if i == src else i for i in n.input]
            model.graph.node.remove(cast)
    _retarget_network_casts(model, scopes, keep_fp32)
    if keep_fp32:
        from dfosd.export.fp16_islands import bridge_islands

        bridge_islands(model, keep_fp32)
    # The converter retypes Casts but not every inferred value_info; stale entries would
    # contradict the graph, so drop them (runtimes infer intermediate types themselves).
    del model.graph.value_info[:]
    return model


def _retarget_network_casts(model, scopes: tuple[str, ...], keep_fp32: frozenset[str] | set[str] = frozenset()) -> None:
    """Casts to fp32 inside the network (``x.to(query.dtype)`` traced in fp32) mean "to the
    compute dtype": make them fp16, unless fp32 glue or an fp32 island (``keep_fp32``; the
    converter's Casts into an island carry the island's scope in their names) reads them."""
    from onnx import TensorProto

    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    for n in model.graph.node:
        if n.op_type != "Cast" or not network_node(n.name, scopes) or n.output[0] in outputs:
            continue
        if all(network_node(c.name, scopes) and c.name not in keep_fp32 for c in consumers.get(n.output[0], [])):
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16


def _save_with_external_data(model, path: Path, data_name: str, min_bytes: int = 1024) -> None:
    """Save ``model`` with every initializer of ``min_bytes`` or more in one external data
    file ``data_name`` beside ``path`` (the standard ONNX layout: location/offset/length).

    Written tensor by tensor, then the weightless graph: ``onnx.save_model``'s own external
    data path held ~6 GB more than the model itself for the full-size fp16 UNet (measured).
    """
    import onnx
    from onnx import TensorProto

    align = 64  # offsets aligned so runtimes may mmap the weights
    with open(path.parent / data_name, "wb") as f:
        for init in model.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL or not init.HasField("raw_data") or \
                    len(init.raw_data) < min_bytes:
                continue
            offset = -f.tell() % align
            f.write(b"\0" * offset)
            start = f.tell()
            f.write(init.raw_data)
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", data_name), ("offset", str(start)), ("length", str(f.tell() - start))):
                init.external_data.add(key=key, value=value)
    onnx.save_model(model, str(path))


def export_part(module, contract: ComponentContract, onnx_path: Path, *, opset: int = DEFAULT_OPSET,
                precision: str = "fp32", range_inputs: list[dict] | None = None) -> dict:
    """Export the fp32 ``module`` to ``onnx_path`` atomically, converted to ``precision``.

    ``range_inputs`` (fp16): feeds of the range pass that picks the fp32 islands
    (export/fp16_islands.py); without them only weights past fp16's converter limit and the
    base's upcast_attention make islands. Returns facts for the manifest: files written,
    whether external data and folding were used, the fp16 islands.
    """
    import onnx
    import torch

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in onnx_path.parent.glob(f".{onnx_path.stem}.{STAGING_MARK}.*"):  # left by a killed export
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    sample = contract.sample_inputs()
    args = tuple(sample[s.name] for s in contract.inputs)
    with staging_dir(onnx_path) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(), args, str(raw),
                input_names=[s.name for s in contract.inputs],
                output_names=[s.name for s in contract.outputs],
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        model = fold_static(onnx.load(str(raw)))  # load pulls in external data torch wrote
        islands = {}
        if precision == "fp16":
            from dfosd.export.fp16_islands import record_islands

            islands = record_islands(model, module, range_inputs or [])
            model = to_fp16(model, module.NETWORK_SCOPES, {i["node"] for i in islands["fp16_islands"]})
        model.producer_name, model.doc_string = "dfosd", f"dfosd {contract.stem}"
        external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
        data_name = place_onnx(model, onnx_path, Path(tmp), external)
    files = [onnx_path.name] + ([data_name] if external else [])
    return {"files": files, "external_data": data_name if external else None,
            "opset": opset, "precision": precision, "initializer_bytes": _initializer_bytes(model), **islands}


def place_onnx(model, onnx_path: Path, tmp: Path, external: bool) -> str:
    """Save ``model`` in the staging folder ``tmp``, check it, and move it to ``onnx_path``: its
    weights (``external``: in ``<name>.onnx.data``) first, the graph last, so a reader that finds
    the .onnx finds its weights. Returns the data file's name (written only when ``external``)."""
    import onnx

    staged = tmp / onnx_path.name
    data_name = onnx_path.name + ".data"
    if external:
        _save_with_external_data(model, staged, data_name)
    else:
        onnx.save_model(model, str(staged))
    onnx.checker.check_model(str(staged))  # path form: works with external data
    old_data = onnx_path.parent / data_name
    if external:
        os.replace(tmp / data_name, old_data)
    elif old_data.exists():  # this part's own earlier data file (its name is planned by the export)
        old_data.unlink()
    os.replace(staged, onnx_path)
    return data_name


def staging_dir(onnx_path: Path):
    """A temporary folder beside ``onnx_path`` whose name marks it as dfosd's (see export.ownership)."""
    return tempfile.TemporaryDirectory(prefix=f".{onnx_path.stem}.{STAGING_MARK}.", dir=onnx_path.parent)
