"""Every TensorRT name the TensorRT code touches exists in both supported major versions.

TensorRT cannot be installed on CI machines, so the check is static: the ``trt.X`` /
``trt.X.y`` chains (rooted at ``trt`` or ``self._trt``) of engines/tensorrt_*.py are read
from their syntax trees and looked up in the name lists of TensorRT 10.16 and 11.1
(shared/tensorrt-api, derived from NVIDIA's binding sources). Members called on TensorRT
objects (``engine.device_memory_size_v2``) cannot be typed statically; instead every
attribute whose name is a TensorRT member of exactly one version (``device_memory_size``,
``create_execution_context_without_device_memory``, ``int8_calibrator``, ...) is flagged.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The project's copy of shared/tensorrt-api (checked against it below when shared/ is beside the repo).
API_DIR = Path(__file__).resolve().parents[1] / "data" / "tensorrt-api"
SHARED_API_DIR = REPO.parent / "shared" / "tensorrt-api"
VERSIONS = ("tensorrt-v10.16.txt", "tensorrt-v11.1.txt")
SOURCES = sorted((REPO / "engines").glob("tensorrt_*.py"))
ROOTS = {"trt", "_trt"}  # the module is bound as ``trt`` (parameter/import) or ``self._trt``
# dfosd's (and Python's) own attributes that share a name with some TensorRT member.
DFOSD_ATTRIBUTES = {"precision", "message", "write", "engine"}
# Every TensorRT member the code calls or sets on TensorRT objects, with its class.
TRT_MEMBERS = (
    "Builder.create_network", "Builder.create_builder_config", "Builder.build_serialized_network",
    "OnnxParser.parse_from_file", "OnnxParser.num_errors", "OnnxParser.get_error",
    "ParserError.code", "ParserError.desc", "ParserError.node", "ParserError.node_name", "ParserError.node_operator",
    "INetworkDefinition.num_inputs", "INetworkDefinition.num_outputs", "INetworkDefinition.get_input",
    "INetworkDefinition.get_output", "ITensor.name", "ITensor.shape", "ITensor.dtype",
    "IBuilderConfig.builder_optimization_level", "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache",
    "IBuilderConfig.progress_monitor", "ITimingCache.serialize",
    "IProgressMonitor.phase_start", "IProgressMonitor.step_complete", "IProgressMonitor.phase_finish",
    "Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_shape",
    "ICudaEngine.device_memory_size_v2", "ICudaEngine.create_execution_context",
    "IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address",
    "IExecutionContext.set_device_memory", "IExecutionContext.execute_async_v3",
)


def _load(name: str) -> set[str]:
    path = API_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the TensorRT API lists belong in the repository")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def trt_names(source: str) -> tuple[set[str], set[str]]:
    """(dotted names after the tensorrt root, every other attribute name) used in ``source``."""
    rooted, other = set(), set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _chain(node)
        root = next((i for i, part in enumerate(chain or []) if part in ROOTS), None)
        if root is not None and root + 1 < len(chain):
            rooted.add(".".join(chain[root + 1:]))
        else:
            other.add(node.attr)
    return rooted, other


def test_sources_found():
    assert {p.name for p in SOURCES} >= {"tensorrt_build.py", "tensorrt_backend.py", "tensorrt_common.py"}


def test_trt_module_names_exist_in_both_versions():
    lists = {v: _load(v) for v in VERSIONS}
    used = set()
    for path in SOURCES:
        used |= trt_names(path.read_text())[0]
    # the extraction really sees the code (not an empty set passing vacuously)
    assert {"NetworkDefinitionCreationFlag.STRONGLY_TYPED", "ExecutionContextAllocationStrategy.USER_MANAGED",
            "MemoryPoolType.WORKSPACE", "OnnxParser", "Runtime", "IProgressMonitor", "__version__"} <= used
    # dunder members (IProgressMonitor.__init__) are Python's, not in the lists; __version__ is
    checked = {n for n in used if n == "__version__" or not n.split(".")[-1].startswith("__")}
    missing = {v: sorted(checked - names) for v, names in lists.items()}
    assert missing == {v: [] for v in VERSIONS}


def test_no_member_of_only_one_version_is_used():
    lists = {v: _load(v) for v in VERSIONS}
    members = {v: {n.rsplit(".", 1)[1] for n in names if "." in n} for v, names in lists.items()}
    one_version = (members[VERSIONS[0]] ^ members[VERSIONS[1]]) - DFOSD_ATTRIBUTES
    flagged = {}
    for path in SOURCES:
        rooted, other = trt_names(path.read_text())
        bad = sorted((other | {n.split(".")[-1] for n in rooted}) & one_version)
        if bad:
            flagged[path.name] = bad
    assert flagged == {}


def test_members_exist_in_both_versions_and_table_is_complete():
    lists = {v: _load(v) for v in VERSIONS}
    assert {v: sorted(set(TRT_MEMBERS) - names) for v, names in lists.items()} == {v: [] for v in VERSIONS}
    every_member = {n.rsplit(".", 1)[1] for names in lists.values() for n in names if "." in n}
    used = set()
    for path in SOURCES:
        used |= trt_names(path.read_text())[1] & every_member
    # an attribute that is some TensorRT member but not in the table would go unchecked
    assert sorted(used - {m.split(".")[1] for m in TRT_MEMBERS} - DFOSD_ATTRIBUTES) == []


def test_extraction_catches_version_specific_names():
    """The checker itself: 10.x-only names in code are found."""
    lists = {v: _load(v) for v in VERSIONS}
    src = ("def f(trt, builder, engine):\n"
           "    c = builder.create_builder_config(); c.set_flag(trt.BuilderFlag.FP16)\n"
           "    return engine.create_execution_context_without_device_memory(), engine.device_memory_size\n")
    rooted, other = trt_names(src)
    assert "BuilderFlag.FP16" in rooted and "BuilderFlag.FP16" not in lists["tensorrt-v11.1.txt"]
    members11 = {n.rsplit(".", 1)[1] for n in lists["tensorrt-v11.1.txt"] if "." in n}
    assert {"create_execution_context_without_device_memory", "device_memory_size"} <= other - members11


@pytest.mark.parametrize("name", ["tensorrt-v10.16.txt", "tensorrt-v11.1.txt"])
def test_vendored_api_lists_match_shared(name):
    shared = SHARED_API_DIR / name
    if not shared.is_file():
        pytest.skip(f"{SHARED_API_DIR} is not beside this checkout: nothing to compare the copy with")
    assert (API_DIR / name).read_text() == shared.read_text()
