"""ResShift's one step exported (three ONNX parts, fp32 and fp16) and run through ONNX Runtime and
OpenVINO against upstream SinSR's own outputs (tests/data/resshift, see its README.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dfosd.core.errors import DfosdError
from dfosd.core.metrics import psnr_uint8
from dfosd.core.resshift_parts import NOISE, check_tile, resshift_contracts, resshift_parts
from dfosd.core.vocab import DENOISED, LATENT, LR_IMAGE

TILE = 32  # the goldens' LR tile; the tiny UNet needs multiples of 16
PARITY = {}


@pytest.fixture(scope="module")
def exported(resshift_golden, tmp_path_factory, one_torch_thread):
    from dfosd.export.onnx_export import export_part

    model = resshift_golden[0]
    parts, contracts = resshift_parts(model), resshift_contracts(TILE)
    out = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path_factory.mktemp(f"resshift_{precision}")
        for name, part in parts.items():
            export_part(part, contracts[name], folder / f"{name}.onnx", precision=precision)
        out[precision] = folder
    yield out
    print("\nResShift one step, ONNX vs upstream SinSR's own code (PSNR dB):", json.dumps(PARITY))


def _chain(run, io):
    """encoder -> unet (+ noise, + the LR) -> decoder; ``run(name, feeds)`` returns the part's one output."""
    lr = io["lr"].numpy()
    latent = run("encoder", {LR_IMAGE: lr})
    den = run("unet", {LATENT: latent, NOISE: io["noise"].numpy(), LR_IMAGE: lr})
    return latent, den, run("decoder", {DENOISED: den})


def test_onnx_runtime_matches_upstream(exported, resshift_golden):
    import onnxruntime as ort

    _, io, _ = resshift_golden
    ref = ((io["sr"] + 1) * 127.5).numpy()
    for precision, floor in (("fp32", 50.0), ("fp16", 35.0)):
        sessions = {n: ort.InferenceSession(str(exported[precision] / f"{n}.onnx"), providers=["CPUExecutionProvider"])
                    for n in ("encoder", "unet", "decoder")}
        latent, den, sr = _chain(lambda n, feeds: sessions[n].run(None, feeds)[0], io)
        assert sr.dtype == np.uint8 and sr.shape == (1, 3, 4 * TILE, 4 * TILE)
        PARITY[f"onnxruntime {precision}"] = db = round(psnr_uint8(sr.astype(np.float32), ref), 2)
        assert db >= floor, PARITY
        if precision == "fp32":
            assert np.abs(latent - io["z_y"].numpy()).max() < 1e-3 and np.abs(den - io["x0"].numpy()).max() < 1e-3
    # the fp16 graphs hold fp16 weights (ORT's CPU provider computes most fp16 nodes in fp32, and the golden
    # weights are fp16 values: this checks the graphs and their fp32 islands, not fp16 arithmetic)
    import onnx

    types = {i.data_type for i in onnx.load(str(exported["fp16"] / "unet.onnx")).graph.initializer if i.dims}
    assert onnx.TensorProto.FLOAT16 in types


def test_openvino_matches_upstream(exported, resshift_golden):
    ov = pytest.importorskip("openvino")
    _, io, _ = resshift_golden
    core = ov.Core()
    compiled = {n: core.compile_model(str(exported["fp32"] / f"{n}.onnx"), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32"}) for n in ("encoder", "unet", "decoder")}
    _, _, sr = _chain(lambda n, feeds: next(iter(compiled[n](feeds).values())), io)
    ref = ((io["sr"] + 1) * 127.5).numpy()
    PARITY["openvino fp32"] = db = round(psnr_uint8(sr.astype(np.float32), ref), 2)
    assert db >= 50.0, PARITY
    # bf16 arithmetic where the CPU has it (AMX / AVX512-BF16): the one reduced-precision compute on this machine
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        bf16 = {n: core.compile_model(str(exported["fp32"] / f"{n}.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
                for n in ("encoder", "unet", "decoder")}
        _, _, sr16 = _chain(lambda n, feeds: next(iter(bf16[n](feeds).values())), io)
        PARITY["openvino bf16"] = round(psnr_uint8(sr16.astype(np.float32), ref), 2)
        assert PARITY["openvino bf16"] >= 25.0, PARITY


def test_tile_must_fit_the_swin_windows(resshift_golden):
    model = resshift_golden[0]
    check_tile(model, 32)
    with pytest.raises(DfosdError, match="multiple of 16 .*Swin window 4") as err:
        check_tile(model, 24)
    assert "--tile 16" in str(err.value)


def test_whole_images_tile_with_one_noise_field(exported, resshift_golden, tmp_path):
    from dfosd.runtime.resshift_run import ResShiftRunner, noise_field, read_noise

    _, io, _ = resshift_golden
    runner = ResShiftRunner(exported["fp32"], tile=TILE, overlap=8)
    # one tile, upstream's own noise: upstream's image
    one = runner(io["lr"][0], noise=io["noise"])
    assert psnr_uint8(one[None].float().numpy(), ((io["sr"] + 1) * 127.5).numpy()) >= 50.0
    # an image of several overlapping tiles (and one smaller than a tile, padded): the field is drawn once
    g = torch.Generator().manual_seed(4)
    big = (torch.nn.functional.interpolate(torch.rand(1, 3, 12, 10, generator=g), size=(48, 40), mode="bicubic")
           .clamp(0, 1)[0] * 255).round().to(torch.uint8)
    a, b = runner(big, seed=7), runner(big, seed=7)
    assert a.shape == (3, 192, 160) and torch.equal(a, b) and a.float().std() > 5
    assert not torch.equal(a, runner(big, seed=8))
    # the seeded field sliced per tile is the field given as an array: the same image
    np.save(tmp_path / "noise.npy", noise_field(7, 48, 40).numpy())
    assert torch.equal(runner(big, noise=torch.from_numpy(read_noise(tmp_path / "noise.npy", 48, 40))), a)
    assert runner(big[:, :20, :24], seed=1).shape == (3, 80, 96)
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 40, 48), dtype=np.float64))
    with pytest.raises(DfosdError, match="dtype float64 .*; shape \\[1, 3, 40, 48\\] \\(want \\[1, 3, 48, 40\\]"):
        read_noise(tmp_path / "bad.npy", 48, 40)
    with pytest.raises(DfosdError, match="either as a seed or as an array"):
        runner(big)



def test_dfosd_export_with_vq_then_run(resshift_export, resshift_release, resshift_golden, tmp_path):
    import shutil

    from click.testing import CliRunner

    from dfosd.export.cli import main
    from dfosd.export.resshift_export import RECORD_NAME
    from dfosd.runtime.resshift_run import ResShiftRunner

    _, io, _ = resshift_golden
    out = resshift_export  # dfosd-export --ckpt SinSR_v1.pth --vq autoencoder_vq_f4.pth --tile 32 (conftest)
    args = ["--ckpt", str(resshift_release["unet"]), "--vq", str(resshift_release["vq"]), "--tile", str(TILE),
            "--out", str(tmp_path / "unused")]
    output = (out.parent / "export-output.txt").read_text()
    assert "family sinsr (the file name SinSR_v1.pth is wyf0912/SinSR's release)" in output
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["family"] == "sinsr" and record["timestep"] == 14 and record["tile"] == TILE
    assert record["tile_multiple"] == 16 and record["window_size"] == 4
    assert set(record["files"]) == {"encoder.onnx", "unet.onnx", "decoder.onnx"}
    runner = ResShiftRunner.from_export(out)
    sr = runner(io["lr"][0], noise=io["noise"])
    assert psnr_uint8(sr[None].float().numpy(), ((io["sr"] + 1) * 127.5).numpy()) >= 50.0
    # the SD-family runtime refuses the folder (no dfosd manifest) instead of running a UNet that wants noise
    from dfosd.runtime.step import OneStepRunner

    with pytest.raises(DfosdError):
        OneStepRunner(out, backend="onnxruntime", batch=1)
    # errors: a tile the Swin windows do not fit, a foreign folder, a changed part
    r = CliRunner().invoke(main, args[:-4] + ["--tile", "24", "--out", str(tmp_path / "t24")])
    assert r.exit_code != 0 and "must be a multiple of 16" in r.output and "Traceback" not in r.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, args[:-1] + [str(foreign)])
    assert r.exit_code != 0 and "is not a ResShift export" in r.output and (foreign / "notes.txt").exists()
    changed = shutil.copytree(out, tmp_path / "changed")  # the shared export stays as it was
    with open(changed / "unet.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(DfosdError, match="unet.onnx changed since the export"):
        ResShiftRunner.from_export(changed)
