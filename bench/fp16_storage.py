"""fp16 storage semantics on a CPU: run exported parts as a GPU stores their tensors, and compare with fp32.

ONNX Runtime's CPU provider has fp16 kernels for few operators. For the others it puts
Cast(fp16->fp32) before and Cast(fp32->fp16) after the node; at its default optimisation
level the optimiser then removes the back-to-back cast pairs, so whole chains of "fp16"
nodes run in fp32 and never overflow (see shared notes, numerics.md). With
``graph_optimization_level = ORT_DISABLE_ALL`` the inserted casts stay: every fp16 tensor is
rounded to fp16 between nodes, as TensorRT or ONNX Runtime CUDA store it. A value past
65504 then becomes Inf, and NaN downstream, as on a GPU.

What it does not emulate: a GPU kernel's accumulation order and its fused kernels (TensorRT's
fused attention keeps the softmax in fp32 internally, a fused GroupNorm may accumulate in
fp32): it is a conservative check, an fp16 export that passes here should not overflow on a
GPU for these inputs; one that fails here may still work on some GPU kernels.

Each part is run on the fp32 reference's own inputs (so its error is its own) and the whole
chain on the emulated parts' outputs; both against the eager fp32 model on held-out photos
(``bench.run.BENCH_PHOTOS``, never the calibration photos). Where a part's output is not
finite, the first non-finite tensor in the graph's node order is named: the graph's node
outputs are exposed as outputs, ``SCAN_CHUNK`` at a time (memory: the part's own activations
plus at most that many intermediate tensors), and the first chunk holding one is reported.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from dfosd.core.manifest import ExportDir

SCAN_CHUNK = 64  # intermediate tensors exposed per run while looking for the first non-finite one
DEFAULT_MIN_PSNR = 40.0  # dB of the whole chain's image against fp32 (README: fp16 storage check)


def storage_session(onnx_path: str | Path):
    """An ONNX Runtime CPU session that keeps every inserted Cast (fp16 tensors stored as fp16)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so,
                                providers=["CPUExecutionProvider"])


def psnr(reference, got, peak: float | None = None) -> float:
    """PSNR in dB of ``got`` against ``reference``; ``peak``: 255 for images, else the reference's range.
    Inf where they agree exactly, NaN where ``got`` is not finite."""
    import numpy as np

    ref, out = np.asarray(reference, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if not np.isfinite(out).all():
        return float("nan")
    peak = float(ref.max() - ref.min()) if peak is None else peak
    mse = float(np.mean((ref - out) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(max(peak, 1e-12) ** 2 / mse)


def _finite(x) -> bool:
    import numpy as np

    return not np.issubdtype(x.dtype, np.floating) or bool(np.isfinite(x).all())


def first_nonfinite(onnx_path: Path, feed: dict[str, Any]) -> str | None:
    """Name of the first node output (graph order) that is not finite under storage semantics, or None.

    The graph (without its weights) gets ``SCAN_CHUNK`` node outputs at a time as extra graph
    outputs; external weights are reached through a link beside the modified graph in a
    temporary folder (nothing is written into the export)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = [o for n in model.graph.node for o in n.output if o]
    declared = {o.name for o in model.graph.output}
    data = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    with tempfile.TemporaryDirectory(prefix="dfosd-fp16-scan.") as tmp:
        for name in data:
            (Path(tmp) / name).symlink_to(Path(onnx_path).resolve().parent / name)
        for start in range(0, len(names), SCAN_CHUNK):
            chunk = [n for n in names[start:start + SCAN_CHUNK] if n not in declared]
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
            probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in chunk)
            path = Path(tmp) / "probe.onnx"
            onnx.save_model(probe, str(path))
            outs = storage_session(path).run(chunk, feed)
            for name, value in zip(chunk, outs):
                if not _finite(value):
                    return name
    return None


def eager_parts(model, tiles) -> dict[str, dict[str, Any]]:
    """The fp32 eager model's inputs and outputs of each part on ``tiles`` (numpy), chained."""
    import torch

    from dfosd.core.vocab import COMPONENTS

    x, io = tiles, {}
    with torch.inference_mode():
        for name in COMPONENTS:
            out = model.part(name)(x)
            outs = out if isinstance(out, tuple) else (out,)
            io[name] = {"input": x.numpy(), "outputs": [o.numpy() for o in outs]}
            x = outs[0]
    return io


def _row(part: str, precision: str, feed_kind: str, ref, got, peak: float | None, scan: Callable[[], str | None],
         flag=None) -> dict:
    import numpy as np

    finite = _finite(got) and (flag is None or not bool(np.asarray(flag).any()))
    err = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    return {"part": part, "precision": precision, "inputs": feed_kind, "psnr_db": psnr(ref, got, peak),
            "max_abs_error": float(np.nanmax(err)) if np.isfinite(err).any() else float("nan"),
            "finite": finite, "first_nonfinite": None if finite else scan()}


def storage_report(export: "ExportDir", model, tiles, *, batch: int | None = None,
                   min_psnr: float = DEFAULT_MIN_PSNR, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every part of one tile batch under fp16 storage semantics against the eager fp32 ``model`` on
    ``tiles`` (uint8 [n,3,t,t], n = the batch), per part and as a chain."""
    from dfosd.core.vocab import COMPONENTS

    batch = batch or max(export.batches)
    entries, contracts = export.entries(batch), export.contracts(batch)
    reference = eager_parts(model, tiles)
    rows, chained = [], tiles.numpy()
    for name in COMPONENTS:
        c, entry = contracts[name], entries[name]
        path = export.file(entry["onnx"])
        session = storage_session(path)
        in_name = c.inputs[0].name
        peak = 255.0 if c.outputs[0].dtype == "uint8" else None
        ref = reference[name]["outputs"][0]
        say(f"fp16 storage: {c.stem} ({entry['precision']})")
        for kind, feed in (("fp32 reference", reference[name]["input"]), ("chained", chained)):
            outs = session.run(None, {in_name: feed})
            flag = outs[1] if len(outs) > 1 else None
            rows.append(_row(name, entry["precision"], kind, ref, outs[0], peak,
                             lambda f=feed: first_nonfinite(path, {in_name: f}), flag))
            if kind == "chained":
                chained = outs[0]
        del session
    chain = next(r for r in rows if r["part"] == COMPONENTS[-1] and r["inputs"] == "chained")
    passed = all(r["finite"] for r in rows) and chain["psnr_db"] >= min_psnr
    return {"batch": batch, "tiles": int(tiles.shape[0]), "min_psnr_db": min_psnr, "rows": rows,
            "chain_psnr_db": chain["psnr_db"], "passed": passed}


def storage_lines(section: dict) -> list[str]:
    lines = ["", f"fp16 storage semantics (ONNX Runtime CPU, ORT_DISABLE_ALL) vs eager fp32, held-out photos, "
                 f"tile batch {section['batch']}",
             "| part | precision | inputs | PSNR dB | max abs error | finite | first non-finite tensor |",
             "|---|---|---|---:|---:|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['part']} | {r['precision']} | {r['inputs']} | {r['psnr_db']:.2f} | "
                     f"{r['max_abs_error']:.4g} | {'yes' if r['finite'] else 'NO'} | {r['first_nonfinite'] or '-'} |")
    lines.append(f"whole chain: {section['chain_psnr_db']:.2f} dB (target >= {section['min_psnr_db']:g} dB, finite): "
                 + ("passed" if section["passed"] else "FAILED"))
    return lines
