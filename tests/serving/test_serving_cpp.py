"""The C++ runner (serving/cpp, dfosd_runner): built with CMake against the torch wheel's libtorch,
run on AOTInductor CPU packages, compared byte for byte with the Python runtime on the same packages.

Fast path (always): three stand-in parts with the real contracts (small tensor programs, ~10 s
each to compile) -- the real compile -> package -> C++ load -> chain -> tiling/blending -> PPM path.
Slow path (DFOSD_SLOW=1): the synthetic:tiny model's real packages (~2 min to compile on 2 cores).

The build is cached per source hash and torch version in ``$DFOSD_CPP_BUILD_CACHE`` (default
``~/.cache/dfosd/cpp-build``), so only the first session pays for it (~15-40 s with -j2).

The TensorRT kind cannot be built here (no TensorRT); its C++ names are checked against the
TensorRT Python API lists of 10.16 and 11.1, and, where ``DFOSD_TENSORRT_INCLUDE`` points at
TensorRT headers (e.g. NVIDIA/TensorRT's open-source ``include/`` of a release tag), the file
is compiled (syntax and types) against them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CPP = Path(__file__).resolve().parents[2] / "serving" / "cpp"
API = Path(__file__).resolve().parents[1] / "data" / "tensorrt-api"  # copy of shared/tensorrt-api
TILE, BATCH = 16, 2
HAVE_TOOLS = all(shutil.which(t) for t in ("cmake", "make", "c++"))
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="needs cmake, make and a C++ compiler")


def _source_key() -> str:
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for p in sorted(CPP.rglob("*")):
        if p.is_file() and "build" not in p.parts:
            h.update(p.relative_to(CPP).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def cpp_runner() -> tuple[Path, str]:
    """(path of dfosd_runner, cmake's configure output), built once per source version."""
    import torch.utils

    cache = Path(os.environ.get("DFOSD_CPP_BUILD_CACHE", Path.home() / ".cache" / "dfosd" / "cpp-build"))
    build = cache / _source_key()
    exe = build / "dfosd_runner"
    log = build / "configure.txt"
    if not (exe.is_file() and log.is_file()):
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        nice = ["nice", "-n", "15"] if shutil.which("nice") else []
        conf = subprocess.run([*nice, "cmake", "-S", str(CPP), "-B", str(build),
                               f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                              capture_output=True, text=True, timeout=300)
        assert conf.returncode == 0, conf.stdout + conf.stderr
        make = subprocess.run([*nice, "make", "-C", str(build), "-j2"], capture_output=True, text=True, timeout=900)
        assert make.returncode == 0, make.stdout[-4000:] + make.stderr[-4000:]
        log.write_text(conf.stdout + conf.stderr)
    return exe, log.read_text()


def _write_ppm(path: Path, chw) -> None:
    from PIL import Image

    Image.fromarray(chw.permute(1, 2, 0).numpy()).save(path)  # .ppm suffix: Pillow writes binary P6


def _read_ppm(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).contiguous()


def _stand_in_parts():
    import torch
    import torch.nn.functional as F

    class Encoder(torch.nn.Module):
        def forward(self, lr_image):
            f = lr_image.to(torch.float32) / 127.5 - 1.0
            p = F.avg_pool2d(f, 2)
            # channels_last, like the real VAE encoder's latent: the next part must get it contiguous
            return (torch.cat([p, p.mean(1, keepdim=True)], 1) * 0.9).contiguous(memory_format=torch.channels_last)

    class Unet(torch.nn.Module):
        def forward(self, latent):
            return latent * 0.8 + torch.tanh(latent) * 0.2

    class Decoder(torch.nn.Module):
        def forward(self, denoised_latent):
            r = F.interpolate(denoised_latent[:, :3] + 0.1 * denoised_latent[:, 3:], scale_factor=8, mode="nearest")
            return ((r + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

    return {"encoder": Encoder(), "unet": Unet(), "decoder": Decoder()}


def _package_export(folder: Path, parts: dict, tile: int, batch: int) -> Path:
    """An export directory whose cpu AOTI packages are ``parts`` compiled (manifests as dfosd writes them)."""
    from dfosd.core.contracts import Geometry, component_contracts
    from dfosd.core.manifest import MANIFEST_FORMAT, MANIFEST_NAME, file_record, write_json_atomic
    from dfosd.engines.aoti_build import AOTI_FORMAT, AOTI_MANIFEST_NAME, compile_part, package_name, system_info

    folder.mkdir(parents=True, exist_ok=True)
    components, aoti, files = {}, {}, {}
    for name, c in component_contracts(Geometry(tile=tile, batch=batch)).items():
        components[c.stem] = {"component": name, "batch": batch, "onnx": f"{c.stem}.onnx", "precision": "fp32",
                              "contract": c.to_dict()}
        pkg = package_name(c.stem, "cpu")
        compile_part(parts[name], c, folder / pkg, device="cpu")
        files[pkg] = file_record(folder / pkg)
        aoti[c.stem] = {"component": name, "batch": batch, "package": pkg, "precision": "fp32",
                        "contract": c.to_dict()}
    manifest = {"format": MANIFEST_FORMAT, "kind": "dfosd-export", "build_key": "stand-in", "precision": "fp32",
                "float_precision": "fp32", "tile": tile, "batches": [batch], "upscale": 4, "components": components,
                "files": {}, "inputs": {}}
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    build = {"build_key": "stand-in-aoti", "export_build_key": "stand-in", "device": "cpu", "precision": "fp32",
             "system": system_info("cpu"), "components": aoti, "files": files}
    write_json_atomic(folder / AOTI_MANIFEST_NAME, {"format": AOTI_FORMAT, "kind": "dfosd-aoti",
                                                    "builds": {"cpu": build}})
    return folder


@pytest.fixture(scope="module")
def stand_in_export(tmp_path_factory):
    return _package_export(tmp_path_factory.mktemp("cpp_aoti"), _stand_in_parts(), TILE, BATCH)


def _python_reference(export: Path, image, overlap: int, batch: int):
    from dfosd.runtime.step import OneStepRunner
    from dfosd.runtime.tiling import TilingConfig, upscale_tiled

    runner = OneStepRunner(export, backend="aoti", batch=batch, say=lambda m: None)
    return upscale_tiled(image, runner, TilingConfig(tile=runner.tile, overlap=overlap, batch=runner.batch,
                                                     scale=runner.scale))


def _images():
    import torch

    g = torch.Generator().manual_seed(7)
    # several tiles with a flush last row/column; smaller than a tile (reflect pad); a 1-pixel axis; one tile
    sizes = [(40, 27), (10, 5), (1, 20), (16, 16)]
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


# ---------------------------------------------------------------- tests


@needs_tools
def test_cmake_says_which_kinds_it_builds(cpp_runner):
    exe, configure = cpp_runner
    assert "AOTInductor engine kind: ON" in configure
    trt = [line for line in configure.splitlines() if "TensorRT engine kind" in line]
    assert trt and ("OFF --" in trt[0] or "ON" in trt[0]), configure
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "engine kinds built into this binary: aoti" in out.stdout


@needs_tools
def test_cpp_aoti_runner_equals_python_runtime(cpp_runner, stand_in_export, tmp_path):
    exe, _ = cpp_runner
    images = _images()
    args = []
    for i, img in enumerate(images):
        _write_ppm(tmp_path / f"in{i}.ppm", img)
        args += [str(tmp_path / f"in{i}.ppm"), str(tmp_path / f"out{i}.ppm")]
    run = subprocess.run([str(exe), "aoti", "--engines", str(stand_in_export), "--batch", str(BATCH), "--tile",
                          str(TILE), "--device", "cpu", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "AOTInductor packages on cpu" in run.stderr
    for i, img in enumerate(images):
        got = _read_ppm(tmp_path / f"out{i}.ppm")
        want = _python_reference(stand_in_export, img, TILE // 4, BATCH)
        assert got.shape == want.shape == (3, img.shape[1] * 4, img.shape[2] * 4)
        assert (got.int() - want.int()).abs().max().item() == 0, f"image {i} differs from the Python runtime"
    # an explicit overlap, and explicit part files instead of --engines
    files = {p: str(stand_in_export / f"{p}_b{BATCH}.cpu.pt2") for p in ("encoder", "unet", "decoder")}
    run = subprocess.run([str(exe), "aoti", "--encoder", files["encoder"], "--unet", files["unet"], "--decoder",
                          files["decoder"], "--tile", str(TILE), "--batch", str(BATCH), "--overlap", "2",
                          args[0], str(tmp_path / "o2.ppm")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _read_ppm(tmp_path / "o2.ppm").equal(_python_reference(stand_in_export, images[0], 2, BATCH))


@needs_tools
def test_cpp_runner_bad_inputs(cpp_runner, stand_in_export, tmp_path):
    exe, _ = cpp_runner
    import torch

    _write_ppm(tmp_path / "ok.ppm", torch.zeros(3, 8, 8, dtype=torch.uint8))
    (tmp_path / "bad.ppm").write_bytes(b"P6\n8 8\n255\n" + b"\0" * 10)  # truncated pixels
    (tmp_path / "text.ppm").write_bytes(b"P3\n1 1\n255\n0 0 0\n")      # ASCII PPM
    base = [str(exe), "aoti", "--engines", str(stand_in_export), "--batch", str(BATCH), "--tile", str(TILE)]
    run = subprocess.run([*base, str(tmp_path / "bad.ppm"), str(tmp_path / "o1.ppm"), str(tmp_path / "text.ppm"),
                          str(tmp_path / "o2.ppm"), str(tmp_path / "ok.ppm"), str(tmp_path / "o3.ppm")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "truncated pixel data" in run.stderr and "not a binary PPM (P6)" in run.stderr
    assert (tmp_path / "o3.ppm").is_file() and not (tmp_path / "o1.ppm").exists()
    assert not list(tmp_path.glob("*.tmp"))
    for bad_args, message in [([*base, "--overlap", "8", "a", "b"], "smaller than half"),
                              ([*base, "a"], "pairs"),
                              ([str(exe), "tensorrt", "--engines", str(stand_in_export), "a", "b"], "not built into"),
                              ([*base[:-2], "--tile", "x", "a", "b"], "not an integer")]:
        run = subprocess.run(bad_args, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, (bad_args, run.stderr)


@pytest.mark.slow
@needs_tools
def test_cpp_aoti_runner_on_the_tiny_model(cpp_runner, tiny_ckpt, tmp_path_factory):
    """The synthetic:tiny model's real AOTI packages (dfosd aoti-export), C++ vs Python."""
    from dfosd.engines.aoti_build import export_aoti
    from dfosd.export.artifacts import ExportConfig, export_checkpoint

    exe, _ = cpp_runner
    out = tmp_path_factory.mktemp("cpp_tiny")
    export_checkpoint(tiny_ckpt, "synthetic:tiny", out, ExportConfig(precision="fp32", tile=32, batches=(2,)))
    export_aoti(out, device="cpu", progress=lambda m: None)
    work = tmp_path_factory.mktemp("cpp_tiny_io")
    images = _images()[:2]
    args = []
    for i, img in enumerate(images):
        _write_ppm(work / f"in{i}.ppm", img)
        args += [str(work / f"in{i}.ppm"), str(work / f"out{i}.ppm")]
    run = subprocess.run([str(exe), "aoti", "--engines", str(out), "--batch", "2", "--tile", "32", *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    for i, img in enumerate(images):
        got, want = _read_ppm(work / f"out{i}.ppm"), _python_reference(out, img, 8, 2)
        assert (got.int() - want.int()).abs().max().item() == 0


# ---------------------------------------------------------------- TensorRT kind (not buildable here)

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
