"""TensorRT builder and backend: the logic that runs without TensorRT here, the rest on a GPU.

Version branching is exercised with stand-in module objects that carry only what the
code reads (``__version__`` and the one enum it needs); plan manifests are compared with
system descriptions as plain dicts. The tests marked ``tensorrt``/``gpu`` build and run
real plans and skip (with the reason) where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest

TINY = "synthetic:tiny"
TILE = 32
HAS_TRT = importlib.util.find_spec("tensorrt") is not None

H100 = {"tensorrt": "10.16.0", "tensorrt_major": 10, "gpu": "NVIDIA H100 80GB HBM3", "sm": "9.0",
        "cuda": "12.8", "cuda_major": 12}


def fake_trt(version: str, strongly_typed: int = 3):
    """A stand-in ``tensorrt`` module: its version and the creation-flag enum member."""
    return SimpleNamespace(__version__=version,
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=strongly_typed))


def test_strongly_typed_network_flags_per_major_version():
    from dfosd.core.errors import DfosdError
    from dfosd.engines.tensorrt_build import network_flags

    assert network_flags(fake_trt("10.16.0.5", strongly_typed=5)) == 1 << 5  # 10.x: opt in by flag
    assert network_flags(fake_trt("11.1.0")) == 0  # 11.x: the only mode, no flag
    with pytest.raises(DfosdError, match="no strongly typed"):
        network_flags(fake_trt("9.3.0"))


def test_import_tensorrt_checks_the_major_version(monkeypatch):
    from dfosd.core.errors import DfosdError
    from dfosd.engines.tensorrt_common import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("11.1.0"))
    assert import_tensorrt().__version__ == "11.1.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("8.6.1"))
    with pytest.raises(DfosdError, match="TensorRT 8.6.1 is not supported"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(DfosdError, match="does not import") as err:
        import_tensorrt()
    assert "pypi.nvidia.com" in str(err.value)


def test_plan_system_comparison(tmp_path):
    from dfosd.core.errors import DfosdError
    from dfosd.engines.tensorrt_common import check_plan_system, plan_mismatches

    assert plan_mismatches(H100, H100) == []
    assert plan_mismatches(H100, {**H100, "tensorrt": "10.17.1", "cuda": "12.9"}) == []  # same majors
    l4 = {**H100, "gpu": "NVIDIA L4", "sm": "8.9"}
    trt11 = {**H100, "tensorrt": "11.1.0", "tensorrt_major": 11, "cuda": "13.0", "cuda_major": 13}
    assert plan_mismatches(H100, l4) == ["built for SM 9.0 (NVIDIA H100 80GB HBM3), this GPU is SM 8.9 (NVIDIA L4)"]
    assert plan_mismatches(H100, trt11) == ["built with TensorRT 10.16.0, this is TensorRT 11.1.0",
                                            "built with CUDA 12.8, this process runs CUDA 13.0"]
    export_dir = tmp_path / "my export"
    with pytest.raises(DfosdError) as err:
        check_plan_system({"plan": "unet_b1.plan", "system": H100}, trt11, export_dir)
    text = str(err.value)
    assert "unet_b1.plan does not fit this system: 2 problem(s)" in text
    assert f"dfosd build '{export_dir}' --backend tensorrt" in text  # the rebuild command, quoted


def test_plan_jobs_of_a_float_export(tiny_export_fp32):
    from dfosd.engines.tensorrt_build import OPT_LEVEL, plan_jobs

    jobs = plan_jobs(tiny_export_fp32)
    assert [j.stem for j in jobs] == ["decoder_b1", "decoder_b2", "encoder_b1", "encoder_b2", "unet_b1", "unet_b2"]
    job = next(j for j in jobs if j.stem == "unet_b2")
    assert (job.qdq, job.optimization_level, job.precision, job.batch) == (False, OPT_LEVEL, "fp32", 2)
    assert job.plan.name == "unet_b2.plan" and job.plan_manifest.name == "unet_b2.plan.json"
    assert job.io_table() == [{"name": "latent", "mode": "input", "dtype": "float32", "shape": [2, 4, 16, 16]},
                              {"name": "denoised_latent", "mode": "output", "dtype": "float32",
                               "shape": [2, 4, 16, 16]}]
    assert set(job.onnx_files) == {"unet_b2.onnx"}


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")
def test_without_tensorrt_build_and_backend_say_how_to_get_it(tiny_export_fp32):
    from dfosd.core.errors import DfosdError
    from dfosd.engines.base import select_backend
    from dfosd.engines.tensorrt_backend import TensorRTBackend
    from dfosd.engines.tensorrt_build import build_engines
    from dfosd.engines.tensorrt_common import read_plan_manifest

    with pytest.raises(DfosdError, match="TensorRT does not import"):
        build_engines(tiny_export_fp32)
    assert TensorRTBackend.availability() == (False, "the tensorrt package is not installed")
    with pytest.raises(DfosdError, match="backend tensorrt is not usable"):
        select_backend("tensorrt")
    assert select_backend("auto")[0].name == "onnxruntime"
    with pytest.raises(DfosdError, match="no TensorRT plan for unet_b1") as err:
        read_plan_manifest(tiny_export_fp32, "unet_b1")
    assert "dfosd build" in str(err.value)


class StandInTensorRT:
    """Just enough of the ``tensorrt`` module for build_engines to run without a GPU: the
    "parser" reads the real ONNX file's I/O with onnx and the "plan" is a byte string."""

    __version__ = "10.16.0.1"
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    DataType = SimpleNamespace(UINT8="UINT8", HALF="HALF", FLOAT="FLOAT")

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return SimpleNamespace(flags=flags, inputs=[], outputs=[])

        def create_builder_config(self):
            return StandInTensorRT.Config()

        def build_serialized_network(self, network, config):
            config.progress_monitor.phase_start("Building engine", None, 1)
            config.progress_monitor.phase_finish("Building engine")
            return f"plan flags={network.flags} level={config.builder_optimization_level}".encode()

    class Config:
        builder_optimization_level = None
        progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def create_timing_cache(self, blob):
            return SimpleNamespace(serialize=lambda: bytes(blob) + b"+")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class OnnxParser:
        fail_with = None  # (node index, description) to simulate an unsupported node

        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            import onnx

            if self.fail_with:
                idx, desc = self.fail_with
                self.errors.append(SimpleNamespace(node=lambda: idx, node_name=lambda: "", node_operator=lambda: "",
                                                   desc=lambda: desc, code=lambda: "UNSUPPORTED_NODE"))
                return False
            # TensorRT computes every shape from the static inputs; ONNX shape inference does the same
            g = onnx.shape_inference.infer_shapes(onnx.load(path), data_prop=True).graph
            types = {1: "FLOAT", 2: "UINT8", 10: "HALF"}

            def tensor(v):
                return SimpleNamespace(name=v.name, dtype=types[v.type.tensor_type.elem_type],
                                       shape=[d.dim_value if d.HasField("dim_value") else -1
                                              for d in v.type.tensor_type.shape.dim])

            self.network.inputs = [tensor(v) for v in g.input]
            self.network.outputs = [tensor(v) for v in g.output]
            self.network.num_inputs, self.network.num_outputs = len(g.input), len(g.output)
            self.network.get_input, self.network.get_output = self.network.inputs.__getitem__, \
                self.network.outputs.__getitem__
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]


@pytest.fixture
def stand_in_trt(monkeypatch):
    from dfosd.engines import tensorrt_build

    monkeypatch.setitem(sys.modules, "tensorrt", StandInTensorRT)
    monkeypatch.setattr(tensorrt_build, "system_info", lambda trt: dict(H100))
    monkeypatch.setattr(StandInTensorRT.OnnxParser, "fail_with", None)
    return StandInTensorRT


def test_build_engines_writes_plans_manifests_and_timing_cache(stand_in_trt, tiny_export_fp32, tmp_path):
    import shutil

    from dfosd.core.manifest import read_manifest, sha256_file
    from dfosd.engines.tensorrt_build import build_engines, timing_cache_path
    from dfosd.engines.tensorrt_common import read_plan_manifest

    out = shutil.copytree(tiny_export_fp32, tmp_path / "export")
    lines = []
    plans = build_engines(out, progress=lines.append, workspace_bytes=1 << 30)
    assert len(plans) == 6 and any("Building engine" in line for line in lines)
    export = read_manifest(out)
    rec = read_plan_manifest(out, "unet_b2")
    assert (out / "unet_b2.plan").read_bytes() == b"plan flags=32 level=3"  # 1 << STRONGLY_TYPED, level 3
    assert rec["plan_file"]["sha256"] == sha256_file(out / "unet_b2.plan")
    assert rec["onnx_sha256"] == export["files"]["unet_b2.onnx"]["sha256"]
    assert rec["checkpoint_sha256"] == export["inputs"]["checkpoint_sha256"]
    assert (rec["system"], rec["precision"], rec["qdq"]) == (H100, "fp32", False)
    assert rec["builder"] == {"strongly_typed": True, "optimization_level": 3, "workspace_bytes": 1 << 30,
                              "static_shapes": True, "timing_cache": timing_cache_path(out, H100).name}
    assert rec["io"][0] == {"name": "latent", "mode": "input", "dtype": "float32", "shape": [2, 4, 16, 16]}
    assert timing_cache_path(out, H100).read_bytes() == b"+" * 6  # each build extended the cache
    lines.clear()
    again = build_engines(out, progress=lines.append, workspace_bytes=1 << 30)
    assert again == plans and sum("plan is current" in line for line in lines) == 6
    (out / "unet_b1.plan").write_bytes(b"damaged")  # a changed plan is rebuilt, the others reused
    lines.clear()
    build_engines(out, progress=lines.append, workspace_bytes=1 << 30)
    assert sum("plan is current" in line for line in lines) == 5
    assert (out / "unet_b1.plan").read_bytes() == b"plan flags=32 level=3"
    assert len(build_engines(out, progress=lines.append)) == 6  # another workspace: new build keys
    assert read_plan_manifest(out, "unet_b1")["build_key"] != rec["build_key"]


def test_parser_errors_name_the_onnx_node(stand_in_trt, tiny_export_fp32, tmp_path):
    import shutil

    import onnx

    from dfosd.core.errors import DfosdError
    from dfosd.engines.tensorrt_build import build_engines

    out = shutil.copytree(tiny_export_fp32, tmp_path / "export")
    node = onnx.load(str(out / "decoder_b1.onnx"), load_external_data=False).graph.node[3]
    stand_in_trt.OnnxParser.fail_with = (3, "no importer for this op")
    with pytest.raises(DfosdError, match="parser rejected") as err:
        build_engines(out)
    assert f"node 3 '{node.name}' ({node.op_type}): no importer for this op [UNSUPPORTED_NODE]" in str(err.value)


def test_a_plan_from_another_onnx_is_refused(stand_in_trt, tiny_export_fp32, tmp_path, monkeypatch):
    import shutil

    from dfosd.core.errors import DfosdError
    from dfosd.core.manifest import ExportDir
    from dfosd.engines import tensorrt_backend
    from dfosd.engines.tensorrt_build import build_engines

    out = shutil.copytree(tiny_export_fp32, tmp_path / "export")
    build_engines(out)
    monkeypatch.setattr(tensorrt_backend, "system_info", lambda trt: dict(H100))
    export = ExportDir(out)
    part = export.parts(1)["unet"]
    plan_json = out / "unet_b1.plan.json"
    rec = json.loads(plan_json.read_text())
    plan_json.write_text(json.dumps({**rec, "onnx_files": {"unet_b1.onnx": {"sha256": "0" * 64}}}))
    with pytest.raises(DfosdError, match="built from another unet_b1.onnx"):
        tensorrt_backend.TensorRTBackend().load(export, part)
    plan_json.write_text(json.dumps({**rec, "system": {**H100, "tensorrt": "11.1.0", "tensorrt_major": 11}}))
    with pytest.raises(DfosdError, match="built with TensorRT 11.1.0, this is TensorRT 10.16.0") as err:
        tensorrt_backend.TensorRTBackend().load(export, part)
    assert "dfosd build" in str(err.value) and "--backend tensorrt" in str(err.value)


def test_rebuild_command_line_help():
    from dfosd.engines.tensorrt_build import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0


# --- on a GPU with TensorRT -------------------------------------------------------------


def _write_photos(folder):
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).reduce(4).save(folder / f"{name}.png")
    return folder


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tensorrt_plans_run_like_onnxruntime_in_one_cuda_graph(precision, tiny_ckpt, photo_lr, tmp_path):
    import torch

    from dfosd.core.errors import DfosdError
    from dfosd.engines.tensorrt_build import build_engines
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    quant = {}
    if precision == "int8":
        quant = dict(float_precision="fp16", calib_data=str(_write_photos(tmp_path / "photos")), calib_count=8)
    out = export_checkpoint(tiny_ckpt, TINY, tmp_path / "export",
                            ExportConfig.from_options(precision=precision, tile=TILE, batches=(2,), **quant)).out_dir
    plans = build_engines(out, progress=print)
    assert {p["stem"] for p in plans} == {"encoder_b2", "unet_b2", "decoder_b2"}
    assert all(p["system"]["sm"] and p["builder"]["strongly_typed"] for p in plans)
    assert all(p["builder"]["optimization_level"] == (4 if precision == "int8" else 3) for p in plans)
    assert all(p["build_key"] == q["build_key"] for p, q in zip(plans, build_engines(out)))  # reused

    tiles = photo_lr[:, :TILE * 2, :TILE].reshape(3, 2, TILE, TILE).permute(1, 0, 2, 3).contiguous()
    trt_runner = OneStepRunner(out, backend="tensorrt")
    got = trt_runner(tiles)
    assert trt_runner._graph is not None, "the three enqueues were not captured in one CUDA graph"
    assert torch.equal(trt_runner(tiles), got)  # replay on the same static buffers
    want = OneStepRunner(out, backend="onnxruntime")(tiles)
    diff = (got.int() - want.int()).abs()
    print(f"{precision}: TensorRT vs ONNX Runtime max {int(diff.max())}, mean {float(diff.float().mean()):.3f}")
    assert float(diff.float().mean()) < (1.0 if precision == "fp32" else 4.0)

    # a plan from another system is refused, naming the rebuild command
    path = out / "unet_b2.plan.json"
    manifest = json.loads(path.read_text())
    manifest["system"]["sm"] = "1.0"
    path.write_text(json.dumps(manifest))
    with pytest.raises(DfosdError, match="--backend tensorrt"):
        OneStepRunner(out, backend="tensorrt")
