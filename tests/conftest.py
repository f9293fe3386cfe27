"""Shared fixtures: a tiny real base, a random checkpoint, and exports of it.

Everything is built from the tiny SD-style configs with seeded random weights, once
per test session, so the suite exercises real diffusers modules, real ONNX files and
real ONNX Runtime sessions in a few minutes on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

TINY = "synthetic:tiny"
TILE = 32  # LR pixels: 128x128 output, 16x16 latent with the tiny VAE
CALIB_COUNT = 8
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


@pytest.fixture(scope="session")
def tiny_base():
    from dfosd.core.bases import load_base

    return load_base(TINY)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_base, tmp_path_factory):
    from dfosd.core.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "lora.safetensors", tiny_base)


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
    from dfosd.core.checkpoint import read_checkpoint
    from dfosd.core.onestep import build_onestep

    return build_onestep(tiny_base, read_checkpoint(tiny_ckpt))


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
