"""TensorRT facts that building and loading plans share: the lazy import, the system a
plan is tied to, the plan manifest, the rebuild command.

The backend imports this module, not the builder: loading a plan needs none of the
build machinery (parser, builder config, timing cache).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.vocab import plan_manifest_name

SUPPORTED_MAJORS = (10, 11)
PLAN_FORMAT = 1
INSTALL_HINT = ('install TensorRT from NVIDIA\'s index: pip install --extra-index-url https://pypi.nvidia.com '
                '"tensorrt-cu13>=10.12" (or dfosd[tensorrt]), on a machine with a CUDA GPU')


def import_tensorrt():
    """``tensorrt``, imported lazily, of a supported major version."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise DfosdError(f"TensorRT does not import here ({exc})", hint=INSTALL_HINT) from exc
    major = tensorrt_major(trt)
    if major not in SUPPORTED_MAJORS:
        raise DfosdError(f"TensorRT {trt.__version__} is not supported (dfosd supports "
                         f"{', '.join(f'{m}.x' for m in SUPPORTED_MAJORS)})", hint=INSTALL_HINT)
    return trt


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def system_info(trt) -> dict[str, Any]:
    """What a plan is tied to: TensorRT version, GPU and its SM, CUDA version."""
    import torch

    if not torch.cuda.is_available():
        raise DfosdError("TensorRT plans need a CUDA GPU and none is visible",
                         hint="run on a GPU machine, or use --backend onnxruntime")
    dev = torch.cuda.current_device()
    sm_major, sm_minor = torch.cuda.get_device_capability(dev)
    # torch's CUDA runtime: the process's CUDA, which TensorRT's libraries must share here.
    cuda = torch.version.cuda or ""
    return {"tensorrt": str(trt.__version__), "tensorrt_major": tensorrt_major(trt),
            "gpu": torch.cuda.get_device_name(dev), "sm": f"{sm_major}.{sm_minor}",
            "cuda": cuda, "cuda_major": int(cuda.split(".")[0]) if cuda else None}


def rebuild_command(export_dir: str | Path) -> str:
    return f"dfosd build {shlex.quote(str(export_dir))} --backend tensorrt"


def plan_problems(export, onnx: str, plan_manifest: dict[str, Any], *, quick: bool = True) -> list[str]:
    """The one rule for whether a plan may run a part of ``export`` (an ``ExportDir``), used by
    the TensorRT backend and by the Triton repository alike: the plan file is the one its
    manifest recorded (size, or hash where ``quick`` allows), and it was built from exactly
    this export's ``onnx`` (graph and external data, by the hashes the export recorded)."""
    from dfosd.core.manifest import changed_files

    problems = []
    plan = plan_manifest.get("plan")
    if not plan or changed_files(export.path, {plan: plan_manifest.get("plan_file", {})}, quick=quick):
        problems.append(f"{plan or 'its plan'} is missing or changed (truncated, edited) since it was built")
    built_from = plan_manifest.get("onnx_files")
    exported = {n: r.get("sha256") for n, r in export.files.items() if n == onnx or n == onnx + ".data"}
    if (plan_manifest.get("onnx") != onnx or not isinstance(built_from, dict)
            or {n: (r or {}).get("sha256") for n, r in built_from.items()} != exported):
        problems.append(f"{plan or 'its plan'} was built from another {onnx} than this export's")
    return problems


def plan_mismatches(built: dict[str, Any], running: dict[str, Any]) -> list[str]:
    """Why a plan built on ``built`` (its manifest's ``system``) cannot run on ``running``."""
    problems = []
    if built.get("tensorrt_major") != running["tensorrt_major"]:
        problems.append(f"built with TensorRT {built.get('tensorrt')}, this is TensorRT {running['tensorrt']}")
    if built.get("sm") != running["sm"]:
        problems.append(f"built for SM {built.get('sm')} ({built.get('gpu')}), this GPU is SM {running['sm']} "
                        f"({running['gpu']})")
    if built.get("cuda_major") != running["cuda_major"]:
        problems.append(f"built with CUDA {built.get('cuda')}, this process runs CUDA {running['cuda']}")
    return problems


def check_plan_system(plan_manifest: dict[str, Any], running: dict[str, Any], export_dir: str | Path) -> None:
    problems = plan_mismatches(plan_manifest.get("system", {}), running)
    if problems:
        raise problems_error(f"{Path(export_dir) / plan_manifest.get('plan', '?')} does not fit this system", problems,
                             hint=f"rebuild the plans here: {rebuild_command(export_dir)}")


def trt_dtypes(trt) -> dict[str, Any]:
    """Contract dtype names -> TensorRT DataType members."""
    return {"uint8": trt.DataType.UINT8, "float16": trt.DataType.HALF, "float32": trt.DataType.FLOAT}


def read_plan_manifest(export_dir: str | Path, stem: str) -> dict[str, Any]:
    path = Path(export_dir) / plan_manifest_name(stem)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DfosdError(f"{Path(export_dir)} has no TensorRT plan for {stem}",
                         hint=f"build the plans: {rebuild_command(export_dir)}") from None
    except json.JSONDecodeError as exc:
        raise DfosdError(f"{path} is not valid JSON ({exc})", hint=f"rebuild: {rebuild_command(export_dir)}") from exc
