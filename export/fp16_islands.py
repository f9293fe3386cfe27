"""fp32 islands of an fp16 export, chosen from measured ranges.

A GPU stores every fp16 tensor as fp16: a value past 65504 becomes Inf, and NaN after the
next normalisation (bench/fp16_storage.py emulates it on a CPU). Before an fp16 conversion
the float graph runs on calibration tiles (ONNX Runtime, CPU, fp32) and every tensor's peak
|x| is recorded. A network node is kept in fp32 (an *island*: the converter puts Casts
around it) when

- one of its float inputs or outputs peaked above ``RANGE_LIMIT`` = 65504 / ``HEADROOM``;
- it reads a weight whose |w| exceeds ``WEIGHT_LIMIT`` (onnxconverter-common would clamp it
  to 1e4: the engine would no longer compute the checkpoint's function);
- the base UNet asks for ``upcast_attention``/``upcast_softmax``: its attention Softmax and
  the MatMul that makes the logits.

``HEADROOM`` = 16 (4 bits): calibration tiles are a sample, and a peak on an unseen photo is
higher than the calibration peak. On the tiny hazard model (tests/export/test_fp16_islands.py)
the held-out photos' peaks (bench.run.BENCH_PHOTOS) exceeded the calibration peaks by at most
1.2x on the tensors past the limit and 1.46x on any tensor (measured on this CPU); 16x leaves
room for real photos with more contrast, and costs nothing on benign models, whose largest
network activations are far below 4094.

Benign models get no island: the conversion is then exactly the one without this pass.
Memory and time: the weights are written once to a temporary file that ONNX Runtime reads, the
export's own copy is released meanwhile and read back after (one copy of the weights in the
process), ONNX Runtime neither pre-packs them nor keeps an arena, and every float tensor gets an
Abs -> ReduceMax whose scalar is a graph output: one fp32 run per calibration feed measures every
tensor. Before the release (and with pre-packing), the full-size UNet's range pass was killed at
22 GB RSS on the 24 GB machine; the bound after it has not been measured at full size yet.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dfosd.export.onnx_export import network_node

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
HEADROOM = 16.0
RANGE_LIMIT = FP16_MAX / HEADROOM
WEIGHT_LIMIT = 1e4  # onnxconverter-common's default max_finite_val: larger weights would be clamped to it
RANGE_TILES = 8  # calibration tiles of the range pass (each part sees them all, in tile-batch feeds)
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
_FLOAT = {1, 10, 11, 16}  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def part_inputs(model, tiles) -> dict[str, Any]:
    """Each part's fp32 input on ``tiles`` (uint8 [N,3,t,t]) through the eager fp32 ``model``, chained."""
    import torch

    from dfosd.core.vocab import COMPONENTS

    x, out = tiles, {}
    with torch.inference_mode():
        for name in COMPONENTS:
            out[name] = x
            y = model.part(name)(x)
            x = y[0] if isinstance(y, tuple) else y
    return out


def batch_feeds(inputs, contract) -> list[dict[str, Any]]:
    """``inputs`` [N,...] cut into the contract's static tile batch (a remainder is dropped)."""
    b, name = contract.batch, contract.inputs[0].name
    return [{name: inputs[i:i + b].numpy()} for i in range(0, inputs.shape[0] - b + 1, b)]


def _float_values(model) -> set[str]:
    """Values that shape inference typed as float32 (the fp32 graph before conversion)."""
    return {v.name for v in list(model.graph.value_info) + list(model.graph.output)
            if v.type.tensor_type.elem_type == 1}


def _weightless_with_file(model, tmp: Path):
    """``model``'s graph with its large weights as external data in one file in ``tmp``, written
    once: each probe of the range pass is then a few-MB graph, not a copy of the weights."""
    from onnx import TensorProto, numpy_helper

    from dfosd.export.onnx_export import weightless

    light, stripped = weightless(model)
    where = {}
    with open(tmp / "weights.bin", "wb") as f:
        for init in model.graph.initializer:
            if init.name in stripped:
                f.write(b"\0" * (-f.tell() % 64))
                start = f.tell()
                f.write(init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes())
                where[init.name] = (start, f.tell() - start)
    for init in light.graph.initializer:
        if init.name in where:
            init.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "weights.bin"), ("offset", str(where[init.name][0])),
                               ("length", str(where[init.name][1]))):
                init.external_data.add(key=key, value=value)
    return light, where


class _weights_on_disk:
    """While ONNX Runtime holds the weights, ``model``'s own copy of them (raw bytes, as written to
    ``weights.bin``) is released and read back afterwards, byte for byte: one copy of the weights
    in the process instead of two (a full-size UNet: 3.5 GB)."""

    def __init__(self, model, tmp: Path, where: dict[str, tuple[int, int]]):
        self.inits = [i for i in model.graph.initializer if i.name in where and i.HasField("raw_data")]
        self.path, self.where = tmp / "weights.bin", where

    def __enter__(self):
        for init in self.inits:
            init.ClearField("raw_data")
        return self

    def __exit__(self, *exc):
        with open(self.path, "rb") as f:
            for init in self.inits:
                start, length = self.where[init.name]
                f.seek(start)
                init.raw_data = f.read(length)
        return False


def measure_peaks(model, feeds: list[dict[str, Any]]) -> dict[str, float]:
    """Peak |x| of every float node output of ``model`` (an fp32 ONNX ModelProto with inferred
    shapes) over ``feeds`` (each: input name -> numpy array), computed in fp32 by ONNX Runtime.

    Each float tensor gets an Abs -> ReduceMax appended and only those scalars are graph
    outputs: one run per feed measures every tensor, and no activation is kept beyond its use."""
    import numpy as np
    import onnx
    from onnx import helper

    floats = _float_values(model)  # once: a set of every value's name
    names = [o for n in model.graph.node for o in n.output if o in floats]
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dfosd-ranges.") as tmp:
        probe, where = _weightless_with_file(model, Path(tmp))
        outs = []
        for i, name in enumerate(names):
            a, m = f"dfosd_range/{i}/abs", f"dfosd_range/{i}/peak"
            probe.graph.node.extend([helper.make_node("Abs", [name], [a], name=f"dfosd_range/{i}/Abs"),
                                     helper.make_node("ReduceMax", [a], [m], name=f"dfosd_range/{i}/ReduceMax",
                                                      keepdims=0)])
            outs.append(m)
        probe.graph.output.extend(helper.make_tensor_value_info(m, onnx.TensorProto.FLOAT, []) for m in outs)
        onnx.save_model(probe, str(Path(tmp) / "probe.onnx"))
        del probe
        with _weights_on_disk(model, Path(tmp), where):
            session = _fp32_session(Path(tmp) / "probe.onnx")
            for feed in feeds:
                for name, value in zip(names, session.run(outs, feed)):
                    peaks[name] = max(peaks.get(name, 0.0), float(value))
            del session
    for feed in feeds:  # graph inputs too: a node reading one sees its range
        for name, value in feed.items():
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                peaks[name] = max(peaks.get(name, 0.0), float(np.abs(value).max()))
    return peaks


def _fp32_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # no fusion: every measured tensor is the traced node's own output, in fp32
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    # memory: no pre-packed second copy of the weights, no arena keeping the largest activations
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def weight_peaks(model) -> dict[str, float]:
    """|w| max of every float initializer larger than ``WEIGHT_LIMIT`` (the ones a conversion would clamp)."""
    import numpy as np
    from onnx import numpy_helper

    out = {}
    for init in model.graph.initializer:
        if init.data_type in _FLOAT:
            peak = float(np.abs(numpy_helper.to_array(init)).max()) if np.prod(init.dims) else 0.0
            if peak > WEIGHT_LIMIT:
                out[init.name] = peak
    return out


def plan_islands(model, peaks: dict[str, float], scopes: tuple[str, ...], *,
                 upcast_attention: bool = False) -> list[dict[str, Any]]:
    """The network nodes to keep in fp32, each with why and the measured peak."""
    weights = weight_peaks(model)
    islands = []
    for node in model.graph.node:
        if not network_node(node.name, scopes):
            continue  # glue is fp32 already
        seen = [(t, peaks[t]) for t in list(node.input) + list(node.output) if t in peaks]
        over = max(seen, key=lambda x: x[1]) if seen else None
        heavy = [(t, weights[t]) for t in node.input if t in weights]
        if heavy:
            name, peak = max(heavy, key=lambda x: x[1])
            islands.append({"node": node.name, "op": node.op_type, "reason": "weight", "tensor": name,
                            "peak": peak})
        elif over is not None and over[1] > RANGE_LIMIT:
            islands.append({"node": node.name, "op": node.op_type, "reason": "range", "tensor": over[0],
                            "peak": over[1]})
    if upcast_attention:
        islands += _attention_islands(model, {i["node"] for i in islands}, scopes)
    return islands


def _attention_islands(model, taken: set[str], scopes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Softmax nodes of the network and the MatMul (through Mul/Add/Div) that makes their logits."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type != "Softmax" or not network_node(node.name, scopes):
            continue
        chain, cur = [node], producer.get(node.input[0])
        while cur is not None and cur.op_type in ("Mul", "Add", "Div"):
            chain.append(cur)
            cur = producer.get(cur.input[0])
        if cur is not None and cur.op_type == "MatMul":
            chain.append(cur)
        out += [{"node": n.name, "op": n.op_type, "reason": "upcast_attention", "tensor": None, "peak": None}
                for n in chain if n.name not in taken]
    return out


def compute_share(model, islands: list[dict[str, Any]], scopes: tuple[str, ...]) -> dict[str, int]:
    """How many of the network's Conv/MatMul/Gemm nodes stay fp16 (the part's compute)."""
    kept = {i["node"] for i in islands}
    net = [n for n in model.graph.node if n.op_type in COMPUTE_OPS
           and network_node(n.name, scopes)]
    return {"fp16": sum(n.name not in kept for n in net), "total": len(net)}


def summary(stem: str, islands: list[dict[str, Any]], share: dict[str, int]) -> str:
    if not islands:
        return (f"{stem}: no fp32 island needed (measured |x| <= {RANGE_LIMIT:.0f} in the network, "
                f"weights <= {WEIGHT_LIMIT:g})")
    top = max((i for i in islands if i["peak"] is not None), key=lambda i: i["peak"], default=None)
    peak = f", largest |x| {top['peak']:.3g} at {top['tensor']}" if top else ""
    reasons = sorted({i["reason"] for i in islands})
    return (f"{stem}: {len(islands)} node(s) kept fp32 ({', '.join(reasons)}{peak}); "
            f"{share['fp16']}/{share['total']} Conv/MatMul/Gemm in fp16")


def record_islands(model, module, range_inputs: list[dict]) -> dict:
    """The manifest's record of the part's fp32 islands (export/fp16_islands.py), measured on ``range_inputs``."""
    import time

    from dfosd.export.onnx_export import infer_shapes

    t0 = time.perf_counter()
    model = infer_shapes(model)
    peaks = measure_peaks(model, range_inputs) if range_inputs else {}
    unet_config = getattr(getattr(module, "unet", None), "config", None)  # a diffusers UNet's (other backbones: none)
    upcast = isinstance(unet_config, Mapping) and bool(unet_config.get("upcast_attention")
                                                       or unet_config.get("upcast_softmax"))
    islands = plan_islands(model, peaks, module.NETWORK_SCOPES, upcast_attention=upcast)
    network = {o for n in model.graph.node if network_node(n.name, module.NETWORK_SCOPES)
               for o in n.output}
    return {"fp16_islands": islands, "fp16_compute": compute_share(model, islands, module.NETWORK_SCOPES),
            "fp16_range": {"feeds": len(range_inputs), "tensors": len(peaks),
                           "network_peak": max((v for k, v in peaks.items() if k in network), default=None),
                           "limit": RANGE_LIMIT, "seconds": round(time.perf_counter() - t0, 2)}}


def bridge_islands(model, keep_fp32: frozenset[str] | set[str]) -> None:
    """The converter casts a blocked node's output to fp16 and casts it back to fp32 for the next
    blocked node: between two islands the value would still be stored in fp16 (and overflow).
    Where an island's output goes through Cast(fp16) -> Cast(fp32), the second Cast's readers
    read the island's fp32 output directly; Casts left without readers go. Only run when there
    are islands, so a graph without them is the converter's own."""
    from onnx import TensorProto

    def cast_to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    rename, dropped = {}, set()
    for down in model.graph.node:
        if cast_to(down) != TensorProto.FLOAT or down.output[0] in outputs:
            continue
        up = producer.get(down.input[0])
        if up is None or cast_to(up) != TensorProto.FLOAT16:
            continue
        source = producer.get(up.input[0])
        if source is None or source.name not in keep_fp32:
            continue
        rename[down.output[0]] = up.input[0]
        dropped.add(down.name)
    for n in model.graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    used = {i for n in model.graph.node if n.name not in dropped for i in n.input} | outputs
    for n in list(model.graph.node):
        if n.name in dropped or (cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in used
                                 and producer.get(n.input[0]) is not None
                                 and producer[n.input[0]].name in keep_fp32):
            model.graph.node.remove(n)
