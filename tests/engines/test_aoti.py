"""AOTInductor packages: build, manifest, refusal of foreign packages, runner parity.

Compiling the three tiny parts for the CPU takes about 95-150 s on two cores (measured:
encoder ~28-56 s, unet ~30-56 s, decoder ~32-36 s; the Python code generation and the
C++ compiler each take about half), so the end-to-end parity test is ``slow``. The fast
tests cover the manifest checks with hand-written manifests and one stand-in package
(a one-line module with the UNet's contract, about 10 s to compile) that goes through
the real compile, load and run-on-buffers path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dfosd.core.errors import DfosdError
from dfosd.core.manifest import ExportDir

TINY = "synthetic:tiny"
TILE = 32


# ---------------------------------------------------------------- helpers


def _fake_export(folder, build_key="export-key-1", batches=(1,)):
    """A minimal export directory: manifest.json with contracts, no ONNX files needed here."""
    from dfosd.core.contracts import Geometry, component_contracts
    from dfosd.core.manifest import MANIFEST_FORMAT, MANIFEST_NAME, write_json_atomic

    components = {}
    for b in batches:
        for name, c in component_contracts(Geometry(tile=TILE, batch=b)).items():
            components[c.stem] = {"component": name, "batch": b, "onnx": f"{c.stem}.onnx", "precision": "fp32",
                                  "contract": c.to_dict()}
    manifest = {"format": MANIFEST_FORMAT, "kind": "dfosd-export", "build_key": build_key, "precision": "fp32",
                "float_precision": "fp32", "tile": TILE, "batches": list(batches), "upscale": 4,
                "components": components, "files": {}, "inputs": {}, "family": {"name": "dfosd", "color_fix": "none", "deviations": []}}
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


def _fake_build(folder, manifest, device="cpu", system=None, files=None, components=None):
    from dfosd.core.manifest import write_json_atomic
    from dfosd.engines.aoti_build import AOTI_FORMAT, AOTI_MANIFEST_NAME, package_name, system_info

    comps = components if components is not None else {
        stem: {"component": e["component"], "batch": e["batch"], "package": package_name(stem, device),
               "precision": "fp32", "contract": e["contract"]} for stem, e in manifest["components"].items()}
    build = {"build_key": "b", "export_build_key": manifest["build_key"], "device": device, "precision": "fp32",
             "system": system if system is not None else system_info(device), "components": comps,
             "files": files if files is not None else {}}
    write_json_atomic(folder / AOTI_MANIFEST_NAME, {"format": AOTI_FORMAT, "kind": "dfosd-aoti",
                                                    "builds": {device: build}})
    return build


# ---------------------------------------------------------------- fast: pure logic


def test_names_and_rebuild_command(tmp_path):
    from dfosd.engines.aoti_build import default_channels_last, package_name, rebuild_command

    assert package_name("unet_b1", "cuda") == "unet_b1.cuda.pt2"
    assert rebuild_command(tmp_path / "my dir", "cuda") == f"dfosd build '{tmp_path}/my dir' --backend aoti --device cuda"
    assert default_channels_last("cuda") and not default_channels_last("cpu")


def test_system_mismatches():
    from dfosd.engines.aoti_build import system_mismatches

    gpu = {"torch": "2.11.0+cu130", "device": "cuda", "arch": "x86_64", "sm": "9.0", "gpu": "H100", "cuda": "13.0"}
    assert system_mismatches(gpu, dict(gpu)) == []
    problems = system_mismatches(gpu, {**gpu, "sm": "8.0", "gpu": "A100", "torch": "2.12.0+cu130"})
    assert any("SM 9.0" in p and "SM 8.0" in p for p in problems)
    assert any("torch 2.11.0+cu130" in p for p in problems)
    assert system_mismatches(gpu, {**gpu, "cuda": "12.8"})  # another CUDA runtime
    cpu = {"torch": "2.13.0+cpu", "device": "cpu", "arch": "x86_64", "cpu": "AMD EPYC", "cpu_isa": "AVX2"}
    assert system_mismatches(cpu, dict(cpu)) == []
    assert any("-march=native" in p for p in system_mismatches(cpu, {**cpu, "cpu": "Intel Xeon"}))
    assert system_mismatches(cpu, {**cpu, "cpu_isa": "AVX512"})
    assert system_mismatches(cpu, {**cpu, "device": "cuda", "sm": "9.0", "cuda": "13.0"})


def test_check_build_refuses_missing_foreign_and_stale(tmp_path):
    from dfosd.engines.aoti_build import check_build, system_info

    manifest = _fake_export(tmp_path)
    with pytest.raises(DfosdError) as exc:
        check_build(tmp_path, "cpu")
    assert "no AOTInductor packages for cpu" in str(exc.value)
    assert f"dfosd build {tmp_path} --backend aoti --device cpu" in str(exc.value)

    _fake_build(tmp_path, manifest, system={**system_info("cpu"), "torch": "2.11.0+cu130"})
    with pytest.raises(DfosdError) as exc:
        check_build(tmp_path, "cpu")
    assert "built with torch 2.11.0+cu130" in str(exc.value)
    assert f"dfosd build {tmp_path} --backend aoti --device cpu --force" in str(exc.value)

    _fake_build(tmp_path, manifest)
    assert check_build(tmp_path, "cpu")["export_build_key"] == "export-key-1"
    _fake_export(tmp_path, build_key="export-key-2")  # the directory was re-exported since
    with pytest.raises(DfosdError, match="earlier export"):
        check_build(tmp_path, "cpu")

    # packages for cuda only, asked for cpu: says what is there
    gpu = {"torch": "2.11.0+cu130", "device": "cuda", "arch": "x86_64", "sm": "9.0", "gpu": "H100", "cuda": "13.0"}
    _fake_build(tmp_path, _fake_export(tmp_path), device="cuda", system=gpu)
    with pytest.raises(DfosdError, match=r"no AOTInductor packages for cpu \(it has packages for cuda\)"):
        check_build(tmp_path, "cpu")


def test_stale_packages_are_removed_by_their_record_inside_the_export_only(tmp_path):
    from dfosd.engines.aoti_build import _clear_stale

    export = tmp_path / "export"
    export.mkdir()
    outside = tmp_path / "outside.pt2"
    outside.write_bytes(b"not dfosd's")
    (export / "old_b4.cpu.pt2").write_bytes(b"a package of a batch no longer exported")
    (export / "keep_b1.cpu.pt2").write_bytes(b"current")
    _clear_stale(export, "cpu", keep={"keep_b1.cpu.pt2"},
                 previous={"old_b4.cpu.pt2", "keep_b1.cpu.pt2", "../outside.pt2", str(outside)})
    assert sorted(p.name for p in export.iterdir()) == ["keep_b1.cpu.pt2"]
    assert outside.read_bytes() == b"not dfosd's"


def test_runner_refuses_foreign_packages(tmp_path):
    from dfosd.engines.aoti_build import system_info
    from dfosd.runtime.step import OneStepRunner

    manifest = _fake_export(tmp_path)
    _fake_build(tmp_path, manifest, system={**system_info("cpu"), "torch": "2.11.0+cu130"})
    with pytest.raises(DfosdError) as exc:
        OneStepRunner(tmp_path, backend="aoti", say=lambda m: None)
    msg = str(exc.value)
    assert "do not fit" in msg and "torch 2.11.0+cu130" in msg and "dfosd build" in msg


def test_backend_refuses_missing_package_and_other_contract(tmp_path):
    from dfosd.core.contracts import ComponentContract
    from dfosd.engines.aoti_backend import AotiBackend

    manifest = _fake_export(tmp_path)
    part = ExportDir(tmp_path, check="none").parts(1)["unet"]
    _fake_build(tmp_path, manifest, files={"unet_b1.cpu.pt2": {"sha256": "0" * 64, "bytes": 10}})
    backend = AotiBackend("cpu")
    with pytest.raises(DfosdError, match="missing or changed"):
        backend.load(ExportDir(tmp_path, check="none"), part)
    other = ComponentContract.from_dict(manifest["components"]["encoder_b1"]["contract"])
    comps = {"unet_b1": {"component": "unet", "batch": 1, "package": "unet_b1.cpu.pt2", "contract": other.to_dict()}}
    _fake_build(tmp_path, manifest, components=comps)
    with pytest.raises(DfosdError, match="another contract"):
        backend.load(ExportDir(tmp_path, check="none"), part)


def test_backend_availability_and_device():
    from dfosd.engines.aoti_backend import AotiBackend
    from dfosd.engines.base import backend_class

    assert backend_class("aoti") is AotiBackend
    ok, why = AotiBackend.availability()
    assert ok and "AOTInductor" in why
    assert AotiBackend("cpu").capturable is False
    with pytest.raises(DfosdError):
        AotiBackend("mps")


def test_export_aoti_refuses_bad_requests(tmp_path, tiny_base):
    import torch

    from dfosd.core.checkpoint import write_random_checkpoint
    from dfosd.core.manifest import MANIFEST_NAME, write_json_atomic
    from dfosd.engines.aoti_build import export_aoti

    manifest = _fake_export(tmp_path)
    with pytest.raises(DfosdError, match="fp32 or fp16"):
        export_aoti(tmp_path, device="cpu", precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(DfosdError, match="need a CUDA GPU"):
            export_aoti(tmp_path, device="cuda")
    with pytest.raises(DfosdError, match="is not here"):
        export_aoti(tmp_path, device="cpu", progress=lambda m: None)
    ckpt = write_random_checkpoint(tmp_path / "lora.safetensors", tiny_base)
    manifest["inputs"] = {"base": TINY, "checkpoint": str(ckpt), "checkpoint_sha256": "f" * 64}
    write_json_atomic(tmp_path / MANIFEST_NAME, manifest)
    with pytest.raises(DfosdError, match="not the checkpoint"):
        export_aoti(tmp_path, device="cpu", progress=lambda m: None)


def test_cli_help_is_light_and_errors_are_clean(tmp_path):
    probe = ("import sys; from click.testing import CliRunner; import dfosd.engines.aoti_cli as m\n"
             "r = CliRunner().invoke(m.main, ['--help']); assert r.exit_code == 0 and 'Usage' in r.output, r.output\n"
             "print([x for x in ('torch', 'diffusers', 'onnxruntime') if x in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"

    from click.testing import CliRunner

    from dfosd.engines.aoti_cli import main

    r = CliRunner().invoke(main, ["--engines", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 1 and "no manifest.json" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- fast: one real (stand-in) package


def test_stand_in_package_compiles_loads_and_runs_on_buffers(aoti_stand_in_export, tmp_path):
    """The real compile -> manifest -> load -> run path on one-line modules (shared with the C++ tests)."""
    import torch

    from dfosd.core.manifest import ExportDir
    from dfosd.engines.aoti_backend import AotiBackend
    from dfosd.engines.aoti_build import read_aoti_manifest

    export = ExportDir(aoti_stand_in_export, check="none")
    batch = export.batches[0]
    part, contract = export.parts(batch)["unet"], export.contracts(batch)["unet"]
    build = read_aoti_manifest(aoti_stand_in_export)["builds"]["cpu"]
    name = build["components"][contract.stem]["package"]
    assert build["files"][name]["bytes"] == (aoti_stand_in_export / name).stat().st_size
    assert not list(aoti_stand_in_export.glob(".*.tmp"))  # the staging folders are gone
    engine = AotiBackend("cpu").load(export, part)
    x = contract.sample_inputs()["latent"]
    out = torch.full(contract.outputs[0].shape, float("nan"))
    ptr = out.data_ptr()
    for _ in range(2):
        engine.run({"latent": x}, {"denoised_latent": out})
    assert out.data_ptr() == ptr  # written in place, into the caller's buffer
    torch.testing.assert_close(out, x * 0.8 + torch.tanh(x) * 0.2)  # the stand-in UNet
    with pytest.raises(ValueError, match="must be a contiguous float32"):
        engine.run({"latent": x.double()}, {"denoised_latent": out})

    tampered = shutil.copytree(aoti_stand_in_export, tmp_path / "tampered")
    with open(tampered / name, "ab") as f:  # a package changed after its build is refused
        f.write(b"\0")
    with pytest.raises(DfosdError, match="missing or changed"):
        AotiBackend("cpu").load(ExportDir(tampered, check="none"), part)


# ---------------------------------------------------------------- slow: the real tiny model


@pytest.fixture(scope="module")
def tiny_aoti_cpu(tiny_ckpt, tmp_path_factory):
    from dfosd.engines.aoti_build import export_aoti
    from dfosd.export.artifacts import ExportConfig, export_checkpoint

    out = tmp_path_factory.mktemp("aoti_fp32")
    export_checkpoint(tiny_ckpt, TINY, out, ExportConfig(precision="fp32", tile=TILE, batches=(1,)))
    result = export_aoti(out, device="cpu", progress=lambda m: None)
    return out, result


@pytest.mark.slow
def test_aoti_cpu_matches_eager_fp32(tiny_aoti_cpu, tiny_eager, photo_lr):
    import torch

    from dfosd.core.metrics import psnr_uint8
    from dfosd.runtime.step import OneStepRunner

    out, result = tiny_aoti_cpu
    assert not result.reused
    runner = OneStepRunner(out, backend="aoti", say=lambda m: None)
    assert runner.backend.name == "aoti" and runner.backend.device == "cpu" and runner._use_graph is False
    tiles = torch.stack([photo_lr[:, :TILE, :TILE], photo_lr[:, TILE:, TILE:]])
    for tile in tiles:
        got = runner(tile[None])
        ref = tiny_eager(tile[None])
        assert got.shape == (1, 3, 4 * TILE, 4 * TILE) and got.dtype == torch.uint8
        assert psnr_uint8(got.numpy(), ref.numpy()) >= 50.0


@pytest.mark.slow
def test_aoti_manifest_records_system_and_hashes(tiny_aoti_cpu, tiny_ckpt):
    import torch

    from dfosd.core.manifest import read_manifest, sha256_file
    from dfosd.engines.aoti_build import AOTI_MANIFEST_NAME, export_aoti

    out, _ = tiny_aoti_cpu
    aoti = json.loads((out / AOTI_MANIFEST_NAME).read_text())
    build = aoti["builds"]["cpu"]
    assert build["system"]["torch"] == torch.__version__ and build["system"]["device"] == "cpu"
    assert build["precision"] == "fp32" and build["channels_last"] is False
    assert build["export_build_key"] == read_manifest(out)["build_key"]
    export = read_manifest(out)
    for stem, rec in build["components"].items():
        assert rec["contract"] == export["components"][stem]["contract"]
        assert build["files"][rec["package"]]["sha256"] == sha256_file(out / rec["package"])
    assert sorted(build["files"]) == ["decoder_b1.cpu.pt2", "encoder_b1.cpu.pt2", "unet_b1.cpu.pt2"]
    assert "manifest.aoti.json" not in export["files"]  # the export's manifest is untouched
    again = export_aoti(out, device="cpu", progress=lambda m: None)
    assert again.reused and again.seconds < 10


@pytest.mark.slow
def test_aoti_runner_refuses_a_package_from_another_system(tiny_aoti_cpu, tmp_path):
    from dfosd.core.manifest import write_json_atomic
    from dfosd.engines.aoti_build import AOTI_MANIFEST_NAME
    from dfosd.runtime.step import OneStepRunner

    src, _ = tiny_aoti_cpu
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    aoti = json.loads((out / AOTI_MANIFEST_NAME).read_text())
    aoti["builds"]["cpu"]["system"]["torch"] = "2.11.0+cu130"
    write_json_atomic(out / AOTI_MANIFEST_NAME, aoti)
    with pytest.raises(DfosdError) as exc:
        OneStepRunner(out, backend="aoti", say=lambda m: None)
    assert "torch 2.11.0+cu130" in str(exc.value) and f"--engines {out} --device cpu" in str(exc.value)


# ---------------------------------------------------------------- GPU: cuda packages + one CUDA graph


@pytest.mark.gpu
@pytest.mark.parametrize("precision,min_psnr", [("fp32", 50.0), ("fp16", 35.0)])
def test_aoti_cuda_graph_capture_matches_eager(tiny_ckpt, tiny_eager, photo_lr, tmp_path, precision, min_psnr):
    import torch

    from dfosd.core.metrics import psnr_uint8
    from dfosd.engines.aoti_build import export_aoti
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    out = tmp_path / "export"
    export_checkpoint(tiny_ckpt, TINY, out, ExportConfig(precision="fp32", tile=TILE, batches=(2,)))
    build = export_aoti(out, device="cuda", precision=precision, progress=lambda m: None).build
    assert build["system"]["sm"] == "%d.%d" % torch.cuda.get_device_capability()
    assert build["channels_last"] is True
    runner = OneStepRunner(out, backend="aoti", say=lambda m: None)
    assert runner.backend.capturable and runner._use_graph
    tiles = torch.stack([photo_lr[:, :TILE, :TILE], photo_lr[:, TILE:, TILE:], photo_lr[:, :TILE, TILE:]])
    first = runner(tiles[:2])
    assert runner._graph is not None and runner._use_graph, "capture failed: the runner fell back to eager runs"
    second = runner(tiles[1:])  # replay with new inputs in the same buffers
    for got, src in ((first, tiles[:2]), (second, tiles[1:])):
        ref = tiny_eager(src)
        assert psnr_uint8(got.numpy(), ref.numpy()) >= min_psnr
    # the graph replays what a plain run of the same packages gives (same kernels; a rounding flip at most)
    plain = OneStepRunner(out, backend="aoti", cuda_graph=False, say=lambda m: None)
    assert plain._use_graph is False
    assert psnr_uint8(plain(tiles[1:]).numpy(), second.numpy()) >= 60.0
