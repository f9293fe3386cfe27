"""AOTInductor packages: each part compiled ahead of time to a ``.pt2`` for one device.

The engine path that needs no TensorRT (notes: "Without TensorRT"): ``torch.export``
traces the same ``OneStepSR`` parts the ONNX export traces, and
``torch._inductor.aoti_compile_and_package`` compiles each into a self-contained
package (generated C++/Triton kernels + weights) that ``engines.aoti_backend`` loads
with ``aoti_load_package`` and runs on the runner's static buffers.

Layout, beside the export's ``manifest.json`` (which this module never rewrites)::

    manifest.aoti.json         one section per device: system, precision, options, contracts, hashes
    encoder_b1.cuda.pt2        <part>_b<batch>.<device>.pt2, one per part and tile batch
    unet_b1.cuda.pt2
    decoder_b1.cpu.pt2         packages for several devices can live side by side

A package is tied to the torch version that built it and to its device: for CUDA the
GPU architecture (SM) and CUDA version it was compiled for, for the CPU the CPU model
(inductor compiles CPU kernels with ``-march=native``) and its vector capability. The
manifest records them and ``check_build`` refuses a package built elsewhere with the
command that rebuilds it, instead of failing (or crashing on an illegal instruction)
inside the loader.

Precision: ``fp32`` compiles the fp32 parts; ``fp16`` compiles the parts built with
``build_from_model(..., dtype=torch.float16)``: half-precision networks with the fp32
islands of ``core/onestep.py`` (uint8<->float, bicubic resize, latent scaling, the x0
step, clamping) and fp32 part boundaries, so the contracts are the same in both.

channels_last (``--channels-last``, default on for CUDA, off for the CPU): the VAE and
UNet conv weights are converted to ``torch.channels_last`` before export. On CUDA,
cuDNN's fp16 tensor-core convolutions are NHWC kernels; with NCHW weights inductor
either inserts layout conversions around every conv or relies on its own layout
heuristic (``layout_optimization``), which does not always fire for these graphs. The
part boundaries stay contiguous NCHW (the contracts' buffers), so only the weights and
the internal activations change layout. On the CPU the oneDNN path gains nothing from
it for these sizes, hence off.

``max_autotune`` (off by default): inductor benchmarks Triton/cuBLAS templates for each
GEMM/conv on the build GPU. Better kernels, much longer builds (many minutes for the
full-size UNet): use it for the deployment build, not for iteration.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.manifest import (
    build_key,
    file_record,
    changed_files,
    package_versions,
    ExportDir,
    source_fingerprint,
    write_json_atomic,
)
from dfosd.core.vocab import AOTI_MANIFEST_NAME, FLOAT_PRECISIONS, PACKAGE_SUFFIX, package_name
from dfosd.engines.machine import cpu_model

log = logging.getLogger(__name__)

AOTI_FORMAT = 1
AOTI_PRECISIONS = FLOAT_PRECISIONS  # AOTInductor compiles float parts; 8-bit exports use their float precision
AOTI_DEVICES = ("cpu", "cuda")


def default_channels_last(device: str) -> bool:
    return device == "cuda"


def rebuild_command(export_dir: str | Path, device: str) -> str:
    return f"dfosd build {shlex.quote(str(export_dir))} --backend aoti --device {device}"


def check_device(device: str) -> None:
    if device not in AOTI_DEVICES:
        raise DfosdError(f"--device {device!r}: choose one of {', '.join(AOTI_DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DfosdError(f"AOTInductor packages for cuda need a CUDA GPU: {why} (torch {torch.__version__})",
                             hint="build them on the GPU machine that will run them, or use --device cpu")


def system_info(device: str) -> dict[str, Any]:
    """What a package is tied to: torch version, device, and the GPU's SM or the CPU's ISA."""
    import torch

    info: dict[str, Any] = {"torch": str(torch.__version__), "device": device, "arch": platform.machine()}
    if device == "cuda":
        check_device(device)
        dev = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(dev)
        info.update(gpu=torch.cuda.get_device_name(dev), sm=f"{major}.{minor}", cuda=torch.version.cuda)
    else:
        info.update(cpu=cpu_model(), cpu_isa=str(torch.backends.cpu.get_cpu_capability()))
    return info


def system_mismatches(built: dict[str, Any], running: dict[str, Any]) -> list[str]:
    """Why packages built on ``built`` (a manifest section's ``system``) cannot run on ``running``."""
    problems = []
    if built.get("torch") != running.get("torch"):
        problems.append(f"built with torch {built.get('torch')}, this is torch {running.get('torch')}")
    if built.get("device") != running.get("device"):
        problems.append(f"built for {built.get('device')}, loading for {running.get('device')}")
    if built.get("arch") != running.get("arch"):
        problems.append(f"built on {built.get('arch')}, this machine is {running.get('arch')}")
    if running.get("device") == "cuda":
        if built.get("sm") != running.get("sm"):
            problems.append(f"built for SM {built.get('sm')} ({built.get('gpu')}), this GPU is SM "
                            f"{running.get('sm')} ({running.get('gpu')})")
        if built.get("cuda") != running.get("cuda"):
            problems.append(f"built with CUDA {built.get('cuda')}, this torch runs CUDA {running.get('cuda')}")
    else:
        # inductor compiles CPU kernels with -march=native: the package may use any instruction of
        # the build CPU, so only the same CPU model (and vector capability) is known to run it.
        if built.get("cpu") != running.get("cpu"):
            problems.append(f"built on CPU {built.get('cpu')!r}, this CPU is {running.get('cpu')!r} "
                            "(CPU packages are compiled with -march=native)")
        if built.get("cpu_isa") != running.get("cpu_isa"):
            problems.append(f"built for CPU capability {built.get('cpu_isa')}, this CPU has {running.get('cpu_isa')}")
    return problems


def read_aoti_manifest(export_dir: str | Path) -> dict[str, Any] | None:
    """The AOTI manifest of an export directory, or None when there is none (or it is unreadable)."""
    path = Path(export_dir) / AOTI_MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if data.get("format") != AOTI_FORMAT or not isinstance(data.get("builds"), dict):
        return None
    return data


def check_build(export_dir: str | Path, device: str, *, export: ExportDir | None = None,
                running: dict | None = None) -> dict[str, Any]:
    """The manifest section of ``device``'s packages, once it is known to fit this system and export.

    Refuses (DfosdError naming the rebuild command) when there are no packages for the
    device, when they were built with another torch / GPU SM / CPU ISA, or from another
    export (the export was redone since: other checkpoint, base or options).
    """
    export_dir = Path(export_dir)
    fix = f"build them here: {rebuild_command(export_dir, device)}"
    aoti = read_aoti_manifest(export_dir)
    if aoti is None or device not in aoti["builds"]:
        have = sorted(aoti["builds"]) if aoti else []
        extra = f" (it has packages for {', '.join(have)})" if have else ""
        raise DfosdError(f"{export_dir} has no AOTInductor packages for {device}{extra}", hint=fix)
    build = aoti["builds"][device]
    running = system_info(device) if running is None else running
    problems = system_mismatches(build.get("system", {}), running)
    export = ExportDir(export_dir, check="none") if export is None else export
    if build.get("export_build_key") != export.build_key:
        problems.append("built from an earlier export of this directory (its manifest.json changed since)")
    if problems:
        raise problems_error(f"the {device} AOTInductor packages in {export_dir} do not fit", problems,
                             hint=f"rebuild them: {rebuild_command(export_dir, device)} --force")
    return build


@dataclass
class AotiResult:
    export_dir: Path
    device: str
    build: dict
    reused: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def inductor_configs(device: str, *, max_autotune: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if max_autotune:
        cfg["max_autotune"] = True
    return cfg


def export_program(module, contract: ComponentContract, *, device: str):
    """``torch.export`` of one part at its contract's static shapes (sample inputs on ``device``)."""
    import torch

    sample = contract.sample_inputs()
    args = tuple(sample[s.name].to(device) for s in contract.inputs)
    with torch.no_grad():
        return torch.export.export(module.eval(), args, strict=False)


def compile_part(module, contract: ComponentContract, package: Path, *, device: str,
                 configs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export and AOT-compile ``module`` (already on ``device``) to ``package`` atomically.

    Returns facts for the manifest (seconds spent tracing and compiling).
    """
    import torch

    package = Path(package)
    package.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    program = export_program(module, contract, device=device)
    t1 = time.perf_counter()
    # The compiler wants a path ending in .pt2: compile into a hidden temporary folder, then
    # move the finished package into place (a reader never sees half a package).
    with tempfile.TemporaryDirectory(prefix=f".{package.name}.", suffix=".tmp", dir=package.parent) as tmp:
        staged = Path(tmp) / package.name
        torch._inductor.aoti_compile_and_package(program, package_path=str(staged),
                                                 inductor_configs=dict(configs or {}))
        os.replace(staged, package)
    return {"export_seconds": round(t1 - t0, 2), "compile_seconds": round(time.perf_counter() - t1, 2)}


def _build_inputs(export: ExportDir, device: str, precision: str, channels_last: bool, max_autotune: bool,
                  system: dict) -> dict[str, Any]:
    return {
        "export_build_key": export.build_key,
        "device": device,
        "precision": precision,
        "channels_last": channels_last,
        "max_autotune": max_autotune,
        "system": system,
        "software": {"dfosd_source": source_fingerprint(("core", "export")),
                     **package_versions("dfosd", "torch", "diffusers")},
    }


def _resolve_precision(export: ExportDir, precision: str | None, progress: Callable[[str], None]) -> str:
    if precision is not None:
        if precision not in AOTI_PRECISIONS:
            raise DfosdError(f"--precision {precision!r}: AOTInductor packages are {' or '.join(AOTI_PRECISIONS)}",
                             hint="int8/fp8 engines come from the Q/DQ ONNX export through TensorRT")
        return precision
    exported = export.precision
    if exported in AOTI_PRECISIONS:
        return exported
    fallback = export.float_precision
    progress(f"the export is {exported}; AOTInductor does not quantize: compiling {fallback} "
             "(the export's float precision)")
    return fallback if fallback in AOTI_PRECISIONS else "fp16"


def _load_inputs(export: ExportDir, base_spec: str | None, ckpt_path: str | Path | None, base_model=None):
    """Base and checkpoint the export was made from, checked against what its manifest recorded."""
    from dfosd.core.bases import load_base
    from dfosd.core.readers import read_model_as_exported
    from dfosd.core.srmodel import validate_model

    export_dir, inputs = export.path, export.inputs
    ckpt_path = Path(ckpt_path if ckpt_path is not None else inputs.get("checkpoint", ""))
    if not ckpt_path.is_file():
        raise DfosdError(f"the checkpoint this export was made from ({ckpt_path}) is not here",
                         hint="pass it with --ckpt PATH (the same lora.safetensors)")
    ckpt = read_model_as_exported(ckpt_path, export)  # any family the export read
    if ckpt.sha256 != inputs.get("checkpoint_sha256"):
        raise DfosdError(f"{ckpt_path} is not the checkpoint {export_dir} was exported from (sha256 differs)",
                         hint="pass the export's checkpoint with --ckpt, or re-export this checkpoint first")
    base_spec = base_spec if base_spec is not None else inputs.get("base")
    if not base_spec:
        raise DfosdError(f"{export_dir}/manifest.json does not name its base", hint="pass --base")
    base = load_base(base_spec) if base_model is None else base_model
    want = inputs.get("base_fingerprint")
    if want is not None and base.fingerprint != want:
        raise DfosdError(f"base {base_spec} is not the base {export_dir} was exported from (fingerprint differs"
                         + (", e.g. synthetic weights from another torch version)" if base.is_synthetic else ")"),
                         hint="re-export with this base first, so ONNX and AOTInductor parts share weights")
    validate_model(ckpt, base)
    return base, ckpt


def _write_build(export_dir: Path, device: str, build: dict) -> None:
    old = read_aoti_manifest(export_dir) or {"format": AOTI_FORMAT, "kind": "dfosd-aoti", "builds": {}}
    old["builds"][device] = build
    write_json_atomic(export_dir / AOTI_MANIFEST_NAME, old)


def _clear_stale(export_dir: Path, device: str, keep: set[str], previous: set[str]) -> None:
    """Remove the packages the previous build of this device wrote and this one did not;
    a package dfosd did not record (a user's file) is never touched."""
    for name in sorted(previous - keep):
        p = export_dir / name
        # a bare file name of this folder only: an edited record must not reach outside it (a
        # symlink is removed itself, never its target)
        if p.parent == export_dir and (p.is_file() or p.is_symlink()):
            p.unlink()
    # Staging folders of this device's killed builds only: another device's build may be running.
    for p in export_dir.glob(f".*.{device}{PACKAGE_SUFFIX}.*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def export_aoti(export_dir: str | Path, *, device: str, precision: str | None = None,
                channels_last: bool | None = None, max_autotune: bool = False, force: bool = False,
                base: str | None = None, ckpt: str | Path | None = None, base_model=None,
                progress: Callable[[str], None] = log.info) -> AotiResult:
    """Compile every part and tile batch of an export into ``<stem>.<device>.pt2`` packages.

    Reads the export's manifest for tile, batches, precision, base and checkpoint (the
    checkpoint is re-read and checked against the recorded sha256), rebuilds the parts
    with ``build_from_model`` and compiles them. ``precision`` defaults to the export's
    (its float precision for int8/fp8 exports); ``channels_last`` to on for CUDA.
    Reuses the packages when the inputs, options, software and system are unchanged.

    ``base_model``: an already loaded ``Base`` to use instead of loading the recorded spec
    (checked by fingerprint); it is left as it was (the LoRA is merged into a copy).
    """
    import torch

    t0 = time.perf_counter()
    export_dir = Path(export_dir)
    export = ExportDir(export_dir, check="none")  # the packages are built from the checkpoint
    check_device(device)
    notes: list[str] = []

    def say(msg: str) -> None:
        notes.append(msg)
        progress(msg)

    precision = _resolve_precision(export, precision, say)
    channels_last = default_channels_last(device) if channels_last is None else bool(channels_last)
    system = system_info(device)
    inputs = _build_inputs(export, device, precision, channels_last, max_autotune, system)
    key = build_key(inputs)
    old = (read_aoti_manifest(export_dir) or {"builds": {}})["builds"].get(device)
    if not force and old and old.get("build_key") == key and not changed_files(export_dir, old.get("files", {})):
        progress(f"reusing the {device} AOTInductor packages in {export_dir}: same export, options, software, system")
        return AotiResult(export_dir, device, old, reused=True, seconds=time.perf_counter() - t0)

    own_base = base_model is None
    if own_base:
        progress(f"loading base {export.inputs.get('base') if base is None else base}")
    base_model, checkpoint = _load_inputs(export, base, ckpt, base_model)
    from dfosd.core.onestep import build_from_model

    dtype = torch.float16 if precision == "fp16" else torch.float32
    # A base loaded here is ours alone: merge the LoRA in place (a full-size UNet copy is 3.5 GB); a
    # caller's base is copied whole (UNet and VAE), so .to(device)/channels_last below never touch it.
    model = build_from_model(base_model, checkpoint, dtype=dtype, copy=not own_base).to(device)
    del base_model
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-D weights only; boundaries stay NCHW
    configs = inductor_configs(device, max_autotune=max_autotune)
    components, files = {}, {}
    for part in export.all_parts():
        stem, contract = part.stem, part.contract
        name = package_name(stem, device)
        progress(f"compiling {name} ({precision}{', channels_last' if channels_last else ''}"
                 f"{', max-autotune' if max_autotune else ''})")
        info = compile_part(model.part(part.component), contract, export_dir / name, device=device,
                            configs=configs)
        files[name] = file_record(export_dir / name)
        components[stem] = {"component": part.component, "batch": part.batch, "package": name,
                            "precision": precision, "contract": contract.to_dict(), **info}
        progress(f"  {name}: export {info['export_seconds']:.1f} s, compile {info['compile_seconds']:.1f} s")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    _clear_stale(export_dir, device, set(files), set((old or {}).get("files", {})))
    build = {
        "build_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **inputs,
        "checkpoint_sha256": checkpoint.sha256,
        "inductor_configs": configs,
        "tile": export.tile,
        "batches": list(export.batches),
        "components": components,
        "files": files,
        "notes": notes,
    }
    _write_build(export_dir, device, build)
    return AotiResult(export_dir, device, build, reused=False, seconds=time.perf_counter() - t0, notes=notes)
