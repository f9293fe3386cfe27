"""PIL's bicubic upscale of a uint8 image, as a graph (OSEDiff and PiSA-SR pre-process with it).

Pillow resamples separably, width first, then height, and stores uint8 between the passes:
cubic kernel a = -0.5, pixel centres at +0.5 (half_pixel), taps outside the image dropped
and the remaining weights renormalised. Each pass is one ONNX ``Resize`` (mode cubic,
cubic_coeff_a -0.5, exclude_outside 1, half_pixel) followed by Round and Clip(0, 255): what
TensorRT's IResizeLayer also expresses. Eager PyTorch computes the same pass as a matmul
with the pass's weight matrix, so eager and exported graphs share one definition.

Measured against Pillow on photos: at most one level off on a fraction of a percent of
pixels (Pillow rounds in 22-bit fixed point, ties can land differently).
"""

from __future__ import annotations

import functools

import torch

CUBIC_A = -0.5


def _cubic(x: float, a: float = CUBIC_A) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def upscale_matrix(n_in: int, scale: int) -> torch.Tensor:
    """[n_in * scale, n_in] float32: row i holds the weights of output pixel i (a new tensor each
    call: the tracer must not meet one tensor object as two different constants)."""
    return torch.tensor(_upscale_weights(n_in, scale), dtype=torch.float32)


@functools.lru_cache(maxsize=16)
def _upscale_weights(n_in: int, scale: int) -> tuple:
    import math

    m = [[0.0] * n_in for _ in range(n_in * scale)]
    for i in range(n_in * scale):
        center = (i + 0.5) / scale  # in input pixel units, pixel j covers [j, j+1)
        first = math.floor(center - 0.5) - 1
        weights = {j: _cubic(j + 0.5 - center) for j in range(first, first + 4) if 0 <= j < n_in}
        total = sum(weights.values())
        for j, w in weights.items():
            m[i][j] = w / total
    return tuple(tuple(row) for row in m)


class _CubicUpscaleAxis(torch.autograd.Function):
    """One pass along ``axis`` (3: width, 2: height) of a [B, C, H, W] float tensor."""

    @staticmethod
    def forward(ctx, x, axis: int, scale: int):
        m = upscale_matrix(int(x.shape[axis]), int(scale)).to(x.dtype)
        return x @ m.T if axis == 3 else m @ x

    @staticmethod
    def symbolic(g, x, axis: int, scale: int):
        scales = [1.0, 1.0, 1.0, 1.0]
        scales[axis] = float(scale)
        roi = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
        sc = g.op("Constant", value_t=torch.tensor(scales, dtype=torch.float32))
        return g.op("Resize", x, roi, sc, mode_s="cubic", cubic_coeff_a_f=CUBIC_A, exclude_outside_i=1,
                    coordinate_transformation_mode_s="half_pixel")


def pil_bicubic_upscale(image: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8-valued float [B, 3, h, w] -> uint8-valued float [B, 3, s*h, s*w], as Pillow does it."""
    x = _CubicUpscaleAxis.apply(image.float(), 3, int(scale))
    x = torch.round(x).clamp(0.0, 255.0)
    x = _CubicUpscaleAxis.apply(x, 2, int(scale))
    return torch.round(x).clamp(0.0, 255.0)
