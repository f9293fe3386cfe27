"""Build TensorRT plans from a dfosd export directory (TensorRT 10.x and 11.x).

One plan per ONNX part in the export's manifest, beside it: ``<stem>.plan`` and its
manifest ``<stem>.plan.json`` (TensorRT version, GPU, SM, CUDA, precision, the I/O table
of the part's contract, hashes of the ONNX file and the checkpoint, builder settings).

Networks are strongly typed: every tensor's type comes from the ONNX (an fp16 engine is an
fp16 ONNX, an INT8/FP8 engine is a Q/DQ ONNX), so no FP16/INT8 builder flag is ever set
(TensorRT 11 has none). On 10.x that is ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
on 11.x it is the only mode. Builder optimization level 3, 4 for Q/DQ graphs; a workspace
pool limit; static shapes (the export's contracts); a timing cache per GPU/TRT/CUDA in the
export directory. A plan whose inputs (ONNX hash, system, settings) are unchanged is reused.

Every ``trt.X`` / ``trt.X.y`` and TensorRT member name used here exists in both 10.16 and
11.1 (checked against shared/tensorrt-api by tests/engines/test_tensorrt_api.py); enum members are
used by name, never by number (their values changed between 10 and 11).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.manifest import ExportDir, build_key, changed_files, file_record, write_bytes_atomic, write_json_atomic
from dfosd.core.vocab import plan_manifest_name, plan_name
from dfosd.engines.tensorrt_common import (
    INSTALL_HINT,
    PLAN_FORMAT,
    import_tensorrt,
    rebuild_command,
    system_info,
    tensorrt_major,
    trt_dtypes,
)

log = logging.getLogger(__name__)

OPT_LEVEL = 3
QDQ_OPT_LEVEL = 4
DEFAULT_WORKSPACE_BYTES = 8 << 30
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network for this TensorRT's major version."""
    major = tensorrt_major(trt)
    if major == 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if major >= 11:
        return 0  # strongly typed is TensorRT 11's only mode
    raise DfosdError(f"TensorRT {trt.__version__} has no strongly typed networks", hint=INSTALL_HINT)


@dataclass(frozen=True)
class PlanJob:
    """One ONNX part of the export and where its plan goes."""

    stem: str
    component: str
    batch: int
    precision: str
    onnx: Path
    onnx_files: dict[str, dict]  # the ONNX file (and its external data) as recorded by the export
    qdq: bool
    contract: ComponentContract

    @property
    def plan(self) -> Path:
        return self.onnx.with_name(plan_name(self.stem))

    @property
    def plan_manifest(self) -> Path:
        return self.onnx.with_name(plan_manifest_name(self.stem))

    @property
    def optimization_level(self) -> int:
        return QDQ_OPT_LEVEL if self.qdq else OPT_LEVEL

    def io_table(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "mode": mode, "dtype": s.dtype, "shape": list(s.shape)}
                for mode, specs in (("input", self.contract.inputs), ("output", self.contract.outputs))
                for s in specs]


def onnx_has_qdq(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in QDQ_OPS for n in graph.node)


def plan_jobs(export: "ExportDir | str | Path") -> list[PlanJob]:
    """The exact ONNX files ``build_engines`` builds, with the facts the build needs."""
    if not isinstance(export, ExportDir):
        export = ExportDir(export, check="full")  # a plan is built from these very bytes
    jobs = []
    for stem, entry in export.components.items():
        onnx_path = export.path / entry["onnx"]
        names = [entry["onnx"]] + ([entry["external_data"]] if entry.get("external_data") else [])
        jobs.append(PlanJob(stem=stem, component=entry["component"], batch=int(entry["batch"]),
                            precision=str(entry["precision"]), onnx=onnx_path,
                            onnx_files={n: export.files[n] for n in names}, qdq=onnx_has_qdq(onnx_path),
                            contract=ComponentContract.from_dict(entry["contract"])))
    return jobs


def _parser_errors(parser, onnx_path: Path) -> list[str]:
    """Every parser error with the ONNX node it concerns (name from the file when TRT has none)."""
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        idx = err.node()
        name = err.node_name() or (nodes[idx].name if 0 <= idx < len(nodes) else "")
        op = err.node_operator() or (nodes[idx].op_type if 0 <= idx < len(nodes) else "")
        where = f"node {idx} {name!r} ({op})" if idx >= 0 else "graph"
        out.append(f"{where}: {err.desc()} [{err.code()}]")
    return out


def _check_network_io(trt, network, job: PlanJob) -> None:
    """The parsed network's I/O must be the contract's: names, static shapes, dtypes."""
    dtypes = trt_dtypes(trt)
    got = [(network.get_input(i), "input") for i in range(network.num_inputs)]
    got += [(network.get_output(i), "output") for i in range(network.num_outputs)]
    want = {(row["name"], row["mode"]): row for row in job.io_table()}
    problems = []
    if {(t.name, mode) for t, mode in got} != set(want):
        problems.append(f"tensors {sorted((t.name, m) for t, m in got)} differ from the contract {sorted(want)}")
    for tensor, mode in got:
        row = want.get((tensor.name, mode))
        if row is None:
            continue
        shape = list(tensor.shape)
        if shape != row["shape"]:
            problems.append(f"{tensor.name}: shape {shape} (the contract says {row['shape']}; -1 means dynamic)")
        if tensor.dtype != dtypes[row["dtype"]]:
            problems.append(f"{tensor.name}: type {tensor.dtype} (the contract says {row['dtype']})")
    if problems:
        raise problems_error(f"{job.onnx.name} does not match its contract", problems,
                             hint="re-run dfosd-export into this directory")


def _progress_monitor(trt, say: Callable[[str], None], stem: str):
    """Top-level build phases as progress lines (IProgressMonitor exists in 10.x and 11.x)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._started[phase_name] = time.perf_counter()
            if parent_phase is None:
                say(f"  {stem}: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            t = self._started.pop(phase_name, None)
            if t is not None and time.perf_counter() - t > 5.0:
                say(f"  {stem}: {phase_name} done in {time.perf_counter() - t:.0f} s")

    return Monitor()


def _build_plan(trt, logger, job: PlanJob, workspace_bytes: int, cache_blob: bytes,
                say: Callable[[str], None]) -> tuple[bytes, bytes]:
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.onnx)):
        raise problems_error(f"TensorRT {trt.__version__}'s ONNX parser rejected {job.onnx}",
                             _parser_errors(parser, job.onnx),
                             hint="the nodes above are unsupported by this TensorRT; report them with the ONNX file")
    _check_network_io(trt, network, job)
    config = builder.create_builder_config()
    config.builder_optimization_level = job.optimization_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(cache_blob)
    if not config.set_timing_cache(cache, False):  # ignore_mismatch=False
        say(f"  {job.stem}: the timing cache does not fit this system; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    config.progress_monitor = _progress_monitor(trt, say, job.stem)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DfosdError(f"TensorRT could not build {job.onnx.name} (its log above says why)",
                         hint=f"a larger workspace ({rebuild_command(job.onnx.parent)} --workspace-gib N) "
                         "or a smaller tile batch may help")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def _current_plan(job: PlanJob, key: str) -> dict | None:
    import json

    try:
        old = json.loads(job.plan_manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if old.get("build_key") != key or changed_files(job.plan.parent, {job.plan.name: old.get("plan_file", {})}):
        return None
    return old


def timing_cache_path(export_dir: Path, system: dict[str, Any]) -> Path:
    """One timing cache per GPU architecture, TensorRT and CUDA version (what it is tied to)."""
    return export_dir / f"tensorrt-{system['tensorrt']}-sm{system['sm']}-cuda{system['cuda']}.timing-cache"


def build_engines(export_dir: str | Path, *, progress: Callable[[str], None] = log.info,
                  workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, force: bool = False) -> list[dict[str, Any]]:
    """Build (or reuse) a TensorRT plan for every ONNX part of the export; returns the plan manifests."""
    export = ExportDir(export_dir, check="full")
    export_dir = export.path
    jobs = plan_jobs(export)  # export problems surface before TensorRT is needed
    trt = import_tensorrt()
    system = system_info(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = timing_cache_path(export_dir, system)
    cache_blob = cache_path.read_bytes() if cache_path.is_file() else b""
    progress(f"TensorRT {system['tensorrt']} on {system['gpu']} (SM {system['sm']}, CUDA {system['cuda']}): "
             f"{len(jobs)} plans")
    results = []
    for job in jobs:
        builder_settings = {"strongly_typed": True, "optimization_level": job.optimization_level,
                            "workspace_bytes": workspace_bytes, "static_shapes": True}
        key = build_key({"format": PLAN_FORMAT, "onnx": job.onnx_files, "system": system, "builder": builder_settings})
        old = None if force else _current_plan(job, key)
        if old is not None:
            progress(f"{job.stem}: plan is current ({job.plan.name})")
            results.append(old)
            continue
        progress(f"building {job.plan.name} ({job.precision}{', Q/DQ' if job.qdq else ''}, "
                 f"optimization level {job.optimization_level})")
        t0 = time.perf_counter()
        plan, cache_blob = _build_plan(trt, logger, job, workspace_bytes, cache_blob, progress)
        write_bytes_atomic(job.plan, plan)
        write_bytes_atomic(cache_path, cache_blob)  # after every plan: a later failure keeps the timings
        record = {
            "format": PLAN_FORMAT,
            "kind": "dfosd-tensorrt-plan",
            "build_key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stem": job.stem, "component": job.component, "batch": job.batch, "precision": job.precision,
            "qdq": job.qdq,
            "plan": job.plan.name,
            "plan_file": file_record(job.plan),
            "onnx": job.onnx.name,
            "onnx_sha256": job.onnx_files[job.onnx.name]["sha256"],
            "onnx_files": job.onnx_files,
            "checkpoint_sha256": export.inputs.get("checkpoint_sha256"),
            "export_build_key": export.build_key,
            "system": system,
            "builder": {**builder_settings, "timing_cache": cache_path.name},
            "io": job.io_table(),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        write_json_atomic(job.plan_manifest, record)
        progress(f"wrote {job.plan.name} ({record['plan_file']['bytes'] / 2**20:.1f} MiB, "
                 f"{record['build_seconds']:.0f} s)")
        results.append(record)
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m dfosd.engines.tensorrt_build DIR``: deprecated alias of ``dfosd build DIR --backend tensorrt``."""
    import click

    from dfosd.core.cli_support import setup_logging, user_errors

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("export_dir", type=click.Path(file_okay=False, exists=True))
    @click.option("--workspace-gib", default=DEFAULT_WORKSPACE_BYTES / 2**30, show_default=True, type=float,
                  help="TensorRT workspace pool limit.")
    @click.option("--force", is_flag=True, help="Rebuild plans even when they are current.")
    @user_errors
    def cli(export_dir, workspace_gib, force):
        from dfosd.engines.build_cli import build, deprecated

        setup_logging()
        deprecated("python -m dfosd.engines.tensorrt_build DIR", "dfosd build DIR --backend tensorrt")
        build(export_dir, "tensorrt", force=force, workspace_gib=workspace_gib)

    cli.main(args=argv, prog_name="python -m dfosd.engines.tensorrt_build")


if __name__ == "__main__":  # pragma: no cover
    main()
