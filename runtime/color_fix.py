"""Colour correction of the SR output towards the (bicubic-upsampled) LR input.

One-step diffusion SR can drift in colour: the VAE round trip and the single denoising
step shift tints and contrast a little, most visibly in flat areas. The LR input is the
ground truth for colour at low frequencies, so both fixes pull the output's colours back
to the bicubic upsample of the input while keeping the detail the model added:

* ``adain``: match each channel's mean and standard deviation (global, cheap; fixes a
  uniform cast but not one that varies across the image);
* ``wavelet``: swap the low-frequency bands of an a-trous wavelet pyramid (local; keeps
  the model's high frequencies and the input's low frequencies exactly).

Both work on float tensors [B,3,H,W]; ``apply_color_fix`` wraps them for uint8 images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfosd.core.errors import DfosdError
from dfosd.core.vocab import COLOR_FIXES

COLOR_FIX_METHODS = COLOR_FIXES
_EPS = 1e-5  # keeps a flat (zero-std) channel from dividing by zero


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and (population) std of [B,C,H,W], shaped [B,C,1,1], in ``x``'s dtype.

    Reduced in float64: the order a reduction takes (torch splits it by thread count; the C++
    runner's libtorch, the served model) then changes the float32 result only in the rarest of
    ties, so the local run, the served model and the C++ runner (serving/cpp/src/color_fix.cpp,
    the same steps) give the same bytes.
    """
    flat = x.flatten(2).double()
    mean, std = flat.mean(-1), flat.std(-1, unbiased=False)
    return mean.to(x.dtype)[..., None, None], std.to(x.dtype)[..., None, None]


def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Give each channel of ``sr`` the mean and std of the same channel of ``ref``.

    ``sr`` and ``ref`` are float [B,3,H,W]; they need not be the same size.
    """
    sr_mean, sr_std = _channel_stats(sr)
    ref_mean, ref_std = _channel_stats(ref)
    return (sr - sr_mean) / (sr_std + _EPS) * ref_std + ref_mean


def _blur_axis(x: torch.Tensor, dilation: int, dim: int) -> torch.Tensor:
    """[1,2,1]/4 along ``dim`` (2: vertically, 3: horizontally), taps ``dilation`` apart, replicate-padded.

    Written as three shifted slices rather than a convolution: on CPU that is faster than
    a dilated depthwise conv2d (about 2x at 1024x1024), and the result is the same.
    """
    n = x.shape[dim]
    pad = (0, 0, dilation, dilation) if dim == 2 else (dilation, dilation, 0, 0)
    p = F.pad(x, pad, mode="replicate")  # replicate, not zeros: the border must not darken
    return (p.narrow(dim, 0, n) + 2 * p.narrow(dim, dilation, n) + p.narrow(dim, 2 * dilation, n)) / 4


def _atrous_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 blur, kernel outer([1,2,1], [1,2,1]) / 16, with holes of ``dilation`` (a-trous).

    Separable: rows then columns gives exactly the 3x3 kernel, including at the
    replicate-padded border.
    """
    return _blur_axis(_blur_axis(x, dilation, 3), dilation, 2)


def _low_band(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The residual low band of an a-trous pyramid: ``levels`` blurs, dilation 1, 2, 4, ...

    Each level blurs with twice the dilation of the last, so after ``levels`` levels the
    low band holds structures larger than about 2**levels pixels; x - low is the sum of
    all detail bands.
    """
    for i in range(levels):
        x = _atrous_blur(x, 2 ** i)
    return x


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """``sr``'s high-frequency bands plus ``ref``'s low-frequency band (float [B,3,H,W], same size).

    high(sr) + low(ref) = sr - low(sr) + low(ref) = sr + low(ref - sr), since the
    pyramid is linear: one pyramid of the difference instead of one per image.
    """
    if sr.shape != ref.shape:
        raise ValueError(f"wavelet colour fix needs equal shapes, got {tuple(sr.shape)} and {tuple(ref.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    return sr + _low_band(ref - sr, levels)


def bicubic_reference(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float [3,h,w] (0..255) -> float [3,H,W]: torch bicubic, clamped (bicubic overshoots)."""
    up = F.interpolate(lr[None].float(), size=size, mode="bicubic", align_corners=False)
    return up[0].clamp(0.0, 255.0)


def apply_color_fix(sr: torch.Tensor, lr: torch.Tensor, method: str, scale: int) -> torch.Tensor:
    """uint8 SR [3,H,W] corrected towards uint8 LR [3,h,w] with ``method``; uint8 [3,H,W].

    ``method`` is one of ``COLOR_FIX_METHODS``; "none" returns ``sr`` unchanged. ``scale``
    is only a consistency check (H, W must be h*scale, w*scale): the reference is the
    bicubic upsample of ``lr`` to exactly the SR size.
    """
    if method not in COLOR_FIX_METHODS:
        raise DfosdError(f"unknown colour fix {method!r}", hint=f"use one of: {', '.join(COLOR_FIX_METHODS)}")
    if method == "none":
        return sr
    h_out, w_out = sr.shape[1:]
    if (h_out, w_out) != (lr.shape[1] * scale, lr.shape[2] * scale):
        raise ValueError(f"SR size {h_out}x{w_out} is not {scale}x the LR size {lr.shape[1]}x{lr.shape[2]}")
    ref = bicubic_reference(lr, (h_out, w_out))[None]
    x = sr[None].float()
    fixed = adain_color_fix(x, ref) if method == "adain" else wavelet_color_fix(x, ref)
    return torch.round(fixed[0]).clamp_(0, 255).to(torch.uint8)
