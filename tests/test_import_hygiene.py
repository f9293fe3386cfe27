"""Importing dfosd and asking any command for --help loads neither torch, CUDA nor TensorRT."""

import subprocess
import sys

import pytest

PROBE = """
import sys
{body}
heavy = [m for m in ("torch", "tensorrt", "onnxruntime", "diffusers", "cuda", "pycuda") if m in sys.modules]
print("HEAVY=" + ",".join(heavy))
"""


def _heavy_after(body: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return line.split("=", 1)[1]


def test_import_package_is_light():
    assert _heavy_after("import dfosd, dfosd.cli, dfosd.engines.base, dfosd.core.contracts") == ""


@pytest.mark.parametrize("module,args", [
    ("dfosd.cli", []),
    ("dfosd.cli", ["export"]),
    ("dfosd.cli", ["run"]),
    ("dfosd.cli", ["bench"]),
    ("dfosd.cli", ["verify"]),
    ("dfosd.cli", ["gpu-bench"]),
    ("dfosd.export.cli", []),
    ("dfosd.runtime.cli", []),
    ("dfosd.bench.cli", []),
    ("dfosd.bench.gpu_bench", []),
    ("dfosd.bench.verify", []),
])
def test_help_is_light(module, args):
    body = (f"import importlib; from click.testing import CliRunner\n"
            f"r = CliRunner().invoke(importlib.import_module({module!r}).main, {args!r} + ['--help'])\n"
            f"assert r.exit_code == 0, r.output\nassert 'Usage' in r.output")
    assert _heavy_after(body) == ""
