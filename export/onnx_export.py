"""Trace one part to ONNX and clean it up.

TorchScript exporter (``dynamo=False``): it is the one ModelOpt's Q/DQ export works
with (see the notes), it exports the tiny models in about a second, and it folds the
constant subgraphs torch can see (time embedding of the fixed timestep, the K/V
projections of the fixed text embedding). onnx-graphsurgeon then removes dead nodes
and, for graphs small enough to fold without exhausting memory, folds what is left.
Weights go to one external-data file once a model passes the 2 GiB protobuf limit.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from dfosd.core.contracts import ComponentContract

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# protobuf refuses to serialise a message over 2 GiB; keep a margin for graph overhead.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Folding loads the whole graph into ONNX Runtime: full-size fp32 UNet peaked at ~22 GiB
# on a 24 GiB machine (notes), so only graphs below this size are folded by graphsurgeon.
FOLD_LIMIT_BYTES = 1_000_000_000


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


def export_part(module, contract: ComponentContract, onnx_path: Path, *, opset: int = DEFAULT_OPSET) -> dict:
    """Export ``module`` (already in its precision) to ``onnx_path`` atomically.

    Returns facts for the manifest: files written, whether external data and folding were used.
    """
    import onnx
    import onnx_graphsurgeon as gs
    import torch

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    sample = contract.sample_inputs()
    args = tuple(sample[s.name] for s in contract.inputs)
    with tempfile.TemporaryDirectory(prefix=f".{onnx_path.stem}.", dir=onnx_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(), args, str(raw),
                input_names=[s.name for s in contract.inputs],
                output_names=[s.name for s in contract.outputs],
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        model = onnx.load(str(raw))  # pulls in any external data torch wrote beside it
        graph = gs.import_onnx(model)
        graph.cleanup().toposort()
        size = _initializer_bytes(model)
        folded = size < FOLD_LIMIT_BYTES
        if folded:
            graph.fold_constants().cleanup().toposort()
        model = gs.export_onnx(graph)
        model.producer_name, model.doc_string = "dfosd", f"dfosd {contract.stem}"
        external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
        staged = Path(tmp) / onnx_path.name
        data_name = onnx_path.name + ".data"
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        onnx.checker.check_model(str(staged))  # path form: works with external data
        # Move data first, graph last: a reader that finds the .onnx finds its weights.
        old_data = onnx_path.parent / data_name
        if external:
            os.replace(Path(tmp) / data_name, old_data)
        elif old_data.exists():
            old_data.unlink()
        os.replace(staged, onnx_path)
    files = [onnx_path.name] + ([data_name] if external else [])
    return {"files": files, "external_data": data_name if external else None, "folded": folded,
            "opset": opset, "initializer_bytes": size}


def clear_stale(folder: Path, keep: set[str]) -> None:
    """Remove ONNX files of an earlier export that this export does not produce."""
    for p in Path(folder).glob("*.onnx*"):
        if p.name not in keep:
            p.unlink()
    for p in Path(folder).glob(".*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
