"""Importing dfosd and asking any command for --help loads neither torch, CUDA nor TensorRT;
imports between the pipeline's stages flow one way."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The pipeline, in order: a stage may import the stages before it, never one after it.
# training sits beside the pipeline on core; command-line entry modules may reach anywhere.
STAGES = ("core", "calibration", "export", "engines", "runtime", "serving", "bench")

PROBE = """
import sys
{body}
heavy = [m for m in ("torch", "tensorrt", "onnxruntime", "openvino", "diffusers", "cuda", "pycuda", "modelopt",
                     "numpy", "onnx", "tritonclient") if m in sys.modules]
print("HEAVY=" + ",".join(heavy))
"""


def _heavy_after(body: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return line.split("=", 1)[1]


def test_import_package_is_light():
    assert _heavy_after("import dfosd, dfosd.cli, dfosd.engines.base, dfosd.core.contracts, dfosd.core.vocab, "
                        "dfosd.core.manifest, dfosd.calibration.recipe, dfosd.serving.triton_repo") == ""


def test_serving_client_imports_no_torch():
    # dfosd-trt-run --server and other clients of a remote model need no local engine stack
    assert _heavy_after("import dfosd.serving.client") == ""


COMMANDS = [
    ("dfosd.cli", []),
    *[("dfosd.cli", [name]) for name in ("checkpoint", "export", "run", "bench", "build", "aoti-export", "parity", "train",
                                         "triton-repo", "demo", "verify", "gpu-bench", "convert", "inspect")],
    ("dfosd.export.cli", []),
    ("dfosd.runtime.cli", []),
    ("dfosd.bench.cli", []),
    ("dfosd.bench.gpu_bench", []),
    ("dfosd.bench.verify", []),
    ("dfosd.serving.cli", []),
    ("dfosd.training.cli", []),
]


def test_every_command_is_covered():
    from dfosd.cli import LazyGroup

    named = {args[0] for module, args in COMMANDS if args}
    assert named == set(LazyGroup._commands)


@pytest.mark.parametrize("module,args", COMMANDS)
def test_help_is_light(module, args):
    body = (f"import importlib; from click.testing import CliRunner\n"
            f"r = CliRunner().invoke(importlib.import_module({module!r}).main, {args!r} + ['--help'])\n"
            f"assert r.exit_code == 0, r.output\nassert 'Usage' in r.output")
    assert _heavy_after(body) == ""


def _stage_imports(path: Path) -> set[str]:
    """The dfosd stages a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found |= {n.split(".")[1] for n in names if n.startswith("dfosd.") and n.count(".") >= 1}
    return found


def test_imports_flow_down_the_pipeline():
    backwards = []
    modules = [p for stage in (*STAGES, "training") for p in sorted((REPO / stage).rglob("*.py"))]
    assert len(modules) > 40  # the walk really sees the package
    for path in modules:
        stage = path.relative_to(REPO).parts[0]
        if path.name == "cli.py" or path.name.endswith("_cli.py"):
            continue  # entry points wire the stages together
        allowed = {"core"} if stage == "training" else set(STAGES[:STAGES.index(stage)])
        for dst in _stage_imports(path) - {stage}:
            if dst not in allowed:
                backwards.append(f"{path.relative_to(REPO)} imports dfosd.{dst}")
    assert backwards == []


def test_no_module_imports_a_private_name_of_another():
    private = []
    for path in sorted(REPO.rglob("*.py")):
        if "tests" in path.relative_to(REPO).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dfosd"):
                private += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_")]
    assert private == []
