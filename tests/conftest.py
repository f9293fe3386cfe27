"""Shared fixtures: a tiny real base, a random checkpoint, and exports of it.

Everything is built from the tiny SD-style configs with seeded random weights, once
per test session, so the suite exercises real diffusers modules, real ONNX files and
real ONNX Runtime sessions in a few minutes on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

TINY = "synthetic:tiny"
TILE = 32  # LR pixels: 128x128 output, 16x16 latent with the tiny VAE
CALIB_COUNT = 8
RESSHIFT_GOLDEN = Path(__file__).resolve().parent / "data" / "resshift"  # upstream SinSR's outputs (README there)
CALIB_PHOTOS = ("astronaut", "coffee", "chelsea")  # int8/fp8 calibration photos (scikit-image)


def pytest_collection_modifyitems(config, items):
    has_trt = importlib.util.find_spec("tensorrt") is not None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    slow = os.environ.get("DFOSD_SLOW") == "1"
    for item in items:
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (not installable on this machine)"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none visible)"))
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow: set DFOSD_SLOW=1 to run"))
    # The test that stops the session's dfosd-serve runs right after the last other test using it,
    # whatever the file order or -k selection (a test after it would find the server gone).
    stop = [i for i in items if i.name == "test_zz_sigint_stops_everything"]
    if stop:
        rest = [i for i in items if i is not stop[0]]
        users = [n for n, i in enumerate(rest) if "server" in getattr(i, "fixturenames", ())]
        rest.insert(users[-1] + 1 if users else len(rest), stop[0])
        items[:] = rest


# The folders dfosd's commands write by default, in the current folder: a test that forgets
# --out/--work writes them into the checkout (tests run from its root).
DEFAULT_OUTPUT_FOLDERS = ("dfosd-out", "dfosd-engines", "dfosd-demo", "dfosd-bench", ".gpu-bench")


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    root = Path(__file__).resolve().parents[1]
    before = {name for name in DEFAULT_OUTPUT_FOLDERS if (root / name).exists()}
    yield
    written = [name for name in DEFAULT_OUTPUT_FOLDERS if (root / name).exists() and name not in before]
    assert not written, f"a test wrote {', '.join(written)} into the checkout {root}: pass --out/--work under tmp_path"


@pytest.fixture(scope="session")
def tiny_base():
    from dfosd.core.bases import load_base

    return load_base(TINY)


@pytest.fixture(scope="session")
def osediff_pkl(tiny_base, tmp_path_factory):
    """An osediff.pkl written the upstream way (tests/upstream_way.py) for the tiny base; read-only."""
    import upstream_way as uw

    return uw.write_osediff(tmp_path_factory.mktemp("osediff") / "osediff.pkl", tiny_base)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_base, tmp_path_factory):
    from dfosd.core.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "lora.safetensors", tiny_base)


@pytest.fixture(scope="session")
def resshift_golden():
    """(one-step model built from the state dicts' keys alone, upstream's inputs and outputs, config)."""
    import json

    from safetensors.torch import load_file

    from dfosd.core.resshift import (ResShiftOneStep, load_strict, schedule_from_yaml, unet_config_from_state,
                                     unwrap_state, vq_config_from_state)
    from dfosd.core.resshift_unet import SwinUNet
    from dfosd.core.resshift_vq import VQAutoencoder

    GOLDEN = RESSHIFT_GOLDEN
    cfg = json.loads((GOLDEN / "config.json").read_text())
    unet_state = unwrap_state(load_file(str(GOLDEN / "unet.safetensors")), "unet")
    vq_state = unwrap_state(load_file(str(GOLDEN / "vq.safetensors")), "vq")
    unet = SwinUNet(unet_config_from_state(unet_state))
    load_strict(unet, unet_state, "unet")
    vq = VQAutoencoder(vq_config_from_state(vq_state))
    load_strict(vq, vq_state, "vq")
    model = ResShiftOneStep(unet.eval(), vq.eval(), schedule_from_yaml(cfg["diffusion"]))
    return model, load_file(str(GOLDEN / "io.safetensors")), cfg


@pytest.fixture(scope="session")
def resshift_release(tmp_path_factory):
    """The golden tiny UNet and autoencoder written as upstream's release files: ``SinSR_v1.pth`` (a
    ``state_dict`` wrapper with DataParallel's ``module.`` prefix) and ``autoencoder_vq_f4.pth``."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("resshift_release")
    unet = {"module." + k: v.float() if v.is_floating_point() else v
            for k, v in load_file(str(RESSHIFT_GOLDEN / "unet.safetensors")).items()}
    torch.save({"state_dict": unet}, folder / "SinSR_v1.pth")
    torch.save({k: v.float() for k, v in load_file(str(RESSHIFT_GOLDEN / "vq.safetensors")).items()},
               folder / "autoencoder_vq_f4.pth")
    return {"unet": folder / "SinSR_v1.pth", "vq": folder / "autoencoder_vq_f4.pth"}


@pytest.fixture(scope="session")
def resshift_export(resshift_release, tmp_path_factory):
    """The golden tiny SinSR exported fp32 at its LR tile 32 by ``dfosd-export --ckpt --vq`` (its output
    beside the folder, in ``export-output.txt``); tests that alter an export copy it first."""
    from click.testing import CliRunner

    from dfosd.export.cli import main

    out = tmp_path_factory.mktemp("resshift_export") / "sinsr-engines"
    r = CliRunner().invoke(main, ["--ckpt", str(resshift_release["unet"]), "--vq", str(resshift_release["vq"]),
                                  "--tile", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    (out.parent / "export-output.txt").write_text(r.output)
    return out


@pytest.fixture(scope="session")
def tiny_text_models():
    """The tiny base's (locally built) CLIP tokenizer and text encoder: upstream-way references encode prompts."""
    from dfosd.core.text import load_text_models

    return load_text_models(TINY)


@pytest.fixture(scope="session")
def smooth_lr_tile():
    """A smooth 32x32 uint8 LR tile (bicubic up from 8x8 noise, seed 5): family parity tests' input."""
    import torch

    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(TILE, TILE), mode="bicubic")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _export(tiny_ckpt, tmp_path_factory, precision, batches):
    from dfosd.export.artifacts import ExportConfig, export_checkpoint

    out = tmp_path_factory.mktemp(f"export_{precision}")
    return export_checkpoint(tiny_ckpt, TINY, out, ExportConfig(precision=precision, tile=TILE, batches=batches)).out_dir


@pytest.fixture(scope="session")
def tiny_export_fp32(tiny_ckpt, tmp_path_factory):
    return _export(tiny_ckpt, tmp_path_factory, "fp32", (1, 2))


@pytest.fixture(scope="session")
def tiny_export_fp16(tiny_ckpt, tmp_path_factory):
    return _export(tiny_ckpt, tmp_path_factory, "fp16", (1,))


def write_photos(folder, names):
    """scikit-image photographs reduced 4x to LR size, as PNG files (a --calib-data folder)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(getattr(data, name)()).reduce(4).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("calib") / "photos", CALIB_PHOTOS)


def export_8bit(tiny_ckpt, calib_dir, out, precision="int8", float_precision="fp32", quantize="unet,vae-enc,vae-dec"):
    from dfosd.export.artifacts import ExportConfig, export_checkpoint

    cfg = ExportConfig.from_options(precision=precision, float_precision=float_precision, tile=TILE,
                                    calib_data=str(calib_dir), calib_count=CALIB_COUNT, quantize=quantize)
    return export_checkpoint(tiny_ckpt, TINY, out, cfg, progress=print)


@pytest.fixture(scope="session")
def int8_export(tiny_ckpt, calib_dir, tmp_path_factory):
    # One torch thread, like the calibration tests (a session fixture is set up before their
    # one_torch_thread): calibration's float reductions follow the thread count, and the
    # fake-quantized reference calibrated in test_tensorrt_inputs_match_eager_torch then has
    # the very amax values and SmoothQuant-scaled weights this export was made with.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return export_8bit(tiny_ckpt, calib_dir, tmp_path_factory.mktemp("int8")).out_dir
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fp8_export(tiny_ckpt, calib_dir, tmp_path_factory):
    return export_8bit(tiny_ckpt, calib_dir, tmp_path_factory.mktemp("fp8"), precision="fp8").out_dir


@pytest.fixture(scope="session")
def tiny_eager(tiny_base, tiny_ckpt):
    from dfosd.core.onestep import build_from_model
    from dfosd.core.readers import read_model

    return build_from_model(tiny_base, read_model(tiny_ckpt))  # the route dfosd-export takes


@pytest.fixture(scope="session")
def photo_lr():
    """A real photograph (scikit-image's astronaut) reduced to 64x64 LR, uint8 [3,64,64]."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((64, 64), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread for a whole module (its module fixtures included).

    Two OpenMP threads on a shared 2-core machine spin-wait for each other under load (small
    ops 100x slower, measured), and a fixed thread count keeps float reductions in one order,
    which the exact resume and fp32 parity checks rely on. Restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- one compiled stand-in AOTI export
# Three one-line parts compiled by AOTInductor (cpu) into an export directory with dfosd's
# manifests: the real compile -> manifest -> load -> run path in seconds instead of minutes.
# Compiled once per session and shared by the AOTI backend tests and the C++ runner tests.
STAND_IN_TILE, STAND_IN_BATCH = 16, 2


def stand_in_parts():
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
            # A tile whose LR pixels are all white (255: latent ~0.863 after the stand-in UNet) turns
            # NaN, as an overflowing part would: the runners must fail it, not write a black tile.
            white = (denoised_latent.flatten(1).amin(1) > 0.86).view(-1, 1, 1, 1)
            r = torch.where(white, torch.full_like(r, float("nan")), r)
            flag = torch.isnan(r).flatten(1).to(torch.float32).amax(1).to(torch.uint8)
            return ((r + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8), flag

    return {"encoder": Encoder(), "unet": Unet(), "decoder": Decoder()}


def package_export(folder: Path, parts: dict, tile: int, batch: int) -> Path:
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
                "files": {}, "inputs": {}, "family": {"name": "dfosd", "color_fix": "none", "deviations": []}}
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    build = {"build_key": "stand-in-aoti", "export_build_key": "stand-in", "device": "cpu", "precision": "fp32",
             "system": system_info("cpu"), "components": aoti, "files": files}
    write_json_atomic(folder / AOTI_MANIFEST_NAME, {"format": AOTI_FORMAT, "kind": "dfosd-aoti",
                                                    "builds": {"cpu": build}})
    return folder


@pytest.fixture(scope="session")
def aoti_stand_in_export(tmp_path_factory):
    """An export directory holding only cpu AOTI packages of ``stand_in_parts`` (read-only: copy to tamper)."""
    return package_export(tmp_path_factory.mktemp("aoti_stand_in"), stand_in_parts(), STAND_IN_TILE, STAND_IN_BATCH)


# ---------------------------------------------------------------- the serving tests' server


@pytest.fixture(scope="session")
def server(tiny_export_fp32, tmp_path_factory):
    """The serving tests' one dfosd-serve (tritonserver + its front), shared by the whole session:
    tritonserver's start-up is the expensive part. tests/serving/test_serving_server.py's last test stops it."""
    from serve_helpers import ADMIN_KEY, ServeProcess

    proc = ServeProcess(tiny_export_fp32, tmp_path_factory.mktemp("serve") / "server.log", "--admin-key", ADMIN_KEY)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def local(tiny_export_fp32):
    """The in-process runtime on the serving tests' export: (image CHW uint8 torch) -> CHW output."""
    from serve_helpers import TILE_BATCH

    from dfosd.runtime.step import OneStepRunner
    from dfosd.runtime.tiling import TilingConfig, upscale_tiled

    runner = OneStepRunner(tiny_export_fp32, backend="onnxruntime", batch=TILE_BATCH, say=lambda m: None)

    def run(image, overlap=None):
        cfg = TilingConfig(tile=runner.tile, overlap=runner.tile // 4 if overlap is None else overlap,
                           batch=runner.batch, scale=runner.scale)
        return upscale_tiled(image, runner, cfg)

    return run
