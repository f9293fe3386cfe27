"""Triton model repositories: every config.pbtxt parsed with Triton's own schema, checked against the manifest.

Triton's schema is tritonclient's ``model_config_pb2`` (parsed with protobuf's text_format).
TensorRT plans cannot be built here, so the tensorrt_plan path runs on fake plan manifests
(what engines.tensorrt_build writes beside each plan). Also: the request handling of the
Python model (UpscaleService) with a stand-in runner, URLs, and light --help.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dfosd.core.errors import DfosdError

TILE = 32
HAVE_SCHEMA = importlib.util.find_spec("tritonclient") is not None
needs_schema = pytest.mark.skipif(not HAVE_SCHEMA, reason="needs tritonclient (Triton's model_config_pb2): "
                                  "pip install 'tritonclient[http,grpc]'")


# ---------------------------------------------------------------- helpers


def fake_export(folder: Path, batches=(1, 2), build_key="export-key-1", big_unet=True) -> dict:
    """manifest.json with real contracts and small stand-in files (the repository only copies them)."""
    from dfosd.core.contracts import Geometry, component_contracts
    from dfosd.core.manifest import MANIFEST_FORMAT, MANIFEST_NAME, file_record, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    components, files = {}, {}
    for b in batches:
        for name, c in component_contracts(Geometry(tile=TILE, batch=b)).items():
            names = [f"{c.stem}.onnx"] + ([f"{c.stem}.onnx.data"] if name == "unet" and big_unet else [])
            for n in names:
                (folder / n).write_bytes(f"stand-in {n}".encode())
                files[n] = file_record(folder / n)
            components[c.stem] = {"component": name, "batch": b, "onnx": names[0], "files": names,
                                  "precision": "fp16", "contract": c.to_dict()}
    manifest = {"format": MANIFEST_FORMAT, "kind": "dfosd-export", "build_key": build_key, "precision": "fp16",
                "float_precision": "fp16", "tile": TILE, "batches": list(batches), "upscale": 4,
                "components": components, "files": files, "inputs": {}, "family": {"name": "dfosd", "color_fix": "none", "deviations": []}}
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


def fake_plans(folder: Path, manifest: dict, batch: int, sm="9.0", **override) -> None:
    """<stem>.plan + <stem>.plan.json as engines.tensorrt_build writes them (the plan bytes are not a plan)."""
    from dfosd.core.manifest import file_record, write_json_atomic

    for stem, e in manifest["components"].items():
        if e["batch"] != batch:
            continue
        plan = folder / f"{stem}.plan"
        plan.write_bytes(b"not really a plan " + stem.encode())
        c = e["contract"]
        io = [{"name": t["name"], "mode": mode, "dtype": t["dtype"], "shape": list(t["shape"])}
              for mode, key in (("input", "inputs"), ("output", "outputs")) for t in c[key]]
        record = {"format": 1, "kind": "dfosd-tensorrt-plan", "stem": stem, "component": e["component"],
                  "batch": batch, "plan": plan.name, "plan_file": file_record(plan),
                  "export_build_key": manifest["build_key"], "io": io, "onnx": e["onnx"],
                  "onnx_files": {n: r for n, r in manifest["files"].items() if n in (e["onnx"], e["onnx"] + ".data")},
                  "system": {"tensorrt": "10.16.0", "tensorrt_major": 10, "gpu": "NVIDIA H100", "sm": sm,
                             "cuda": "13.0", "cuda_major": 13}}
        record.update(override)
        write_json_atomic(folder / f"{stem}.plan.json", record)


def parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def configs(repo: Path) -> dict:
    return {p.parent.name: parse_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


TYPE_NAMES = {"uint8": "TYPE_UINT8", "float16": "TYPE_FP16", "float32": "TYPE_FP32"}


def assert_io_matches(cfg, contract) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    for got, want in ((cfg.input, contract.inputs), (cfg.output, contract.outputs)):
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in got] == [
            (s.name, TYPE_NAMES[s.dtype], list(s.shape)) for s in want]


# ---------------------------------------------------------------- pbtxt


@needs_schema
def test_pbtxt_writer_round_trips_through_the_schema():
    from dfosd.serving.pbtxt import Enum, Map, to_pbtxt

    text = to_pbtxt({"name": 'we"ird\\name', "max_batch_size": 0, "input": [
        {"name": "x", "data_type": Enum("TYPE_FP16"), "dims": [1, -1]}], "instance_group": [
        {"kind": Enum("KIND_GPU"), "count": 2}], "cc_model_filenames": Map({"8.9": "a.plan", "9.0": "b.plan"}),
        "parameters": Map({"k": {"string_value": "v"}}), "optimization": {"cuda": {"graphs": True}},
        "version_policy": None})
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.name == 'we"ird\\name' and list(cfg.input[0].dims) == [1, -1]
    assert dict(cfg.cc_model_filenames) == {"8.9": "a.plan", "9.0": "b.plan"}
    assert cfg.parameters["k"].string_value == "v" and cfg.optimization.cuda.graphs
    assert cfg.instance_group[0].count == 2 and not cfg.HasField("version_policy")
    with pytest.raises(TypeError):
        to_pbtxt({"x": object()})


# ---------------------------------------------------------------- repositories


@needs_schema
def test_onnx_python_and_tensorrt_models_match_the_manifest(tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    from dfosd.core.contracts import ComponentContract
    from dfosd.serving.triton_repo import RepoOptions, write_repository

    export = tmp_path / "export"
    manifest = fake_export(export)
    fake_plans(export, manifest, batch=2)  # plans for tile batch 2 only
    result = write_repository(export, tmp_path / "repo", RepoOptions(max_batch=6, queue_timeout_s=2.5))
    repo = result.repo
    cfgs = configs(repo)
    assert set(cfgs) == set(result.models) == {
        "dfosd", *(f"dfosd_{p}_b{b}" for p in ("encoder", "unet", "decoder") for b in (1, 2)),
        "dfosd_tiles_b1", "dfosd_tiles_b2", "dfosd_encoder_b2_trt", "dfosd_unet_b2_trt", "dfosd_decoder_b2_trt",
        "dfosd_tiles_b2_trt"}
    assert any("tile batch 1: no TensorRT plan" in n for n in result.notes)
    for name, cfg in cfgs.items():
        assert cfg.name == name
        assert (repo / name / "1").is_dir()  # Triton needs a version folder, ensembles included

    for stem, entry in manifest["components"].items():
        contract = ComponentContract.from_dict(entry["contract"])
        onnx = cfgs[f"dfosd_{stem}"]
        assert onnx.platform == "onnxruntime_onnx" and onnx.max_batch_size == 0
        assert onnx.default_model_filename == f"{stem}.onnx"
        assert_io_matches(onnx, contract)
        for f in entry["files"]:  # the ONNX and its external data, side by side
            assert (repo / f"dfosd_{stem}" / "1" / f).read_bytes() == (export / f).read_bytes()
        assert pb.ModelInstanceGroup.Kind.Name(onnx.instance_group[0].kind) == "KIND_GPU"
        if entry["batch"] == 2:
            trt = cfgs[f"dfosd_{stem}_trt"]
            assert trt.platform == "tensorrt_plan" and trt.max_batch_size == 0
            assert dict(trt.cc_model_filenames) == {"9.0": f"{stem}.plan"}
            assert trt.optimization.cuda.graphs is True
            assert pb.ModelInstanceGroup.Kind.Name(trt.instance_group[0].kind) == "KIND_GPU"
            assert_io_matches(trt, contract)
            assert (repo / f"dfosd_{stem}_trt" / "1" / f"{stem}.plan").is_file()

    for suffix, b in (("", 1), ("", 2), ("_trt", 2)):
        ens = cfgs[f"dfosd_tiles_b{b}{suffix}"]
        assert ens.platform == "ensemble" and ens.max_batch_size == 0
        parts = {e["component"]: ComponentContract.from_dict(e["contract"]) for e in manifest["components"].values()
                 if e["batch"] == b}
        assert [(t.name, list(t.dims)) for t in ens.input] == [("lr_image", [b, 3, TILE, TILE])]
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in ens.output] == [
            ("sr_image", "TYPE_UINT8", [b, 3, 4 * TILE, 4 * TILE]), ("sr_nonfinite", "TYPE_UINT8", [b])]
        steps = ens.ensemble_scheduling.step
        assert [s.model_name for s in steps] == [f"dfosd_{p}_b{b}{suffix}" for p in ("encoder", "unet", "decoder")]
        for step, part in zip(steps, ("encoder", "unet", "decoder")):
            assert dict(step.input_map) == {s.name: s.name for s in parts[part].inputs}
            assert dict(step.output_map) == {s.name: s.name for s in parts[part].outputs}
        # every tensor an ensemble step reads is the ensemble's input or an earlier step's output
        known = {"lr_image"}
        for step in steps:
            assert set(step.input_map.values()) <= known
            known |= set(step.output_map.values())

    py = cfgs["dfosd"]
    assert py.backend == "python" and py.max_batch_size == 6
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims), t.allow_ragged_batch) for t in py.input] == [
        ("lr_image", "TYPE_UINT8", [-1, -1, -1], True)]
    assert [(t.name, list(t.dims)) for t in py.output] == [("sr_image", [-1, -1, -1])]
    assert py.HasField("dynamic_batching")
    assert py.dynamic_batching.default_queue_policy.default_timeout_microseconds == 2_500_000
    params = {k: v.string_value for k, v in py.parameters.items()}
    assert params["tile"] == "32" and params["scale"] == "4" and params["tile_batch"] == "2"
    assert params["overlap"] == "8" and params["engines"] == "engines" and params["export_build_key"] == "export-key-1"
    engines = repo / "dfosd" / "1" / "engines"
    assert (engines / "manifest.json").is_file() and (engines / "unet_b2.plan").is_file()
    assert "from dfosd.serving.python_model import TritonPythonModel" in (repo / "dfosd" / "1" / "model.py").read_text()


@needs_schema
def test_only_chosen_kinds_cpu_instances_and_links(tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    from dfosd.serving.triton_repo import RepoOptions, write_repository

    export = tmp_path / "export"
    fake_export(export, batches=(1,))
    repo = write_repository(export, tmp_path / "repo", RepoOptions(kinds=("onnx",), device="cpu",
                                                                  link="symlink")).repo
    cfgs = configs(repo)
    assert set(cfgs) == {"dfosd_encoder_b1", "dfosd_unet_b1", "dfosd_decoder_b1", "dfosd_tiles_b1"}
    assert pb.ModelInstanceGroup.Kind.Name(cfgs["dfosd_unet_b1"].instance_group[0].kind) == "KIND_CPU"
    link = repo / "dfosd_unet_b1" / "1" / "unet_b1.onnx.data"
    assert link.is_symlink() and link.resolve() == (export / "unet_b1.onnx.data").resolve()
    # writing again into our own repository replaces our models; python only, hard links
    repo = write_repository(export, repo, RepoOptions(kinds=("python",), link="hardlink", name="sr")).repo
    assert (repo / "sr" / "1" / "engines" / "encoder_b1.onnx").stat().st_nlink >= 2
    assert configs(repo)["sr"].name == "sr"


@needs_schema
def test_instances_and_gpus_through_the_cli(tmp_path):
    """--instances N on every model, --gpus LIST on the GPU ones, read back with Triton's schema."""
    from click.testing import CliRunner
    from tritonclient.grpc import model_config_pb2 as pb

    from dfosd.cli import main

    export = tmp_path / "export"
    manifest = fake_export(export, batches=(1,))
    fake_plans(export, manifest, 1)
    r = CliRunner().invoke(main, ["triton-repo", "--engines", str(export), "--out", str(tmp_path / "repo"),
                                  "--python-device", "gpu", "--device", "cpu", "--instances", "3", "--gpus", "0,2"])
    assert r.exit_code == 0, r.output
    groups = {m: [(pb.ModelInstanceGroup.Kind.Name(g.kind), g.count, list(g.gpus)) for g in c.instance_group]
              for m, c in configs(tmp_path / "repo").items() if c.platform != "ensemble"}
    assert groups.pop("dfosd") == [("KIND_GPU", 3, [0, 2])]
    assert groups.pop("dfosd_unet_b1_trt") == [("KIND_GPU", 3, [0, 2])]
    assert groups.pop("dfosd_unet_b1") == [("KIND_CPU", 3, [])]  # --gpus is not for CPU instances
    assert all(g[0][1] == 3 for g in groups.values())
    for args, message in ((["--gpus", "0,x"], "--gpus '0,x'"), (["--gpus", "1,1"], "distinct device numbers"),
                          (["--kinds", "python,onnx", "--device", "cpu", "--gpus", "0"], "no model of this repository"),
                          (["--instances", "0"], "--instances")):
        r = CliRunner().invoke(main, ["triton-repo", "--engines", str(export), "--out", str(tmp_path / "r2"), *args])
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "r2").exists()

def test_refusals(tmp_path):
    from dfosd.serving.triton_repo import MARKER, RepoOptions, write_repository

    export = tmp_path / "export"
    manifest = fake_export(export, batches=(1,))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something").write_text("x")
    with pytest.raises(DfosdError, match="not written by dfosd triton-repo"):
        write_repository(export, foreign)
    with pytest.raises(DfosdError, match="no TensorRT plan"):
        write_repository(export, tmp_path / "r1", RepoOptions(kinds=("tensorrt",), tensorrt_required=True))
    with pytest.raises(DfosdError, match="no tile batch 4"):
        write_repository(export, tmp_path / "r2", RepoOptions(tile_batch=4))
    assert not (tmp_path / "r2").exists()  # refused before anything was written
    # a run that fails half-way claims only the model folders it made: none of the _trt names
    with pytest.raises(DfosdError, match="no TensorRT plan"):
        write_repository(export, tmp_path / "r8", RepoOptions(kinds=("onnx", "tensorrt"), tensorrt_required=True))
    claimed = set(json.loads((tmp_path / "r8" / MARKER).read_text())["models"])
    assert claimed == {p.name for p in (tmp_path / "r8").iterdir() if p.is_dir()} and claimed
    assert not any(m.endswith("_trt") for m in claimed)
    with pytest.raises(DfosdError, match="--kinds"):
        RepoOptions(kinds=("onnx", "coreml"))
    with pytest.raises(DfosdError, match="no manifest.json"):
        write_repository(tmp_path / "nothing", tmp_path / "r3")

    fake_plans(export, manifest, batch=1, onnx_files={"unet_b1.onnx": {"sha256": "0" * 64}})
    with pytest.raises(DfosdError, match="built from another"):
        write_repository(export, tmp_path / "r4")
    fake_plans(export, manifest, batch=1)
    (export / "unet_b1.plan").write_bytes(b"changed after the build")
    with pytest.raises(DfosdError, match="missing or changed"):
        write_repository(export, tmp_path / "r5")
    fake_plans(export, manifest, batch=1, io=[])
    with pytest.raises(DfosdError, match="contract"):
        write_repository(export, tmp_path / "r6")

    (export / "encoder_b1.onnx").write_bytes(b"edited")
    with pytest.raises(DfosdError, match="changed since export"):
        write_repository(export, tmp_path / "r7")


@needs_schema
def test_cli_on_the_real_tiny_export(tiny_export_fp32, tmp_path):
    from click.testing import CliRunner

    from dfosd.cli import main
    from dfosd.core.contracts import ComponentContract

    r = CliRunner().invoke(main, ["triton-repo", "--engines", str(tiny_export_fp32), "--out", str(tmp_path / "repo"),
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "dfosd_tiles_b2: ensemble" in r.output and "no TensorRT plan" in r.output
    manifest = json.loads((tiny_export_fp32 / "manifest.json").read_text())
    cfgs = configs(tmp_path / "repo")
    for stem, entry in manifest["components"].items():
        assert_io_matches(cfgs[f"dfosd_{stem}"], ComponentContract.from_dict(entry["contract"]))
    r = CliRunner().invoke(main, ["triton-repo", "--engines", str(tiny_export_fp32), "--out", str(tmp_path / "repo"),
                                  "--kinds", "tensorrt"])
    assert r.exit_code == 1 and "no TensorRT plan" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- request handling (no Triton)


class StandInRunner:
    """What UpscaleService needs of OneStepRunner: nearest-neighbour x4 of each tile."""

    tile, batch, scale = 16, 2, 4

    def __call__(self, tiles):
        return tiles.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


def test_upscale_service_layouts_and_errors():
    import torch

    from dfosd.serving.upscale_service import RequestError, ServiceLimits, UpscaleService

    svc = UpscaleService(StandInRunner(), overlap=4, limits=ServiceLimits(max_pixels=40 * 40))
    img = torch.randint(0, 256, (2, 3, 21, 37), dtype=torch.uint8)
    want = img.repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.equal(svc.upscale(img, layout="chw"), want)  # nearest x4 survives tiling + blending exactly
    assert torch.equal(svc.upscale(img.permute(0, 2, 3, 1), layout=None), want.permute(0, 2, 3, 1))
    for images, layout, message in [
        (torch.zeros(1, 8, 8, 3, dtype=torch.float32), "HWC", "must be uint8"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "HWC", "must be [n,H,W,3]"),
        (torch.zeros(1, 0, 8, 3, dtype=torch.uint8), "HWC", "is empty"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "HWC", "layout=CHW"),
        (torch.zeros(1, 8, 8, 4, dtype=torch.uint8), "HWC", "4 channels"),
        (torch.zeros(1, 41, 40, 3, dtype=torch.uint8), "HWC", "limit of 1600"),
        (torch.zeros(1, 8, 8, 3, dtype=torch.uint8), "NCHW", "use HWC or CHW"),
    ]:
        with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
            svc.upscale(images, layout=layout)
    with pytest.raises(RequestError, match="parameter overlap 8 must be smaller than half of tile 16"):
        svc.upscale(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), overlap=8)


class CountingRunner(StandInRunner):
    """The stand-in with an output that depends on each tile's content (not on its batch neighbours), counting calls."""

    def __init__(self, fail_on: int | None = None):
        self.calls = []  # tiles per call
        self.fail_on = fail_on  # raise on a batch holding a tile whose first pixel is this value

    def __call__(self, tiles):
        import torch

        assert tiles.shape[0] <= self.batch
        self.calls.append(tiles.shape[0])
        if self.fail_on is not None and bool((tiles[:, 0, 0, 0] == self.fail_on).any()):
            raise RuntimeError("engine failed")
        up = super().__call__(tiles).to(torch.int32)
        return ((up * 7 + tiles.to(torch.int32).sum((1, 2, 3), keepdim=True)) % 256).to(torch.uint8)


def test_upscale_service_pools_the_tiles_of_requests_handed_over_together():
    import math

    import torch

    from dfosd.runtime.tiling import TilingConfig, upscale_tiled
    from dfosd.serving.upscale_service import RequestError, ServiceLimits, UpscaleRequest, UpscaleService

    def service(runner):
        return UpscaleService(runner, overlap=4, limits=ServiceLimits(max_pixels=40 * 40))

    def alone(request):  # per request, the way the model served a batch before pooling
        return service(CountingRunner()).upscale(request.images, layout=request.layout, overlap=request.overlap)

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randint(1, 256, shape, generator=g, dtype=torch.uint8)  # noqa: E731

    # N one-tile requests (tile 16, tile batch 2): ceil(N / 2) engine calls instead of N
    for n in (1, 2, 5, 8):
        requests = [UpscaleRequest(rand(1, 16 - k % 3, 16, 3)) for k in range(n)]
        runner = CountingRunner()
        results = service(runner).upscale_many(requests)
        assert runner.calls == [2] * (n // 2) + [1] * (n % 2) and len(runner.calls) == math.ceil(n / 2)
        for request, got in zip(requests, results):
            assert torch.equal(got, alone(request))

    # multi-tile and multi-image requests, both layouts, another overlap, and bad requests that fail alone
    requests = [UpscaleRequest(rand(1, 21, 37, 3)),                              # 2x3 tiles
                UpscaleRequest(rand(1, 3, 8, 8), layout="HWC"),                  # bad: CHW sent as HWC
                UpscaleRequest(rand(2, 3, 12, 30), layout="CHW", overlap=2),     # 2 images x 2 tiles
                UpscaleRequest(rand(1, 8, 8, 3), overlap=8),                     # bad: overlap too big
                UpscaleRequest(rand(1, 5, 5, 3))]                                # 1 tile
    runner = CountingRunner()
    results = service(runner).upscale_many(requests)
    assert isinstance(results[1], RequestError) and "layout=CHW" in str(results[1])
    assert isinstance(results[3], RequestError) and "smaller than half" in str(results[3])
    assert runner.calls == [2] * 5 + [1]  # 6 + 4 + 1 tiles in full tile batches
    for k in (0, 2, 4):
        assert torch.equal(results[k], alone(requests[k]))
    cfg = TilingConfig(tile=16, overlap=2, batch=2)  # and the in-process runtime, image by image
    for got, image in zip(results[2], requests[2].images):
        assert torch.equal(got, upscale_tiled(image, CountingRunner(), cfg))

    # an engine failure fails the requests with tiles in that batch, not the others
    marked = rand(1, 16, 16, 3)
    marked[0, 0, 0, 0] = 0  # rand() never draws 0
    requests = [UpscaleRequest(rand(1, 16, 16, 3)), UpscaleRequest(rand(1, 16, 16, 3)),
                UpscaleRequest(rand(1, 16, 16, 3)), UpscaleRequest(marked), UpscaleRequest(rand(1, 16, 16, 3))]
    results = service(CountingRunner(fail_on=0)).upscale_many(requests)
    assert [isinstance(r, RuntimeError) for r in results] == [False, False, True, True, False]
    for k in (0, 1, 4):
        assert torch.equal(results[k], alone(requests[k]))


def test_parse_request_parameters():
    from dfosd.serving.upscale_service import RequestError, parse_layout, parse_overlap

    assert parse_layout(None) == "HWC" and parse_layout("chw") == "CHW"
    assert parse_overlap(None, 8) == 8 and parse_overlap("4", 8) == 4 and parse_overlap(6, 8) == 6
    for bad in ("x", 2.5, [1]):
        with pytest.raises(RequestError):
            parse_overlap(bad, 8)


def test_server_urls():
    from dfosd.serving.client import parse_server_url

    assert parse_server_url("localhost:9000") == ("http", "localhost:9000")
    assert parse_server_url("http://10.0.0.2") == ("http", "10.0.0.2:8000")
    assert parse_server_url("grpc://h") == ("grpc", "h:8001")
    assert parse_server_url("grpc://[::1]:7001") == ("grpc", "[::1]:7001")
    for bad in ("ftp://h:1", "http://h:1/v2/models", "http://h:port", "http://"):
        with pytest.raises(DfosdError):
            parse_server_url(bad)


def test_unreachable_server_is_a_clean_error(tmp_path):
    if not HAVE_SCHEMA:
        pytest.skip("needs tritonclient")
    from click.testing import CliRunner
    from PIL import Image

    from dfosd.runtime.cli import main
    from dfosd.serving.serve import free_port

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for scheme in ("http", "grpc"):
        r = CliRunner().invoke(main, [str(tmp_path / "a.png"), "--server", f"{scheme}://127.0.0.1:{free_port()}",
                                      "--out", str(tmp_path / "out")])
        assert r.exit_code == 1 and "no Triton server answers" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- import hygiene


HEAVY = ("torch", "tritonclient", "onnxruntime", "grpc", "gevent", "diffusers")


def _heavy_after(body: str) -> list[str]:
    probe = f"import sys\n{body}\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


@pytest.mark.parametrize("module,args", [("dfosd.serving.cli", []), ("dfosd.cli", ["triton-repo"])])
def test_help_is_light(module, args):
    body = (f"import importlib; from click.testing import CliRunner\n"
            f"r = CliRunner().invoke(importlib.import_module({module!r}).main, {args!r} + ['--help'])\n"
            f"assert r.exit_code == 0 and 'Usage' in r.output, r.output")
    assert _heavy_after(body) == []


def test_writing_a_repository_is_light(tmp_path):
    fake_export(tmp_path / "export", batches=(1,))
    body = (f"from dfosd.serving.triton_repo import write_repository\n"
            f"write_repository({str(tmp_path / 'export')!r}, {str(tmp_path / 'repo')!r})")
    assert _heavy_after(body) == []


def test_reused_repo_keeps_a_users_files(tiny_export_fp32, tmp_path):
    """Rewriting a repository (dfosd-serve --repo R again) removes only the files its marker
    lists; a user's file inside R/dfosd/ stays, and one at a path we would write is refused, not replaced."""
    from dfosd.serving.triton_repo import MARKER, RepoOptions, write_repository

    repo, opts = tmp_path / "repo", RepoOptions(kinds=("python",), link="symlink")
    write_repository(tiny_export_fp32, repo, opts)
    marker = json.loads((repo / MARKER).read_text())
    assert "config.pbtxt" in marker["files"]["dfosd"] and "1/model.py" in marker["files"]["dfosd"]
    mine = {repo / "dfosd" / "notes.txt": "my notes", repo / "dfosd" / "1" / "mine.bin": "data",
            repo / "dfosd" / "1" / "engines" / "user.txt": "kept"}
    for path, text in mine.items():
        path.write_text(text)
    old = repo / "dfosd" / "1" / "engines" / "sub" / "old.onnx"  # an earlier export's file, in our records
    old.parent.mkdir()
    old.write_text("ours")
    marker["files"]["dfosd"].append("1/engines/sub/old.onnx")
    (repo / MARKER).write_text(json.dumps(marker))
    write_repository(tiny_export_fp32, repo, opts)
    assert all(p.read_text() == t for p, t in mine.items())
    assert not old.exists() and not old.parent.exists()
    assert (repo / "dfosd" / "1" / "model.py").is_file()
    # a file at a path we write that the records do not list is the user's: refused, untouched
    marker = json.loads((repo / MARKER).read_text())
    marker["files"]["dfosd"].remove("1/model.py")
    (repo / MARKER).write_text(json.dumps(marker))
    (repo / "dfosd" / "1" / "model.py").write_text("# my own model.py")
    with pytest.raises(DfosdError, match="model.py, which dfosd did not write"):
        write_repository(tiny_export_fp32, repo, opts)
    assert (repo / "dfosd" / "1" / "model.py").read_text() == "# my own model.py"
    assert all(p.read_text() == t for p, t in mine.items())
