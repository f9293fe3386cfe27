"""The C++ runner's TensorRT kind (serving/cpp/src/tensorrt_engine.cpp), which cannot be built here.

Its C++ names are checked against the TensorRT Python API lists of 10.16 and 11.1, and, where
``DFOSD_TENSORRT_INCLUDE`` points at TensorRT headers (e.g. NVIDIA/TensorRT's open-source
``include/`` of a release tag), the file is compiled (syntax and types) against them. Its plan
lookup from the export's manifests runs in test_serving_cpp.py (``--check``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CPP = Path(__file__).resolve().parents[2] / "serving" / "cpp"
API = Path(__file__).resolve().parents[1] / "data" / "tensorrt-api"  # copy of shared/tensorrt-api

# C++ names the TensorRT kind uses -> the Python name of the same API (shared/tensorrt-api lists).
CPP_TO_PYTHON = {
    "createInferRuntime": "Runtime",
    "deserializeCudaEngine": "Runtime.deserialize_cuda_engine",
    "createExecutionContext": "ICudaEngine.create_execution_context",
    "kUSER_MANAGED": "ExecutionContextAllocationStrategy.USER_MANAGED",
    "getDeviceMemorySizeV2": "ICudaEngine.device_memory_size_v2",
    "setDeviceMemoryV2": "IExecutionContext.set_device_memory",
    "getNbIOTensors": "ICudaEngine.num_io_tensors",
    "getIOTensorName": "ICudaEngine.get_tensor_name",
    "getTensorIOMode": "ICudaEngine.get_tensor_mode",
    "getTensorShape": "ICudaEngine.get_tensor_shape",
    "getTensorDataType": "ICudaEngine.get_tensor_dtype",
    "setTensorAddress": "IExecutionContext.set_tensor_address",
    "enqueueV3": "IExecutionContext.execute_async_v3",
    "TensorIOMode::kINPUT": "TensorIOMode.INPUT",
    "DataType::kUINT8": "DataType.UINT8",
    "DataType::kFLOAT": "DataType.FLOAT",
    "DataType::kHALF": "DataType.HALF",
}
REMOVED_OR_OLD = ("getDeviceMemorySize()", "setDeviceMemory(", "enqueueV2", "getBindingIndex", "destroy()",
                  "createExecutionContextWithoutDeviceMemory", "setBindingDimensions")


def test_tensorrt_kind_uses_names_of_both_majors():
    source = (CPP / "src" / "tensorrt_engine.cpp").read_text()
    lists = {v: set((API / f"tensorrt-v{v}.txt").read_text().split()) for v in ("10.16", "11.1")}
    for cpp, py in CPP_TO_PYTHON.items():
        assert cpp in source, f"{cpp} not used any more: update the table"
        for v, names in lists.items():
            assert py in names, f"{py} (for C++ {cpp}) is not in TensorRT {v}"
    for old in REMOVED_OR_OLD:
        assert old not in source, f"{old} is gone or deprecated in TensorRT 10/11"
    # every TensorRT method called on an engine/context/runtime object is in the table
    called = set(re.findall(r"(?:->|\.)((?:get|set|create|deserialize|enqueue)[A-Za-z0-9]+)\(", source))
    assert called <= set(CPP_TO_PYTHON), called - set(CPP_TO_PYTHON)


@pytest.mark.skipif(not os.environ.get("DFOSD_TENSORRT_INCLUDE") or not shutil.which("c++"),
                    reason="set DFOSD_TENSORRT_INCLUDE to TensorRT include folder(s) (os.pathsep-separated) "
                           "to compile the TensorRT kind against them")
def test_tensorrt_kind_compiles_against_tensorrt_headers():
    cuda = os.environ.get("DFOSD_CUDA_INCLUDE", "/usr/local/cuda/include")
    if not (Path(cuda) / "cuda_runtime_api.h").is_file():
        pytest.skip(f"no CUDA headers at {cuda} (set DFOSD_CUDA_INCLUDE)")
    for inc in os.environ["DFOSD_TENSORRT_INCLUDE"].split(os.pathsep):
        out = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                              "-Wno-deprecated-declarations", "-isystem", inc, "-isystem", cuda,
                              "-DDFOSD_WITH_TENSORRT", str(CPP / "src" / "tensorrt_engine.cpp")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{inc}:\n{out.stderr[-4000:]}"
