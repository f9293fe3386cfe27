"""``dfosd verify EXPORT_DIR``: every exported part against a second implementation, through Polygraphy.

Each part of each tile batch runs in two Polygraphy runners on the same inputs, and
Polygraphy's comparator (``Comparator.run`` + ``Comparator.compare_accuracy`` with
``CompareFunc.simple``) judges the outputs with its tolerances (``atol``/``rtol`` on an
error statistic) and prints its usual report:

- ONNX Runtime (``OnnxrtRunner``) on the exported ONNX, always;
- TensorRT (``TrtRunner``, a strongly typed network parsed from the same ONNX) where the
  ``tensorrt`` package imports; otherwise the eager PyTorch part (``EagerPartRunner``),
  rebuilt from the base and checkpoint the manifest names, in fp32.

Inputs are real: the encoder gets LR tiles cut from scikit-image photographs, the UNet
what ONNX Runtime's encoder made of them, the decoder what its UNet made, so each part is
judged on the values it meets in the chain and both runners of a part see identical inputs.

Default tolerances (``DEFAULT_TOLERANCES``) depend on the reference and on the part's
precision: the same graph in TensorRT should match closely; an fp16 or 8-bit part
against eager fp32 differs by its rounding or quantization, so those are judged on the
mean error. Override them with ``--atol/--rtol/--check-error-stat``. The TensorRT rows
have not run yet (no TensorRT on the machines so far): their bounds are first guesses.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from dfosd.core.errors import DfosdError

if TYPE_CHECKING:
    from dfosd.core.manifest import ExportDir

REFERENCES = ("auto", "tensorrt", "eager")
ERROR_STATS = ("elemwise", "max", "mean", "median")


@dataclass(frozen=True)
class Tolerance:
    """Polygraphy's SimpleCompareFunc thresholds: an output passes when ``stat`` of its absolute
    error is <= atol or that of its relative error is <= rtol (elemwise: each element)."""

    atol: float
    rtol: float
    stat: str = "max"

    def __post_init__(self):
        if self.atol < 0 or self.rtol < 0:
            raise DfosdError(f"tolerances must be >= 0 (atol {self.atol}, rtol {self.rtol})")
        if self.stat not in ERROR_STATS:
            raise DfosdError(f"--check-error-stat {self.stat!r}: choose one of {', '.join(ERROR_STATS)}")


# (reference, part precision) -> tolerance on float outputs (latents) and on uint8 outputs (image
# levels 0..255); rtol is 0 where the statistic is a mean (relative errors of values near zero say
# nothing). Measured on the tiny model's exports against eager fp32 (random weights, latents of
# std ~4.6): fp32 max 4e-5 (latents), 1 level (image); fp16 mean 4.4e-3, 0.02 levels; int8 mean
# 0.25, 1.3 levels; fp8 mean 0.62, 3.0 levels (UNet output). The 8-bit bounds catch a broken
# graph (wrong scales, swapped tensors: errors of the values' own size), not quantization
# quality, which `dfosd parity` measures as PSNR on held-out photos.
DEFAULT_TOLERANCES: dict[tuple[str, str], tuple[Tolerance, Tolerance]] = {
    ("eager", "fp32"): (Tolerance(1e-3, 1e-3, "max"), Tolerance(2, 0, "max")),
    ("eager", "fp16"): (Tolerance(2e-2, 0, "mean"), Tolerance(1, 0, "mean")),
    ("eager", "int8"): (Tolerance(1.0, 0, "mean"), Tolerance(8, 0, "mean")),
    ("eager", "fp8"): (Tolerance(1.5, 0, "mean"), Tolerance(8, 0, "mean")),
    ("tensorrt", "fp32"): (Tolerance(1e-3, 1e-3, "max"), Tolerance(2, 0, "max")),
    ("tensorrt", "fp16"): (Tolerance(1e-2, 0, "mean"), Tolerance(1, 0, "mean")),
    ("tensorrt", "int8"): (Tolerance(5e-2, 0, "mean"), Tolerance(2, 0, "mean")),
    ("tensorrt", "fp8"): (Tolerance(5e-2, 0, "mean"), Tolerance(2, 0, "mean")),
}


def tolerance_for(reference: str, precision: str, dtype: str, *, atol: float | None = None,
                  rtol: float | None = None, stat: str | None = None) -> Tolerance:
    floats, uint8 = DEFAULT_TOLERANCES[(reference, precision)]
    base = uint8 if dtype == "uint8" else floats
    return Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol,
                     base.stat if stat is None else stat)


def eager_part_runner_class():
    """``EagerPartRunner``, defined on first use: Polygraphy's BaseRunner is imported lazily."""
    global _EAGER_RUNNER
    if _EAGER_RUNNER is not None:
        return _EAGER_RUNNER
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class EagerPartRunner(BaseRunner):
        """A Polygraphy runner around one eager PyTorch part (Polygraphy's own PytRunner assumes CUDA)."""

        def __init__(self, part, contract, device: str = "cpu", name: str | None = None):
            super().__init__(name=name, prefix="eager-pytorch-runner")
            self.part, self.contract, self.device = part, contract, device

        def activate_impl(self):
            self.part.to(self.device).eval()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for spec in self.contract.inputs:
                meta.add(spec.name, spec.numpy_dtype, spec.shape)
            return meta

        def infer_impl(self, feed_dict):
            import torch

            args = [torch.from_numpy(feed_dict[s.name]).to(self.device) for s in self.contract.inputs]
            t0 = time.perf_counter()
            with torch.inference_mode():
                outs = self.part(*args)
            self.inference_time = time.perf_counter() - t0
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            return OrderedDict((s.name, o.cpu().numpy()) for s, o in zip(self.contract.outputs, outs))

        def deactivate_impl(self):
            pass

    _EAGER_RUNNER = EagerPartRunner
    return EagerPartRunner


_EAGER_RUNNER = None


def choose_reference(reference: str) -> str:
    import importlib.util

    if reference not in REFERENCES:
        raise DfosdError(f"--against {reference!r}: choose one of {', '.join(REFERENCES)}")
    has_trt = importlib.util.find_spec("tensorrt") is not None
    if reference == "tensorrt" and not has_trt:
        raise DfosdError("--against tensorrt: the tensorrt package does not import here",
                         hint="install TensorRT (see pyproject's [tensorrt] extra) or use --against eager")
    if reference == "auto":
        return "tensorrt" if has_trt else "eager"
    return reference


def eager_model(export: "ExportDir", say: Callable[[str], None]):
    """The fp32 eager model of the base and checkpoint this export was made from."""
    from dfosd.core.bases import load_base
    from dfosd.core.onestep import build_from_model
    from dfosd.core.readers import read_model_as_exported

    inputs = export.inputs
    ckpt_path = Path(inputs["checkpoint"])
    if not ckpt_path.is_file():
        raise DfosdError(f"{export.path}: its checkpoint {ckpt_path} is gone, so there is no eager reference",
                         hint="put the checkpoint back, or verify on a machine with TensorRT (--against tensorrt)")
    ckpt = read_model_as_exported(ckpt_path, export)  # any family, as the export read it
    if ckpt.sha256 != inputs["checkpoint_sha256"]:
        raise DfosdError(f"{ckpt_path} changed since {export.path} was exported from it",
                         hint=f"re-export: dfosd export --ckpt {ckpt_path} --out {export.path}")
    say(f"eager reference: {inputs['base']} + {ckpt_path} (fp32)")
    base = load_base(inputs["base"])
    return build_from_model(base, ckpt, copy=False)  # the base is ours alone


def first_inputs(contract, tile: int) -> OrderedDict:
    """LR tiles from real photographs for the encoder."""
    from dfosd.bench.run import bench_inputs

    spec = contract.inputs[0]
    return OrderedDict([(spec.name, bench_inputs(tile, contract.batch).numpy())])


def part_runners(reference: str, onnx_path: Path, part, contract, device: str):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    ort = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name=f"onnxruntime:{onnx_path.name}")
    if reference == "tensorrt":
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, TrtRunner

        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)  # types come from the ONNX
        return ort, TrtRunner(EngineFromNetwork(network, config=CreateConfig()), name=f"tensorrt:{onnx_path.name}")
    return ort, eager_part_runner_class()(part, contract, device, name=f"eager:{contract.component}")


def compare_part(runners, feed: OrderedDict, tolerances: dict[str, Tolerance]):
    """Polygraphy runs both runners on ``feed`` and compares; returns (passed, per-output stats, outputs)."""
    import numpy as np
    from polygraphy.comparator import CompareFunc, Comparator
    from polygraphy.exception import PolygraphyException

    try:
        results = Comparator.run(runners, data_loader=[feed])
        func = CompareFunc.simple(atol={k: t.atol for k, t in tolerances.items()},
                                  rtol={k: t.rtol for k, t in tolerances.items()},
                                  check_error_stat={k: t.stat for k, t in tolerances.items()})
        with np.errstate(divide="ignore", invalid="ignore"):  # relative error against a zero pixel: NaN, by design
            accuracy = Comparator.compare_accuracy(results, compare_func=func)
    except PolygraphyException as exc:
        raise DfosdError(f"Polygraphy could not run or compare {runners[0].name} and {runners[1].name}: {exc}") from exc
    stats = {}
    # Polygraphy < 0.50 returns one AccuracyResult, later versions a list of them (one per compare func).
    for acc in [accuracy] if hasattr(accuracy, "items") else list(accuracy):
        for iterations in acc.values():  # one runner pair, one iteration
            for out_name, res in iterations[0].items():
                stats[out_name] = {"passed": bool(res), "max_absdiff": res.max_absdiff,
                                   "mean_absdiff": res.mean_absdiff, "median_absdiff": res.median_absdiff,
                                   "max_reldiff": res.max_reldiff}
    _, iterations = list(results)[0]  # (runner name, [IterationResult]) of ONNX Runtime
    return bool(accuracy), stats, OrderedDict((k, v.copy()) for k, v in iterations[0].items())


def open_export(export_dir: str | Path) -> "ExportDir":
    """The export directory, its files checked against its manifest; contracts-only ones refused."""
    from dfosd.core.manifest import ExportDir

    export = ExportDir(export_dir)
    if any(c.get("placeholder") for c in export.components.values()):
        raise DfosdError(f"{export.path} is a contracts-only export (GPU bench): it holds no ONNX graphs to verify",
                         hint="verify a directory written by dfosd export")
    return export


def check_tensorrt_ops(export: "ExportDir") -> dict[str, Any]:
    """Every ONNX graph of the export against TensorRT's ONNX parser (``engines/onnx_parser_ops.py``)."""
    from dfosd.engines.onnx_parser_ops import check_export

    files = check_export(export)
    return {"files": files, "passed": not any(files.values())}


def compare_parts(export: "ExportDir", *, against: str = "auto", atol: float | None = None,
                  rtol: float | None = None, check_error_stat: str | None = None,
                  batches: tuple[int, ...] | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Compare every part of every tile batch (or of ``batches``) through Polygraphy."""
    import math

    reference = choose_reference(against)
    per_batch = {b: (export.entries(b), export.contracts(b)) for b in batches or export.batches}  # before any load
    model = eager_model(export, say) if reference == "eager" else None
    parts = []
    for batch, (entries, contracts) in per_batch.items():
        feed = None
        for name, contract in contracts.items():
            entry = entries[name]
            if feed is None:
                feed = first_inputs(contract, export.tile)
            tolerances = {s.name: tolerance_for(reference, entry["precision"], s.dtype, atol=atol, rtol=rtol,
                                                stat=check_error_stat) for s in contract.outputs}
            say(f"== {contract.stem} ({entry['precision']}): onnxruntime vs {reference}")
            runners = part_runners(reference, export.file(entry["onnx"]), model.part(name) if model else None,
                                   contract, "cpu")
            passed, stats, outputs = compare_part(runners, feed, tolerances)
            finite = all(math.isfinite(v) for st in stats.values() for v in (st["max_absdiff"], st["mean_absdiff"]))
            parts.append({"part": name, "stem": contract.stem, "batch": batch, "precision": entry["precision"],
                          "passed": passed and finite, "tolerances": {k: vars(t) for k, t in tolerances.items()},
                          "outputs": stats})
            # The next part gets what ONNX Runtime made of this one (an output of one part is the
            # input of the next, by name), i.e. the values it meets in the chain.
            feed = outputs
    return {"reference": reference, "parts": parts, "passed": all(p["passed"] for p in parts)}


def verify_export(export_dir: str | Path, *, compare: bool = True, fp16_storage: bool = False,
                  min_psnr: float | None = None, **compare_options) -> dict[str, Any]:
    """The TensorRT parser check, (unless ``compare`` is False) the part comparison and (with
    ``fp16_storage``) every part under fp16 storage semantics (bench/fp16_storage.py), in one report."""
    export = open_export(export_dir)
    report: dict[str, Any] = {"export_dir": str(export.path), "precision": export.precision,
                              "tensorrt_ops": check_tensorrt_ops(export)}
    if compare:
        report["comparison"] = compare_parts(export, **compare_options)
    if fp16_storage:
        from dfosd.bench.fp16_storage import DEFAULT_MIN_PSNR, storage_report
        from dfosd.bench.run import bench_inputs

        say = compare_options.get("say", print)
        batch = max((compare_options.get("batches") or export.batches))
        report["fp16_storage"] = storage_report(export, eager_model(export, say), bench_inputs(export.tile, batch),
                                                batch=batch, say=say,
                                                min_psnr=DEFAULT_MIN_PSNR if min_psnr is None else min_psnr)
    report["passed"] = all(report.get(k, {}).get("passed", True) for k in ("tensorrt_ops", "comparison",
                                                                            "fp16_storage"))
    return report


def summary_lines(report: dict) -> list[str]:
    ops = report["tensorrt_ops"]
    lines = [f"{report['export_dir']} ({report['precision']})",
             f"TensorRT ONNX parser check: {len(ops['files'])} graphs, "
             + ("all operators and types accepted" if ops["passed"] else "PROBLEMS:")]
    lines += [f"  {p}" for problems in ops["files"].values() for p in problems]
    comparison = report.get("comparison")
    if comparison:
        lines += ["", f"Polygraphy comparison: onnxruntime vs {comparison['reference']}",
                  "| part | precision | output | stat | atol | rtol | max abs diff | mean abs diff | verdict |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for p in comparison["parts"]:
            for out, st in p["outputs"].items():
                t = p["tolerances"][out]
                lines.append(f"| {p['stem']} | {p['precision']} | {out} | {t['stat']} | {t['atol']:g} | {t['rtol']:g} | "
                             f"{st['max_absdiff']:.4g} | {st['mean_absdiff']:.4g} | "
                             f"{'passed' if p['passed'] else 'FAILED'} |")
    if report.get("fp16_storage"):
        from dfosd.bench.fp16_storage import storage_lines

        lines += storage_lines(report["fp16_storage"])
    lines.append("PASSED" if report["passed"] else "FAILED")
    return lines


@click.command(name="verify", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--against", type=click.Choice(REFERENCES), default="auto", show_default=True,
              help="Second runner: TensorRT where it imports (auto), else the eager PyTorch part.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default: per precision and dtype).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default: per precision and dtype).")
@click.option("--check-error-stat", type=click.Choice(ERROR_STATS), default=None,
              help="Error statistic checked against the tolerances (default: per precision).")
@click.option("--batch", "batches", default=None, help="Tile batches to compare, comma-separated (default: all).")
@click.option("--tensorrt-ops-only", is_flag=True,
              help="Only check the graphs against TensorRT's ONNX parser (no models run).")
@click.option("--fp16-storage", is_flag=True,
              help="Run every part with fp16 tensors stored as fp16 between nodes, as on a GPU (ONNX Runtime "
                   "CPU without graph optimisation), per part and chained, against eager fp32 on held-out photos; "
                   "names the first non-finite tensor. Replaces the Polygraphy comparison.")
@click.option("--min-psnr", type=float, default=None,
              help="With --fp16-storage: the whole chain's PSNR it must reach (default 40 dB).")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the report as JSON to this file.")
@click.option("-q", "--quiet", is_flag=True,
              help="Polygraphy reports only warnings and failed comparisons (no per-output report of passes).")
@click.option("-v", "--verbose", is_flag=True)
def main(export_dir, against, atol, rtol, check_error_stat, batches, tensorrt_ops_only, fp16_storage, min_psnr,
         report_path, quiet, verbose):
    """Check EXPORT_DIR for TensorRT's ONNX parser and compare each part through Polygraphy.

    Exit code 0 when every graph passes the parser check and every part is within its
    tolerances, 1 when one is not, 2 on bad input.
    """
    from dfosd.core.cli_support import parse_int_list, say, setup_logging

    setup_logging(verbose)
    quiet_polygraphy = contextlib.nullcontext()
    if quiet:  # Polygraphy still reports warnings and failed comparisons
        from polygraphy.logger import G_LOGGER

        quiet_polygraphy = G_LOGGER.verbosity(G_LOGGER.WARNING)
    try:
        with quiet_polygraphy:
            if min_psnr is not None and not fp16_storage:
                raise DfosdError("--min-psnr is the target of --fp16-storage", hint="add --fp16-storage")
            report = verify_export(export_dir, compare=not (tensorrt_ops_only or fp16_storage),
                                   fp16_storage=fp16_storage, min_psnr=min_psnr, against=against, atol=atol, rtol=rtol,
                                   check_error_stat=check_error_stat, say=say,
                                   batches=parse_int_list(batches, "--batch") if batches else None)
    except DfosdError as exc:  # could not verify: exit 2, apart from "verified and failed" (1)
        error = click.ClickException(str(exc))
        error.exit_code = 2
        raise error from None
    click.echo("\n".join(summary_lines(report)))
    if report_path:
        from dfosd.bench.results import json_safe
        from dfosd.core.manifest import write_json_atomic

        write_json_atomic(Path(report_path), json_safe(report))
        say(f"wrote {report_path}")
    if not report["passed"]:
        raise SystemExit(1)
