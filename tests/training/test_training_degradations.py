"""Real-ESRGAN degradation in plain torch: shapes, ranges, determinism, config, JPEG vs PIL."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dfosd.core.errors import DfosdError
from dfosd.training.degradations import (
    DegradationConfig,
    _Rng,
    degrade,
    filter2d,
    jpeg,
    random_blur_kernels,
    random_final_sinc_kernels,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def astronaut():
    skd = pytest.importorskip("skimage.data")
    return skd.astronaut()  # 512x512x3 uint8


@pytest.fixture(scope="module")
def hr_batch(astronaut):
    x = torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255.0
    crops = [x[:, :128, :128], x[:, 100:228, 200:328], x[:, 300:428, 300:428]]
    return torch.stack(crops)  # [3,3,128,128]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_shape_range_and_8bit_levels(hr_batch):
    lr = degrade(hr_batch, DegradationConfig(), _gen(0))
    assert lr.shape == (3, 3, 32, 32)
    assert lr.dtype == hr_batch.dtype
    assert float(lr.min()) >= 0.0 and float(lr.max()) <= 1.0
    levels = lr * 255.0
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert torch.isfinite(lr).all()


@pytest.mark.parametrize("hw", [(64, 96), (32, 32)])
def test_non_square_and_small_inputs(hw):
    hr = torch.rand(2, 3, *hw, generator=_gen(1))
    for seed in range(4):  # several seeds: exercises up/down/keep, both noise kinds, both orders
        lr = degrade(hr, None, _gen(seed))
        assert lr.shape == (2, 3, hw[0] // 4, hw[1] // 4)
        assert float(lr.min()) >= 0.0 and float(lr.max()) <= 1.0


def test_deterministic_given_generator(hr_batch):
    a = degrade(hr_batch, None, _gen(123))
    b = degrade(hr_batch, None, _gen(123))
    c = degrade(hr_batch, None, _gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_degradation_actually_degrades(hr_batch):
    """LR differs from a plain 4x area downsample of the HR (blur/noise/JPEG happened), but stays close."""
    lr = degrade(hr_batch, None, _gen(5))
    ref = torch.nn.functional.interpolate(hr_batch, size=(32, 32), mode="area")
    err = (lr - ref).abs().mean().item()
    assert 0.003 < err < 0.25


def test_kernels_normalised_and_sized():
    cfg = DegradationConfig()
    rng = _Rng(_gen(0), torch.device("cpu"))
    k = random_blur_kernels(rng, 64, cfg, kernel_prob=cfg.kernel_prob, sinc_prob=0.3, sigma=cfg.blur_sigma,
                            betag=cfg.betag_range, betap=cfg.betap_range)
    assert k.shape == (64, 21, 21)
    assert torch.allclose(k.sum((1, 2)), torch.ones(64, dtype=k.dtype), atol=1e-9)
    # point symmetric (so correlation == convolution), and zero outside the drawn size
    assert torch.allclose(k, k.flip(1, 2), atol=1e-9)
    assert torch.isfinite(k).all()
    fk = random_final_sinc_kernels(rng, 16, cfg)
    assert torch.allclose(fk.sum((1, 2)), torch.ones(16, dtype=fk.dtype), atol=1e-9)
    # filtering a constant image leaves it constant
    const = torch.full((2, 3, 40, 40), 0.3)
    assert torch.allclose(filter2d(const, k[:2]), const, atol=1e-5)


def test_all_sinc_and_no_blur_configs():
    hr = torch.rand(2, 3, 64, 64, generator=_gen(2))
    cfg = DegradationConfig(sinc_prob=1.0, sinc_prob2=1.0, final_sinc_prob=1.0, second_blur_prob=1.0)
    assert degrade(hr, cfg, _gen(0)).shape == (2, 3, 16, 16)
    cfg = DegradationConfig(second_blur_prob=0.0, final_sinc_prob=0.0, gaussian_noise_prob=0.0,
                            gaussian_noise_prob2=1.0, gray_noise_prob=1.0)
    assert degrade(hr, cfg, _gen(0)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sinc_prob=1.5), "sinc_prob"),
    (dict(kernel_prob=(0.5, 0.5, 0.5, 0.0, 0.0, 0.0)), "kernel_prob"),
    (dict(kernel_prob=(1.0,)), "kernel_prob"),
    (dict(resize_range=(1.2, 1.5)), "resize_range"),
    (dict(noise_range=(30.0, 1.0)), "noise_range"),
    (dict(jpeg_range=(30, 101)), "jpeg_range"),
    (dict(kernel_sizes=(7, 8)), "kernel_sizes"),
    (dict(scale=0), "scale"),
    (dict(betag_range=(2.0, 4.0)), "betag_range"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(DfosdError, match=needle):
        DegradationConfig(**kwargs)


def test_config_reports_every_problem_and_is_frozen():
    with pytest.raises(DfosdError) as e:
        DegradationConfig(sinc_prob=-1, jpeg_range=(0, 50))
    assert "sinc_prob" in str(e.value) and "jpeg_range" in str(e.value)
    cfg = DegradationConfig(noise_range=[1, 20])  # lists (JSON) become tuples
    assert cfg.noise_range == (1, 20) and hash(cfg)
    with pytest.raises(Exception):
        cfg.scale = 2  # type: ignore[misc]


def test_bad_input_shapes():
    with pytest.raises(ValueError):
        degrade(torch.rand(1, 3, 30, 32), None, _gen(0))
    with pytest.raises(ValueError):
        degrade(torch.rand(3, 32, 32), None, _gen(0))


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse)


@pytest.mark.parametrize("quality", [50, 85])
def test_jpeg_close_to_pil(astronaut, quality):
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "JPEG", quality=quality)
    pil = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    x = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float() / 255.0
    mine = (jpeg(x, quality)[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    assert _psnr(mine, pil) > 30.0
    # and it is a real compression: both are equally far from the original
    assert abs(_psnr(mine, astronaut) - _psnr(pil, astronaut)) < 1.5


def test_jpeg_per_sample_quality_and_odd_sizes(astronaut):
    x = torch.from_numpy(astronaut[:75, :101]).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1) / 255.0
    y = jpeg(x, torch.tensor([30.0, 95.0]))
    assert y.shape == x.shape
    err = (y - x).abs().mean((1, 2, 3))
    assert err[0] > err[1]  # lower quality, larger error
