"""Real-ESRGAN x4 second-order degradation in plain torch (no basicsr, no torchvision).

``degrade(hr, cfg, generator)`` turns HR crops [B,3,H,W] in [0,1] into LR images
[B,3,H/s,W/s] (s = ``cfg.scale``, 4) the way Real-ESRGAN's ``RealESRGANModel.feed_data``
does, with the values OSEDiff uses (``DegradationConfig`` defaults):

first stage   blur (iso / aniso / generalized / plateau Gaussian mix, or 2D sinc) ->
              random resize (up / down / keep, area / bilinear / bicubic) ->
              Gaussian noise (gray with some probability) or Poisson noise -> JPEG
second stage  blur (p = second_blur_prob) -> random resize -> noise ->
              in random order: [resize to H/s + final sinc, JPEG] or [JPEG, resize + sinc]
finally       clamp and round to 8-bit levels.

Which decisions are per sample and which per batch:

- per sample: blur kernels (type, size, sigmas, angle, shape, sinc cut-off), whether the second
  blur and the final sinc happen, noise type / strength / gray, JPEG quality, the order of the
  last two steps. (Real-ESRGAN draws noise type, second blur and order once per batch; drawing
  them per sample gives a more varied batch and is what a batch of one does anyway.)
- per batch: the two random resizes (scale and interpolation mode), because every sample of a
  batch must keep the same spatial size.

Deterministic given the generator: every random number is drawn from ``generator`` (or the
global RNG of the tensor's device when it is None) in a fixed order. Put the generator on the
images' device for speed; a CPU generator with CUDA images also works (noise is drawn on the
CPU and moved). Not differentiable (rounding, JPEG quantisation): run it under no_grad.

Not reproduced from Real-ESRGAN: unsharp-masking of the GT and the training-pair pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from dfosd.core.errors import problems_error

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")

Range = tuple[float, float]


@dataclass(frozen=True)
class DegradationConfig:
    """Every range and probability of the pipeline (Real-ESRGAN x4plus / OSEDiff values).

    Ranges are closed intervals (lo, hi). Kernel probabilities follow ``KERNEL_TYPES``;
    resize probabilities are (up, down, keep). Noise sigmas are on the 0..255 scale.
    """

    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    # first stage
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: Range = (0.2, 3.0)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: Range = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Range = (1.0, 30.0)
    poisson_scale_range: Range = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Range = (30.0, 95.0)
    # second stage
    second_blur_prob: float = 0.8
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: Range = (0.2, 1.5)
    betag_range2: Range = (0.5, 4.0)
    betap_range2: Range = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: Range = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: Range = (1.0, 25.0)
    poisson_scale_range2: Range = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: Range = (30.0, 95.0)
    final_sinc_prob: float = 0.8

    def __post_init__(self):
        # tuples even when built from lists (JSON / YAML), so the object stays hashable
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        problems = []
        if not isinstance(self.scale, int) or self.scale < 1:
            problems.append(f"scale {self.scale!r} must be an integer >= 1")
        if not self.kernel_sizes or any(not isinstance(k, int) or k < 3 or k % 2 == 0 for k in self.kernel_sizes):
            problems.append(f"kernel_sizes {self.kernel_sizes} must be odd integers >= 3")
        for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob", "second_blur_prob", "sinc_prob2",
                     "gaussian_noise_prob2", "gray_noise_prob2", "final_sinc_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                problems.append(f"{name} {p} is not a probability in [0, 1]")
        for name, n in (("kernel_prob", len(KERNEL_TYPES)), ("kernel_prob2", len(KERNEL_TYPES)),
                        ("resize_prob", 3), ("resize_prob2", 3)):
            ps = getattr(self, name)
            if len(ps) != n:
                problems.append(f"{name} has {len(ps)} entries, needs {n}")
            elif any(p < 0 for p in ps) or abs(sum(ps) - 1.0) > 1e-6:
                problems.append(f"{name} {ps} must be non-negative and sum to 1")
        for name in ("blur_sigma", "blur_sigma2", "noise_range", "noise_range2", "poisson_scale_range",
                     "poisson_scale_range2"):
            lo, hi = _pair(getattr(self, name), name, problems)
            if lo is not None and not 0 < lo <= hi:
                problems.append(f"{name} {getattr(self, name)} must satisfy 0 < lo <= hi")
        for name in ("betag_range", "betag_range2", "betap_range", "betap_range2"):
            lo, hi = _pair(getattr(self, name), name, problems)
            if lo is not None and not 0 < lo <= 1 <= hi:
                problems.append(f"{name} {getattr(self, name)} must satisfy 0 < lo <= 1 <= hi "
                                "(shape is drawn below or above 1 with equal probability)")
        for name in ("resize_range", "resize_range2"):
            lo, hi = _pair(getattr(self, name), name, problems)
            if lo is not None and not 0 < lo <= 1 <= hi:
                problems.append(f"{name} {getattr(self, name)} must satisfy 0 < lo <= 1 <= hi "
                                "(down-scales are drawn from [lo, 1], up-scales from [1, hi])")
        for name in ("jpeg_range", "jpeg_range2"):
            lo, hi = _pair(getattr(self, name), name, problems)
            if lo is not None and not 1 <= lo <= hi <= 100:
                problems.append(f"{name} {getattr(self, name)} must satisfy 1 <= lo <= hi <= 100")
        if problems:
            raise problems_error("invalid DegradationConfig", problems,
                                 hint="the defaults are Real-ESRGAN's x4 values; change only what you mean to")

    @property
    def max_kernel_size(self) -> int:
        return max(self.kernel_sizes)


def _pair(v, name, problems):
    try:
        lo, hi = (float(x) for x in v)
        return lo, hi
    except (TypeError, ValueError):
        problems.append(f"{name} {v!r} must be a pair (lo, hi)")
        return None, None


# ---------------------------------------------------------------- random draws


class _Rng:
    """Draws from one generator (or the device's global RNG) in a fixed order."""

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.g = generator
        self.device = generator.device if generator is not None else device

    def uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        u = torch.rand(n, generator=self.g, device=self.device, dtype=torch.float64)
        return lo + (hi - lo) * u

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self.g, device=self.device, dtype=torch.float64) < p

    def choice(self, n: int, probs) -> torch.Tensor:
        w = torch.as_tensor(probs, dtype=torch.float64, device=self.device)
        return torch.multinomial(w, n, replacement=True, generator=self.g)

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, device=self.device, dtype=torch.float32)


# ---------------------------------------------------------------- kernels


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    r = size // 2
    ax = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def circular_lowpass_kernels(omega: torch.Tensor, sizes: torch.Tensor, max_size: int) -> torch.Tensor:
    """2D sinc (ideal circular low-pass) kernels [B,max_size,max_size], each of size sizes[i] zero-padded."""
    xx, yy = _grid(max_size, omega.device)
    r = torch.sqrt(xx**2 + yy**2)[None]
    w = omega.view(-1, 1, 1)
    k = w * torch.special.bessel_j1(w * r) / (2 * math.pi * torch.where(r == 0, torch.ones_like(r), r))
    k = torch.where(r == 0, w**2 / (4 * math.pi), k)
    return _mask_normalize(k, sizes, xx, yy)


def _mask_normalize(k, sizes, xx, yy):
    half = (sizes // 2).view(-1, 1, 1).to(k.dtype)
    mask = (xx.abs()[None] <= half) & (yy.abs()[None] <= half)
    k = k * mask
    return k / k.sum(dim=(1, 2), keepdim=True)


def random_blur_kernels(rng: _Rng, n: int, cfg: DegradationConfig, *, kernel_prob, sinc_prob, sigma, betag,
                        betap) -> torch.Tensor:
    """n Real-ESRGAN blur kernels [n,K,K] (K = cfg.max_kernel_size), float64, each summing to 1."""
    K = cfg.max_kernel_size
    sizes_t = torch.as_tensor(cfg.kernel_sizes, device=rng.device)
    sizes = sizes_t[rng.choice(n, [1.0] * len(cfg.kernel_sizes))]
    kind = rng.choice(n, kernel_prob)
    sx = rng.uniform(n, *sigma)
    sy = rng.uniform(n, *sigma)
    theta = rng.uniform(n, -math.pi, math.pi)
    below = rng.bernoulli(n, 0.5)
    bg = torch.where(below, rng.uniform(n, betag[0], 1.0), rng.uniform(n, 1.0, betag[1]))
    bp = torch.where(below, rng.uniform(n, betap[0], 1.0), rng.uniform(n, 1.0, betap[1]))
    is_sinc = rng.bernoulli(n, sinc_prob)
    omega = torch.where(sizes < 13, rng.uniform(n, math.pi / 3, math.pi), rng.uniform(n, math.pi / 5, math.pi))

    iso = kind % 2 == 0  # iso, generalized_iso, plateau_iso
    sy = torch.where(iso, sx, sy)
    theta = torch.where(iso, torch.zeros_like(theta), theta)
    # inverse covariance R diag(1/sx^2, 1/sy^2) R^T, quadratic form x^T S^-1 x
    c, s = torch.cos(theta), torch.sin(theta)
    a = c**2 / sx**2 + s**2 / sy**2
    b = c * s * (1 / sx**2 - 1 / sy**2)
    d = s**2 / sx**2 + c**2 / sy**2
    xx, yy = _grid(K, rng.device)
    q = a.view(-1, 1, 1) * xx**2 + 2 * b.view(-1, 1, 1) * xx * yy + d.view(-1, 1, 1) * yy**2
    family = (kind // 2).view(-1, 1, 1)  # 0 gaussian, 1 generalized, 2 plateau
    gauss = torch.exp(-0.5 * q)
    gen = torch.exp(-0.5 * q.pow(bg.view(-1, 1, 1)))
    plat = 1.0 / (q.pow(bp.view(-1, 1, 1)) + 1.0)
    k = torch.where(family == 0, gauss, torch.where(family == 1, gen, plat))
    k = _mask_normalize(k, sizes, xx, yy)
    sinc = circular_lowpass_kernels(omega, sizes, K)
    return torch.where(is_sinc.view(-1, 1, 1), sinc, k)


def random_final_sinc_kernels(rng: _Rng, n: int, cfg: DegradationConfig) -> torch.Tensor:
    """The last-step kernels: a sinc with probability final_sinc_prob, else a unit pulse."""
    K = cfg.max_kernel_size
    sizes_t = torch.as_tensor(cfg.kernel_sizes, device=rng.device)
    sizes = sizes_t[rng.choice(n, [1.0] * len(cfg.kernel_sizes))]
    omega = rng.uniform(n, math.pi / 3, math.pi)
    use = rng.bernoulli(n, cfg.final_sinc_prob)
    sinc = circular_lowpass_kernels(omega, sizes, K)
    pulse = torch.zeros(K, K, dtype=torch.float64, device=rng.device)
    pulse[K // 2, K // 2] = 1.0
    return torch.where(use.view(-1, 1, 1), sinc, pulse.expand_as(sinc))


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample correlation of x [B,C,H,W] with kernels [B,k,k] (reflect padding, same size)."""
    B, C, H, W = x.shape
    k = kernels.shape[-1]
    p = k // 2
    mode = "reflect" if p < H and p < W else "replicate"
    xp = F.pad(x, (p, p, p, p), mode=mode)
    w = kernels.to(device=x.device, dtype=x.dtype)[:, None].repeat_interleave(C, dim=0)
    out = F.conv2d(xp.reshape(1, B * C, H + 2 * p, W + 2 * p), w, groups=B * C)
    return out.view(B, C, H, W)


# ---------------------------------------------------------------- resize and noise


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _random_resize(rng: _Rng, x: torch.Tensor, probs, rng_range, *, base_hw=None) -> torch.Tensor:
    kind = int(rng.choice(1, probs).item())  # 0 up, 1 down, 2 keep
    lo, hi = rng_range
    if kind == 0:
        scale = float(rng.uniform(1, 1.0, hi).item())
    elif kind == 1:
        scale = float(rng.uniform(1, lo, 1.0).item())
    else:
        scale = 1.0
    mode = RESIZE_MODES[int(rng.choice(1, [1.0] * len(RESIZE_MODES)).item())]
    h, w = base_hw if base_hw is not None else x.shape[-2:]
    return _resize(x, (h * scale, w * scale), mode)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _poisson_noise(rng: _Rng, x: torch.Tensor) -> torch.Tensor:
    """basicsr's generate_poisson_noise_pt at scale 1: photon count = number of distinct 8-bit
    levels in the sample, rounded up to a power of two (256 for most photos)."""
    B = x.shape[0]
    levels = torch.clamp((x * 255.0).round(), 0, 255)
    img = levels / 255.0
    ids = levels.to(torch.int64).reshape(B, -1) + 256 * torch.arange(B, device=x.device).view(-1, 1)
    distinct = (torch.bincount(ids.flatten(), minlength=256 * B).view(B, 256) > 0).sum(1)
    vals = torch.exp2(torch.ceil(torch.log2(distinct.clamp(min=2).to(torch.float64)))).to(x.dtype).view(-1, 1, 1, 1)
    out = torch.poisson((img * vals).to(rng.device), generator=rng.g).to(x.device) / vals
    return out - img


def add_random_noise(rng: _Rng, x: torch.Tensor, *, gaussian_prob, sigma_range, poisson_range, gray_prob):
    """Per sample: Gaussian (sigma/255) or Poisson noise, gray with probability gray_prob; clipped to [0,1]."""
    B, C, H, W = x.shape
    gaussian = rng.bernoulli(B, gaussian_prob).to(x.device)
    gray = rng.bernoulli(B, gray_prob).to(x.device).view(-1, 1, 1, 1)
    sigma = (rng.uniform(B, *sigma_range) / 255.0).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    pscale = rng.uniform(B, *poisson_range).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    noise = torch.empty_like(x)
    g_idx, p_idx = gaussian.nonzero().flatten(), (~gaussian).nonzero().flatten()
    if g_idx.numel():
        n = len(g_idx)
        n_color = rng.randn((n, C, H, W)).to(x.device, x.dtype)
        n_gray = rng.randn((n, 1, H, W)).to(x.device, x.dtype)
        noise[g_idx] = torch.where(gray[g_idx], n_gray.expand_as(n_color), n_color) * sigma[g_idx]
    if p_idx.numel():
        xp = x[p_idx]
        p_color = _poisson_noise(rng, xp)
        p_gray = _poisson_noise(rng, _gray(xp)).expand_as(p_color)
        noise[p_idx] = torch.where(gray[p_idx], p_gray, p_color) * pscale[p_idx]
    return torch.clamp(x + noise, 0.0, 1.0)


# ---------------------------------------------------------------- JPEG

# Standard (ITU T.81 Annex K) tables, natural (row-major) order: rows are vertical frequencies.
_LUMA_Q = [
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
]
_CHROMA_Q = [
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32


def jpeg_quant_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's quality scaling of the standard tables: ([B,8,8] luma, [B,8,8] chroma)."""
    q = quality.to(torch.float64).clamp(1.0, 100.0).view(-1, 1, 1)
    s = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    out = []
    for base in (_LUMA_Q, _CHROMA_Q):
        t = torch.tensor(base, dtype=torch.float64, device=q.device).view(1, 8, 8)
        out.append(torch.floor((t * s + 50.0) / 100.0).clamp(1.0, 255.0))
    return out[0], out[1]


def _dct_matrix(device) -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64, device=device)
    m = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m  # orthonormal DCT-II: coef = M @ block @ M^T


def _blockwise(plane: torch.Tensor, table: torch.Tensor, M2: torch.Tensor) -> torch.Tensor:
    """plane [B,h,w] (h, w multiples of 8, level-shifted) -> quantised and reconstructed plane.

    M2 = kron(M, M) [64,64] applies the 2D DCT to row-major 8x8 blocks as one matrix product.
    """
    B, h, w = plane.shape
    blocks = plane.view(B, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(B, -1, 64)
    coef = blocks @ M2.T
    t = table.reshape(B, 1, 64).to(plane.dtype)
    coef = torch.round(coef / t) * t
    rec = (coef @ M2).view(B, h // 8, w // 8, 8, 8)
    return rec.permute(0, 1, 3, 2, 4).reshape(B, h, w)


def jpeg(x: torch.Tensor, quality) -> torch.Tensor:
    """Baseline JPEG round trip (libjpeg defaults: 4:2:0, standard tables, fancy upsampling).

    x [B,3,H,W] in [0,1]; quality a number or [B] tensor in [1,100]. Returns the decoded image
    in [0,1] on 8-bit levels. Not differentiable (quantisation rounds).
    """
    B, C, H, W = x.shape
    if C != 3:
        raise ValueError(f"jpeg expects RGB [B,3,H,W], got {tuple(x.shape)}")
    dev = x.device
    quality = torch.as_tensor(quality, dtype=torch.float64).to(dev).reshape(-1).expand(B)
    luma_t, chroma_t = jpeg_quant_tables(quality)
    rgb = torch.clamp((x.float() * 255.0).round(), 0, 255)
    # pad to whole 16x16 MCUs by edge replication, as the encoder does
    ph, pw = (-H) % 16, (-W) % 16
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168735892 * r - 0.331264108 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418687589 * g - 0.081312411 * b + 128.0
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # 4:2:0
    M = _dct_matrix(dev)
    M2 = torch.kron(M, M).float()
    y = (_blockwise(y - 128.0, luma_t, M2) + 128.0).clamp(0, 255)
    h2, w2 = chroma.shape[-2:]
    cbcr = torch.stack([_blockwise(chroma[:, i] - 128.0, chroma_t, M2) for i in range(2)], 1) + 128.0
    cbcr = F.interpolate(cbcr.clamp(0, 255), size=(2 * h2, 2 * w2), mode="bilinear", align_corners=False)
    cb, cr = cbcr[:, 0] - 128.0, cbcr[:, 1] - 128.0
    out = torch.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], 1)
    out = torch.clamp(out.round(), 0, 255)[:, :, :H, :W] / 255.0
    return out.to(x.dtype)


# ---------------------------------------------------------------- the pipeline


def degrade(hr: torch.Tensor, cfg: DegradationConfig | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """HR [B,3,H,W] float in [0,1] -> LR [B,3,H/s,W/s] float in [0,1] on 8-bit levels (s = cfg.scale)."""
    cfg = cfg or DegradationConfig()
    if hr.dim() != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        raise ValueError(f"degrade expects float RGB [B,3,H,W], got {tuple(hr.shape)} {hr.dtype}")
    B, _, H, W = hr.shape
    s = cfg.scale
    if H % s or W % s:
        raise ValueError(f"HR size {H}x{W} is not divisible by the scale {s}")
    rng = _Rng(generator, hr.device)
    with torch.no_grad():
        k1 = random_blur_kernels(rng, B, cfg, kernel_prob=cfg.kernel_prob, sinc_prob=cfg.sinc_prob,
                                 sigma=cfg.blur_sigma, betag=cfg.betag_range, betap=cfg.betap_range)
        k2 = random_blur_kernels(rng, B, cfg, kernel_prob=cfg.kernel_prob2, sinc_prob=cfg.sinc_prob2,
                                 sigma=cfg.blur_sigma2, betag=cfg.betag_range2, betap=cfg.betap_range2)
        k_final = random_final_sinc_kernels(rng, B, cfg)
        x = hr.float()

        # first stage
        x = filter2d(x, k1)
        x = _random_resize(rng, x, cfg.resize_prob, cfg.resize_range)
        x = add_random_noise(rng, x, gaussian_prob=cfg.gaussian_noise_prob, sigma_range=cfg.noise_range,
                             poisson_range=cfg.poisson_scale_range, gray_prob=cfg.gray_noise_prob)
        x = jpeg(x, rng.uniform(B, *cfg.jpeg_range))

        # second stage
        blur2 = rng.bernoulli(B, cfg.second_blur_prob).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(blur2, filter2d(x, k2), x)
        x = _random_resize(rng, x, cfg.resize_prob2, cfg.resize_range2, base_hw=(H / s, W / s))
        x = add_random_noise(rng, x, gaussian_prob=cfg.gaussian_noise_prob2, sigma_range=cfg.noise_range2,
                             poisson_range=cfg.poisson_scale_range2, gray_prob=cfg.gray_noise_prob2)

        # last: [resize back + sinc, JPEG] or [JPEG, resize back + sinc], per sample
        sinc_first = rng.bernoulli(B, 0.5).to(x.device)
        final_mode = RESIZE_MODES[int(rng.choice(1, [1.0] * len(RESIZE_MODES)).item())]
        q2 = rng.uniform(B, *cfg.jpeg_range2).to(x.device)
        out = x.new_empty(B, 3, H // s, W // s)
        a, b = sinc_first.nonzero().flatten(), (~sinc_first).nonzero().flatten()
        if a.numel():
            xa = filter2d(_resize(x[a], (H // s, W // s), final_mode), k_final.to(x.device)[a])
            out[a] = jpeg(xa.clamp(0, 1), q2[a])
        if b.numel():
            xb = jpeg(x[b].clamp(0, 1), q2[b])
            out[b] = filter2d(_resize(xb, (H // s, W // s), final_mode), k_final.to(x.device)[b])
        lr = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
    return lr.to(hr.dtype)
