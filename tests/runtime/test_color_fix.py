"""Colour fixes: AdaIN statistics, wavelet band swap, and the uint8 wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfosd.core.errors import DfosdError
from dfosd.runtime.color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix


@pytest.fixture(scope="module")
def hr() -> torch.Tensor:
    """A real photo, float [1,3,256,256] in 0..255 (stands in for a detailed SR output)."""
    from skimage import data

    img = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float()
    return F.avg_pool2d(img, 2)


def lowpass(x: torch.Tensor) -> torch.Tensor:
    """Colour at a coarse scale: 32x32 block means (independent of the fix's own pyramid)."""
    return F.avg_pool2d(x, 32)


def highpass(x: torch.Tensor) -> torch.Tensor:
    """Fine detail: the image minus a 5x5 box blur (independent of the fix's own pyramid)."""
    return x - F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def colour_cast(x: torch.Tensor) -> torch.Tensor:
    """A smooth, spatially varying tint: per-channel offset plus a left-right gradient."""
    ramp = torch.linspace(-1, 1, x.shape[-1])
    shift = torch.tensor([18.0, -6.0, -14.0])[:, None, None] + torch.tensor([8.0, 0.0, -8.0])[:, None, None] * ramp
    return x + shift[None]


def test_adain_matches_reference_channel_stats(hr):
    g = torch.Generator().manual_seed(0)
    sr = hr * 0.7 + 30 + torch.randn(hr.shape, generator=g) * 3  # duller, brighter, noisier
    ref = torch.rand(1, 3, 64, 80, generator=g) * torch.tensor([50.0, 120.0, 200.0])[:, None, None]  # other size
    out = adain_color_fix(sr, ref)
    dims = (0, 2, 3)
    assert torch.allclose(out.mean(dims), ref.mean(dims), atol=1e-3)
    assert torch.allclose(out.std(dims, unbiased=False), ref.std(dims, unbiased=False), rtol=1e-4)
    # the structure of sr is kept: per channel it is an increasing affine map of sr
    for c in range(3):
        assert np.corrcoef(out[0, c].flatten(), sr[0, c].flatten())[0, 1] > 0.9999


def test_adain_flat_channel_does_not_blow_up():
    sr = torch.full((1, 3, 8, 8), 100.0)
    ref = torch.full((1, 3, 8, 8), 40.0)
    assert torch.allclose(adain_color_fix(sr, ref), ref)


def test_wavelet_on_identical_inputs_is_identity(hr):
    out = wavelet_color_fix(hr, hr.clone())
    assert (out - hr).abs().max() < 1e-3


def test_wavelet_restores_low_frequencies_and_keeps_detail(hr):
    # ref: what the LR input gives after bicubic upsampling (true colours, no fine detail)
    lr = F.avg_pool2d(hr, 4)
    ref = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 255)
    sr = colour_cast(hr)  # detailed, but tinted
    out = wavelet_color_fix(sr, ref)

    low_err_before = (lowpass(sr) - lowpass(ref)).abs().mean()
    low_err_after = (lowpass(out) - lowpass(ref)).abs().mean()
    assert low_err_before > 10 and low_err_after < 1.0, (low_err_before, low_err_after)

    detail, detail_kept = highpass(hr), highpass(out)
    rel_err = (detail_kept - detail).norm() / detail.norm()
    assert rel_err < 0.05, rel_err  # the fine detail is sr's, not ref's blur
    assert (highpass(ref) - detail).norm() / detail.norm() > 0.5  # (ref really lacks it)


@pytest.mark.parametrize("dilation", [1, 4, 16])
def test_atrous_blur_is_the_dilated_3x3_kernel(dilation):
    from dfosd.runtime.color_fix import _atrous_blur

    x = torch.rand(2, 3, 40, 29, generator=torch.Generator().manual_seed(dilation)) * 255
    k1 = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = torch.outer(k1, k1).expand(3, 1, 3, 3)
    want = F.conv2d(F.pad(x, (dilation,) * 4, mode="replicate"), kernel, groups=3, dilation=dilation)
    assert torch.allclose(_atrous_blur(x, dilation), want, atol=1e-3)


def test_wavelet_small_image_and_bad_shapes():
    x = torch.rand(1, 3, 5, 7) * 255
    assert wavelet_color_fix(x, x).shape == x.shape  # dilation 16 > size: replicate padding copes
    with pytest.raises(ValueError):
        wavelet_color_fix(x, torch.rand(1, 3, 5, 8))


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_apply_color_fix_uint8_moves_colours_to_lr(hr, method):
    lr = _uint8(F.avg_pool2d(hr, 4)[0])  # [3,64,64]
    sr = _uint8(colour_cast(hr)[0])  # [3,256,256]
    out = apply_color_fix(sr, lr, method, 4)
    assert out.dtype == torch.uint8 and out.shape == sr.shape
    lr_mean = lr.float().mean((1, 2))
    assert (sr.float().mean((1, 2)) - lr_mean).abs().max() > 10
    assert (out.float().mean((1, 2)) - lr_mean).abs().max() < 1.0


def test_none_is_identity_and_bad_method_is_a_user_error():
    sr = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    lr = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert torch.equal(apply_color_fix(sr, lr, "none", 4), sr)
    with pytest.raises(DfosdError, match="unknown colour fix 'histogram'"):
        apply_color_fix(sr, lr, "histogram", 4)
    with pytest.raises(ValueError, match="not 4x"):
        apply_color_fix(sr, lr[:, :7], "wavelet", 4)
