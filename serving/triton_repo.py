"""Write a Triton Inference Server model repository from a dfosd export directory.

Layout of ``--out REPO`` (``<name>`` defaults to ``dfosd``; one set per tile batch ``b``)::

    <name>/                          Python backend: dfosd's runtime (tiling + blending), any image size
      config.pbtxt                   dynamic batching, ragged uint8 input, runtime parameters
      1/model.py                     imports dfosd.serving.python_model (dfosd must be installed there)
      1/engines/                     the export directory (manifest + ONNX / plans / .pt2 packages)
    <name>_encoder_b1/               onnxruntime_onnx, full static shapes (max_batch_size 0)
      config.pbtxt
      1/encoder_b1.onnx              (default_model_filename; external data beside it)
    <name>_unet_b1/ ...  <name>_decoder_b1/ ...
    <name>_tiles_b1/                 ensemble: lr_image uint8 [b,3,t,t] -> sr_image uint8 [b,3,4t,4t]
    <name>_encoder_b1_trt/ ...       tensorrt_plan + cc_model_filenames + CUDA graphs, when the
    <name>_tiles_b1_trt/             export directory holds current plans for all three parts

Tensor names, dtypes and dims come from the component contracts in ``manifest.json``
(and, for plans, are cross-checked with each plan's own manifest). The ensembles take
fixed-size tiles; tiling images of any size is the Python model's job (or the client's).

Nothing here imports torch, onnx or tritonclient: the configs are written as text
(``serving.pbtxt``) and checked against Triton's schema by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.manifest import ExportDir
from dfosd.core.vocab import COMPONENTS, IMAGE_IN, IMAGE_OUT, MANIFEST_NAME, plan_manifest_name
from dfosd.core.vocab import stem as part_stem
from dfosd.engines.tensorrt_common import plan_problems, rebuild_command
from dfosd.serving.pbtxt import Enum, Map, to_pbtxt
from dfosd.serving.repo_records import MARKER, RepoRecords  # noqa: F401 - MARKER: the tests' and callers' name
from dfosd.serving.scheduler import DEFAULT_TIMEOUT_S

DATA_TYPES = {"uint8": "TYPE_UINT8", "float16": "TYPE_FP16", "float32": "TYPE_FP32"}
KINDS = ("python", "onnx", "tensorrt")
LINK_MODES = ("copy", "hardlink", "symlink")
DEVICES = ("cpu", "gpu")
VERSION = "1"
DEFAULT_MAX_PIXELS = 1024 * 1024  # LR pixels per image: 1024x1024 in -> 4096x4096 out (48 MiB)


@dataclass(frozen=True)
class RepoOptions:
    name: str = "dfosd"
    kinds: tuple[str, ...] = KINDS  # tensorrt: only where plans exist, unless asked for explicitly
    device: str = "gpu"             # instance kind of the ONNX models (TensorRT plans are always GPU)
    link: str = "copy"              # how model files get into the repository
    # The Python-backend model (dfosd's runtime):
    backend: str = "auto"
    tile_batch: int | None = None   # default: the export's largest tile batch
    overlap: int | None = None      # default: tile / 4
    max_batch: int = 8              # requests per execute() call (Triton's dynamic batcher)
    max_queue_delay_us: int = 2000
    queue_timeout_s: float = 0.0    # 0: a request may wait in Triton's queue indefinitely (it is short: see scheduler)
    request_timeout_s: float = DEFAULT_TIMEOUT_S  # the Python model fails a request not done this long after it arrived
    max_pixels: int = DEFAULT_MAX_PIXELS
    instances: int = 1              # instances of every model (per listed GPU for GPU kinds)
    gpus: tuple[int, ...] = ()      # GPU instances go on these devices (empty: Triton's default, every GPU)
    python_device: str = "cpu"      # instance kind of the Python model (GPU: one instance per GPU)
    tensorrt_required: bool = False  # set when --kinds names tensorrt explicitly
    site_dirs: tuple[str, ...] = ()  # extra site folders model.py adds (dfosd-serve from a venv)
    path_dirs: tuple[str, ...] = ()  # folders model.py puts first on sys.path (dfosd-serve's PYTHONPATH)
    progress_dir: str | None = None  # where the Python model reports tile progress (dfosd-serve's front reads it)

    def __post_init__(self):
        problems = []
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            problems.append(f"--kinds {','.join(self.kinds)}: choose from {', '.join(KINDS)}")
        if self.device not in DEVICES or self.python_device not in DEVICES:
            problems.append(f"--device {self.device}: choose one of {', '.join(DEVICES)}")
        if self.link not in LINK_MODES:
            problems.append(f"--link {self.link}: choose one of {', '.join(LINK_MODES)}")
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            problems.append(f"--name {self.name!r}: use letters, digits, '_' and '-'")
        if self.max_batch < 1:
            problems.append(f"--max-batch {self.max_batch}: must be >= 1")
        if self.max_pixels < 1:
            problems.append(f"--max-pixels {self.max_pixels}: must be >= 1")
        if self.instances < 1:
            problems.append(f"--instances {self.instances}: must be >= 1")
        if any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
            problems.append(f"--gpus {','.join(map(str, self.gpus))}: distinct device numbers >= 0")
        gpu_models = (self.python_device == "gpu" and "python" in self.kinds) or "tensorrt" in self.kinds \
            or (self.device == "gpu" and "onnx" in self.kinds)
        if self.gpus and not gpu_models:
            problems.append(f"--gpus {','.join(map(str, self.gpus))}: no model of this repository runs on a GPU "
                            "(use --python-device gpu or --device gpu)")
        if self.request_timeout_s <= 0:
            problems.append(f"--request-timeout {self.request_timeout_s}: must be > 0")
        if self.queue_timeout_s < 0:
            problems.append(f"--timeout {self.queue_timeout_s}: must be >= 0 (0: no limit)")
        if problems:
            raise DfosdError("; ".join(problems))


@dataclass
class RepoResult:
    repo: Path
    models: dict[str, str] = field(default_factory=dict)  # model name -> what it is
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the export's parts


def check_chain(contracts: dict[str, ComponentContract]) -> None:
    """Each part's outputs must be the next part's inputs (names, dtypes, shapes)."""
    for a, b in zip(COMPONENTS, COMPONENTS[1:]):
        if contracts[a].outputs != contracts[b].inputs:
            raise DfosdError(f"the export's {a} outputs {contracts[a].outputs} are not the {b} inputs "
                             f"{contracts[b].inputs}", hint="re-run dfosd-export into a clean directory")


# ---------------------------------------------------------------- config pieces


def tensor_config(spec) -> dict:
    return {"name": spec.name, "data_type": Enum(DATA_TYPES[spec.dtype]), "dims": list(spec.shape)}


def instance_group(kind: str, count: int = 1, gpus: tuple[int, ...] = ()) -> list[dict]:
    """Triton's instance_group: ``count`` instances, on each of ``gpus`` for a GPU kind (Triton's rule)."""
    group: dict[str, Any] = {"kind": Enum("KIND_GPU" if kind == "gpu" else "KIND_CPU"), "count": count}
    if kind == "gpu" and gpus:
        group["gpus"] = list(gpus)
    return [group]


def onnx_config(model: str, entry: dict, contract: ComponentContract, device: str, count: int = 1,
                gpus: tuple[int, ...] = ()) -> dict:
    return {
        "name": model,
        "platform": "onnxruntime_onnx",
        "max_batch_size": 0,  # dims are the full static shapes, batch included
        "default_model_filename": Path(entry["onnx"]).name,
        "input": [tensor_config(s) for s in contract.inputs],
        "output": [tensor_config(s) for s in contract.outputs],
        "instance_group": instance_group(device, count, gpus),
    }


def plan_config(model: str, plan: dict, contract: ComponentContract, count: int = 1,
                gpus: tuple[int, ...] = ()) -> dict:
    return {
        "name": model,
        "platform": "tensorrt_plan",
        "max_batch_size": 0,
        # A plan only runs on the GPU architecture it was built for: map that compute capability
        # to the file. On any other GPU Triton finds no file and refuses to load the model, which
        # is what should happen (rebuild the plans there).
        "cc_model_filenames": Map({plan["system"]["sm"]: plan["plan"]}),
        "input": [tensor_config(s) for s in contract.inputs],
        "output": [tensor_config(s) for s in contract.outputs],
        "instance_group": instance_group("gpu", count, gpus),
        # Static shapes: Triton's TensorRT backend captures each execution in a CUDA graph.
        "optimization": {"cuda": {"graphs": True}},
    }


def ensemble_config(model: str, step_models: dict[str, str], contracts: dict[str, ComponentContract]) -> dict:
    """Chain the parts by tensor name: each part's output feeds the next part's input."""
    first, last = contracts[COMPONENTS[0]], contracts[COMPONENTS[-1]]
    steps = []
    for name in COMPONENTS:
        c = contracts[name]
        steps.append({"model_name": step_models[name], "model_version": -1,
                      "input_map": Map({s.name: s.name for s in c.inputs}),
                      "output_map": Map({s.name: s.name for s in c.outputs})})
    return {
        "name": model,
        "platform": "ensemble",
        "max_batch_size": 0,
        "input": [tensor_config(s) for s in first.inputs],
        "output": [tensor_config(s) for s in last.outputs],
        "ensemble_scheduling": {"step": steps},
    }


def python_model_parameters(export: ExportDir, opts: RepoOptions, tile_batch: int) -> dict[str, str]:
    """What the Python model reads at start-up (and clients read to learn tile, scale, ...)."""
    tile = export.tile
    overlap = tile // 4 if opts.overlap is None else opts.overlap
    return {"engines": "engines", "backend": opts.backend, "tile_batch": str(tile_batch),
            "overlap": str(overlap), "max_pixels": str(opts.max_pixels), "tile": str(tile),
            "scale": str(export.upscale), "precision": export.precision,
            "export_build_key": export.build_key,
            # what the model applies when a request names none (clients show it; the model reads the manifest)
            "color_fix": export.color_fix,
            "request_timeout_s": f"{opts.request_timeout_s:g}",
            **({"progress_dir": opts.progress_dir} if opts.progress_dir else {})}


def python_config(model: str, params: dict[str, str], opts: RepoOptions) -> dict:
    dyn: dict[str, Any] = {"max_queue_delay_microseconds": opts.max_queue_delay_us}
    if opts.queue_timeout_s > 0:
        dyn["default_queue_policy"] = {"timeout_action": Enum("REJECT"),
                                       "default_timeout_microseconds": int(opts.queue_timeout_s * 1e6),
                                       "allow_timeout_override": True}
    return {
        "name": model,
        "backend": "python",
        # >0: requests carry a leading batch dimension and the dynamic batcher may hand several
        # requests to one execute() call. Each entry is one image [H,W,3] or [3,H,W].
        "max_batch_size": opts.max_batch,
        # ragged: requests with images of different sizes may still be batched together (the
        # model handles every request on its own; the batcher must not insist on equal shapes).
        "input": [{"name": IMAGE_IN, "data_type": Enum("TYPE_UINT8"), "dims": [-1, -1, -1],
                   "allow_ragged_batch": True}],
        "output": [{"name": IMAGE_OUT, "data_type": Enum("TYPE_UINT8"), "dims": [-1, -1, -1]}],
        "dynamic_batching": dyn,
        "instance_group": instance_group(opts.python_device, opts.instances, opts.gpus),
        "parameters": Map({k: {"string_value": v} for k, v in params.items()}),
    }


MODEL_PY = '''"""Triton Python-backend entry point written by `dfosd triton-repo`.

The model is dfosd's own runtime (dfosd.serving.python_model): dfosd and its runtime
dependencies must be installed in the Python that runs Triton's backend stub.
"""
{site}
from dfosd.serving.python_model import TritonPythonModel  # noqa: F401,E402
'''


def model_py(site_dirs: tuple[str, ...], path_dirs: tuple[str, ...] = ()) -> str:
    site = ""
    if site_dirs:
        site = ("\nimport site\n\nfor _d in " + repr(list(site_dirs)) + ":  # the venv dfosd-serve ran from\n"
                "    site.addsitedir(_d)\n")
    if path_dirs:  # the backend stub's embedded Python ignores PYTHONPATH (observed): pass it on
        site += "\nimport sys\n\nsys.path[:0] = " + repr(list(path_dirs)) + "  # dfosd-serve's PYTHONPATH\n"
    return MODEL_PY.format(site=site)


# ---------------------------------------------------------------- files


def place_file(src: Path, dst: Path, link: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link == "symlink":
        dst.symlink_to(src.resolve())
    elif link == "hardlink":
        try:
            os.link(src, dst)
        except OSError:  # another filesystem: fall back to a copy
            shutil.copy2(src, dst)
    else:
        shutil.copy2(src, dst)


def export_files(export_dir: Path) -> list[Path]:
    """The export directory's regular files (manifests, ONNX + data, plans, .pt2), no temp/hidden ones."""
    return sorted(p for p in export_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(".tmp"))


def write_model(repo: Path, model: str, config: dict, files: dict[str, Path], link: str,
                extra_text: dict[str, str] | None = None, records: RepoRecords | None = None,
                claim=lambda: None) -> None:
    """``repo/model/config.pbtxt`` + ``repo/model/1/<name>`` for each file, replacing only the files an
    earlier run recorded (``records``; see repo_records): a user's file in the folder stays."""
    folder = repo / model
    new = ["config.pbtxt"] + [f"{VERSION}/{name}" for name in [*files, *(extra_text or {})]]
    (records or RepoRecords(repo)).replace_files(model, new, claim)
    (folder / VERSION).mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(to_pbtxt(config))
    for name, src in files.items():
        place_file(src, folder / VERSION / name, link)
    for name, text in (extra_text or {}).items():
        (folder / VERSION / name).unlink(missing_ok=True)  # a link of an earlier run: not through it
        (folder / VERSION / name).write_text(text)


def models_written_before(repo: Path) -> set[str]:
    """The model folders an earlier run of this writer put in ``repo`` (its marker), else none."""
    return set(RepoRecords(repo).models)


def planned_models(by_batch: dict[int, dict], opts: RepoOptions) -> set[str]:
    """Every model folder this run may write (TensorRT ones included whether or not plans exist)."""
    names = {opts.name} if "python" in opts.kinds else set()
    for batch in by_batch:
        for kind, suffix in (("onnx", ""), ("tensorrt", "_trt")):
            if kind in opts.kinds:
                names |= {f"{opts.name}_{part_stem(part, batch)}{suffix}" for part in COMPONENTS}
                names.add(f"{opts.name}_tiles_b{batch}{suffix}")
    return names


def prepare_repo_dir(repo: Path, force: bool, planned: set[str] = frozenset()) -> set[str]:
    """Refuse before writing anything: a non-empty folder we did not write (unless ``force``: then we
    only add to it), and, always, a model folder of the same name that an earlier run did not write
    (a user's folder is never deleted, with or without ``force``). Returns the model folders earlier
    runs wrote."""
    if repo.exists() and not repo.is_dir():
        raise DfosdError(f"{repo} exists and is not a directory")
    if repo.is_dir() and any(repo.iterdir()) and not (repo / MARKER).is_file() and not force:
        raise DfosdError(f"{repo} is not empty and was not written by dfosd triton-repo or dfosd-serve",
                         hint="choose an empty or new folder, or pass --force to add our models to it")
    ours = models_written_before(repo)
    clash = sorted(m for m in planned if (repo / m).exists() and m not in ours)
    if clash:
        raise DfosdError(f"{repo} already holds {', '.join(clash)}, which dfosd did not write; "
                         "it would be replaced", hint="move it away, choose another --name, or another folder")
    repo.mkdir(parents=True, exist_ok=True)
    return ours


# ---------------------------------------------------------------- TensorRT plans


def read_plans(export: ExportDir, parts: dict[str, dict],
               contracts: dict[str, ComponentContract]) -> tuple[dict[str, dict] | None, list[str]]:
    """The plan manifests of one tile batch's three parts, or (None, why) when they are absent/unusable."""
    export_dir = export.path
    plans, problems = {}, []
    for name in COMPONENTS:
        stem = contracts[name].stem
        path = export_dir / plan_manifest_name(stem)
        if not path.is_file():
            return None, [f"no TensorRT plan for {stem}"]
        try:
            plan = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            problems.append(f"{path.name} is not valid JSON ({exc})")
            continue
        io = {(t["mode"], t["name"], t["dtype"], tuple(t["shape"])) for t in plan.get("io", [])}
        want = {("input", s.name, s.dtype, s.shape) for s in contracts[name].inputs} | {
            ("output", s.name, s.dtype, s.shape) for s in contracts[name].outputs}
        if io != want:
            problems.append(f"{plan.get('plan', stem)} has I/O {sorted(io)}, the export's contract is {sorted(want)}")
        if not plan.get("system", {}).get("sm"):
            problems.append(f"{path.name} does not record the GPU compute capability (system.sm)")
        problems += plan_problems(export, parts[name]["onnx"], plan)  # the TensorRT backend's own rule
        plans[name] = plan
    return (None, problems) if problems else (plans, [])


# ---------------------------------------------------------------- the repository


def _write_chain(repo: Path, result: "RepoResult", opts: "RepoOptions", contracts, part, *, suffix: str,
                 ensemble: str, records: RepoRecords, claim) -> None:
    """One model per part of the chain plus the ensemble that links them, for one tile batch.
    ``part(name, model)`` gives the part's (config, files, description)."""
    steps = {}
    for name in COMPONENTS:
        model = f"{opts.name}_{contracts[name].stem}{suffix}"
        config, files, description = part(name, model)
        write_model(repo, model, config, files, opts.link, records=records, claim=claim)
        result.models[model] = description
        steps[name] = model
    batch = contracts[COMPONENTS[0]].batch
    ens = f"{opts.name}_tiles_b{batch}{suffix}"
    write_model(repo, ens, ensemble_config(ens, steps, contracts), {}, opts.link, records=records, claim=claim)
    result.models[ens] = ensemble


def write_repository(export_dir: str | Path, repo_dir: str | Path, opts: RepoOptions = RepoOptions(), *,
                     force: bool = False) -> RepoResult:
    export = ExportDir(export_dir)
    export_dir = export.path
    by_batch = export.complete_batches()
    if not by_batch:
        raise DfosdError(f"{export_dir}/{MANIFEST_NAME} lists no complete set of encoder/unet/decoder parts",
                         hint="re-run dfosd-export into this directory")
    tile_batch = max(by_batch) if opts.tile_batch is None else opts.tile_batch
    if "python" in opts.kinds and tile_batch not in by_batch:  # before anything is written
        raise DfosdError(f"the export has no tile batch {tile_batch} (it has {sorted(by_batch)})",
                         hint=f"pass --tile-batch {max(by_batch)}, or re-export with --batch {tile_batch}")
    repo = Path(repo_dir)
    planned = planned_models(by_batch, opts)
    written_before = prepare_repo_dir(repo, force, planned)
    # Claim the folders first: a run cut short leaves folders the next run may still replace.
    records, engines = RepoRecords(repo), str(export_dir.resolve())
    claims = {m: "being written" for m in sorted(written_before | planned)}
    records.save(engines, claims)
    result = RepoResult(repo)
    try:
        _write_models(repo, export, by_batch, opts, tile_batch, result, records, lambda: records.save(engines, claims))
    finally:
        # The claims shrink to the folders that exist (all ours: a planned name a user held was refused
        # above), also when a check failed half-way: an unused claim would later let us delete a folder
        # the user made under that name.
        models = {m: "written by an earlier run" if m in written_before else "written by this run"
                  for m in sorted(written_before | planned) if (repo / m).is_dir()}
        models.update(result.models)
        records.save(engines, models)
    return result


def _write_models(repo: Path, export, by_batch: dict, opts: RepoOptions, tile_batch: int,
                  result: RepoResult, records: RepoRecords, claim) -> None:
    export_dir = export.path
    n = opts.name

    for batch, parts in by_batch.items():
        contracts = export.contracts(batch)
        check_chain(contracts)
        if "onnx" in opts.kinds:
            def onnx_part(name, model):
                files = {Path(f).name: export_dir / f for f in parts[name].get("files", [parts[name]["onnx"]])}
                return (onnx_config(model, parts[name], contracts[name], opts.device, opts.instances, opts.gpus), files,
                        f"onnxruntime_onnx {name}, tile batch {batch}")

            _write_chain(repo, result, opts, contracts, onnx_part, suffix="",
                         ensemble=f"ensemble of the ONNX parts, tile batch {batch}", records=records, claim=claim)
        if "tensorrt" in opts.kinds:
            plans, why = read_plans(export, parts, contracts)
            if plans is None:
                if opts.tensorrt_required or (why and not why[0].startswith("no TensorRT plan")):
                    raise problems_error(f"cannot add the TensorRT plans of tile batch {batch}", why,
                                         hint=f"build them: {rebuild_command(export_dir)}")
                result.notes.append(f"tile batch {batch}: {why[0]}; no tensorrt_plan models written")
            else:
                def plan_part(name, model, plans=plans):
                    plan = plans[name]
                    return (plan_config(model, plan, contracts[name], opts.instances, opts.gpus), {plan["plan"]: export_dir / plan["plan"]},
                            f"tensorrt_plan {name}, tile batch {batch}, SM {plan['system']['sm']}")

                _write_chain(repo, result, opts, contracts, plan_part, suffix="_trt",
                             ensemble=f"ensemble of the TensorRT plans, tile batch {batch}", records=records,
                             claim=claim)

    if "python" in opts.kinds:
        params = python_model_parameters(export, opts, tile_batch)
        files = {f"engines/{p.name}": p for p in export_files(export_dir)}
        write_model(repo, n, python_config(n, params, opts), files, opts.link,
                    {"model.py": model_py(opts.site_dirs, opts.path_dirs)}, records=records, claim=claim)
        result.models[n] = (f"python backend: dfosd runtime ({opts.backend}), any image size, tile batch "
                            f"{tile_batch}, up to {opts.max_batch} requests per batch")
