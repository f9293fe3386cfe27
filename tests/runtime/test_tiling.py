"""Tiling: config checks, tile plans, exactness, padding, batching and seam-free blending."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfosd.core.errors import DfosdError
from dfosd.runtime.tiling import TilingConfig, blend_window, plan_tiles, seam_score, upscale_tiled

CFG = TilingConfig(tile=32, overlap=8, batch=4)


def bicubic_step(tiles: torch.Tensor) -> torch.Tensor:
    """A real x4 upscaler: torch bicubic, rounded back to uint8 (edge-clamped at tile borders)."""
    up = F.interpolate(tiles.float(), scale_factor=4, mode="bicubic", align_corners=False)
    return torch.round(up).clamp(0, 255).to(torch.uint8)


def make_conv_step() -> Callable[[torch.Tensor], torch.Tensor]:
    """Bicubic plus a fixed random conv residual with zero padding: strong tile-border effects."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(8, 3, 3, padding=1))

    @torch.no_grad()
    def step(tiles: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(tiles.float() / 255, scale_factor=4, mode="bicubic", align_corners=False)
        return torch.round((y + 0.3 * net(y)) * 255).clamp(0, 255).to(torch.uint8)

    return step


def naive_paste(image: torch.Tensor, step, cfg: TilingConfig) -> torch.Tensor:
    """What tiling without blending does: paste each tile's output over the previous ones."""
    _, h, w = image.shape
    t, s = cfg.tile, cfg.scale
    out = torch.zeros(3, h * s, w * s, dtype=torch.uint8)
    for y, x in plan_tiles(h, w, cfg):
        out[:, y * s:(y + t) * s, x * s:(x + t) * s] = step(image[None, :, y:y + t, x:x + t])[0]
    return out


def photo(name: str, step: int) -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(np.ascontiguousarray(getattr(data, name)()[::step, ::step])).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs,needle", [
    ({"tile": 4, "overlap": 0, "batch": 1}, "--tile 4"),
    ({"tile": 64, "overlap": -1, "batch": 1}, "--overlap -1"),
    ({"tile": 64, "overlap": 40, "batch": 1}, "--overlap 40 must be smaller than half of --tile 64"),
    ({"tile": 64, "overlap": 32, "batch": 1}, "--overlap 32"),
    ({"tile": 64, "overlap": 16, "batch": 0}, "--batch 0"),
    ({"tile": 64, "overlap": 16, "batch": 1, "scale": 0}, "scale 0"),
])
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(DfosdError) as exc:
        TilingConfig(**kwargs)
    assert needle in str(exc.value)


def test_config_accepts_edge_values():
    assert TilingConfig(tile=8, overlap=3, batch=1, scale=1).stride == 5
    assert TilingConfig(tile=64, overlap=0, batch=8).stride == 64


# ----------------------------------------------------------------------------- plan

@pytest.mark.parametrize("h,w", [(32, 32), (33, 70), (100, 41), (57, 32), (200, 200)])
def test_plan_covers_every_pixel_flush_and_in_bounds(h, w):
    origins = plan_tiles(h, w, CFG)
    cover = torch.zeros(h, w, dtype=torch.int32)
    for y, x in origins:
        assert 0 <= y <= h - CFG.tile and 0 <= x <= w - CFG.tile
        cover[y:y + CFG.tile, x:x + CFG.tile] += 1
    assert (cover > 0).all()
    assert max(y for y, _ in origins) == h - CFG.tile  # last row flush with the bottom
    assert max(x for _, x in origins) == w - CFG.tile  # last column flush with the right
    assert len(set(origins)) == len(origins)
    # neighbours overlap by at least `overlap` (so the blend ramps always have a partner)
    for axis in (0, 1):
        starts = sorted({o[axis] for o in origins})
        assert all(0 < b - a <= CFG.stride for a, b in zip(starts, starts[1:]))


def test_plan_single_tile_and_stride():
    assert plan_tiles(32, 32, CFG) == [(0, 0)]
    assert plan_tiles(32, 56, CFG) == [(0, 0), (0, 24)]  # exactly one stride
    assert plan_tiles(32, 60, CFG) == [(0, 0), (0, 24), (0, 28)]  # last one flush


# ----------------------------------------------------------------------------- window

def test_blend_window_shape_positive_flat_and_cross_fades():
    win = blend_window(CFG)
    size, ramp = CFG.tile * CFG.scale, CFG.overlap * CFG.scale
    assert win.shape == (size, size) and win.dtype == torch.float32
    assert (win > 0).all() and win.max() == 1.0
    assert (win[ramp:size - ramp, ramp:size - ramp] == 1.0).all()
    row = win[size // 2].double()
    assert (row[1:ramp] > row[:ramp - 1]).all()  # rises monotonically
    # the right ramp of one tile and the left ramp of the next sum to 1 over the overlap
    assert torch.allclose(row[size - ramp:] + row[:ramp], torch.ones(ramp, dtype=torch.float64), atol=1e-6)


# ----------------------------------------------------------------------------- upscale

def test_single_tile_is_bit_exact():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for step in (bicubic_step, make_conv_step()):
        assert torch.equal(upscale_tiled(img, step, CFG), step(img[None])[0])


@pytest.mark.parametrize("h,w", [(10, 17), (3, 40), (1, 1), (31, 5)])
def test_small_image_is_padded_and_cropped(h, w):
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    seen = []

    def step(tiles):
        seen.append(tuple(tiles.shape))
        return bicubic_step(tiles)

    out = upscale_tiled(img, step, CFG)
    assert out.shape == (3, 4 * h, 4 * w) and out.dtype == torch.uint8
    assert all(s[1:] == (3, 32, 32) for s in seen)  # the engine only ever sees its tile shape
    if h > 1 and w > 1:
        # away from the padded border the result is bicubic of the real pixels
        whole = bicubic_step(img[None])[0]
        assert (out[:, :4 * h - 8, :4 * w - 8].int() - whole[:, :4 * h - 8, :4 * w - 8].int()).abs().max() <= 1


def test_reflect_padding_is_used_when_possible():
    # with reflect padding a 10x17 image tile holds mirrored pixels, not copies of the last row
    img = torch.arange(3 * 10 * 17, dtype=torch.int64).reshape(3, 10, 17).remainder(251).to(torch.uint8)
    tiles = []
    upscale_tiled(img, lambda t: (tiles.append(t.clone()), bicubic_step(t))[1], CFG)
    t = tiles[0][0]
    assert torch.equal(t[:, 10, :17], img[:, 8, :])  # row 10 mirrors row 8
    assert torch.equal(t[:, :10, 17], img[:, :, 15])  # column 17 mirrors column 15


def test_batches_respect_limit_and_cover_all_tiles():
    cfg = TilingConfig(tile=32, overlap=8, batch=3)
    img = torch.randint(0, 256, (3, 100, 41), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    sizes = []

    def step(tiles):
        sizes.append(tiles.shape[0])
        return bicubic_step(tiles)

    upscale_tiled(img, step, cfg)
    n = len(plan_tiles(100, 41, cfg))
    assert n == 8 and sum(sizes) == n  # 4 rows (0, 24, 48, 68) x 2 columns (0, 9)
    assert all(1 <= b <= 3 for b in sizes) and sizes == [3, 3, 2]


def test_bad_step_output_is_reported():
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected uint8"):
        upscale_tiled(img, lambda t: bicubic_step(t).float(), CFG)
    with pytest.raises(ValueError, match="expected uint8"):
        upscale_tiled(img, lambda t: bicubic_step(t)[:, :, :64], CFG)


# ----------------------------------------------------------------------------- seams

def test_two_tiles_match_whole_image_and_have_no_seam():
    img = photo("chelsea", 2)[:, 60:92, 50:106].contiguous()  # 32x56 LR: two tiles side by side
    assert len(plan_tiles(32, 56, CFG)) == 2
    tiled = upscale_tiled(img, bicubic_step, CFG)
    whole = bicubic_step(img[None])[0]
    overlap_band = slice(24 * 4, 32 * 4)  # output columns covered by both tiles
    assert (tiled[:, :, overlap_band].int() - whole[:, :, overlap_band].int()).abs().max() <= 1
    assert (tiled.int() - whole.int()).abs().max() <= 1

    blended = seam_score(tiled, CFG, 32, 56)
    naive = seam_score(naive_paste(img, bicubic_step, CFG), CFG, 32, 56)
    assert abs(blended - seam_score(whole, CFG, 32, 56)) < 0.05  # as seamless as no tiling at all
    assert 0.8 < blended < 1.3
    # the metric discriminates: pasting tiles without blending leaves a visible seam
    assert naive > 2.0 and naive > 1.8 * blended


def test_blending_hides_strong_tile_border_effects():
    # A conv net with zero padding misbehaves at every tile border; 3x3 tiles of 80x80.
    step = make_conv_step()
    img = photo("astronaut", 4)[:, 20:100, 30:110].contiguous()
    tiled = upscale_tiled(img, step, CFG)
    whole = step(img[None])[0]
    naive = naive_paste(img, step, CFG)
    assert (tiled.int() - whole.int()).abs().max() <= 2
    assert (naive.int() - whole.int()).abs().max() > 30  # the border effects are real
    blended_score, naive_score = seam_score(tiled, CFG, 80, 80), seam_score(naive, CFG, 80, 80)
    assert abs(blended_score - seam_score(whole, CFG, 80, 80)) < 0.05
    assert naive_score > 2.0 and naive_score > 2.5 * blended_score


def test_seam_score_single_tile_and_flat():
    assert seam_score(torch.zeros(3, 128, 128, dtype=torch.uint8), CFG, 32, 32) == 1.0
    assert seam_score(torch.full((3, 224, 224), 7, dtype=torch.uint8), CFG, 56, 56) == 1.0
    with pytest.raises(ValueError):
        seam_score(torch.zeros(3, 100, 100, dtype=torch.uint8), CFG, 32, 32)


# ----------------------------------------------------------------------------- banded blending

def whole_image_blend(image: torch.Tensor, step, cfg: TilingConfig) -> torch.Tensor:
    """The blend as it was before banding (the spec the C++ runner mirrors): float32 sums of
    window * output and of window over the whole padded output, in plan order, rounded once."""
    from dfosd.runtime.tiling import TiledImage

    job = TiledImage(image, cfg)  # for its padding and plan only
    s, t = cfg.scale, cfg.tile
    ph, pw = job.padded.shape[1:]
    acc = torch.zeros(3, ph * s, pw * s)
    weight = torch.zeros(ph * s, pw * s)
    window = blend_window(cfg)
    for i in range(0, len(job), cfg.batch):
        outs = step(job.tiles(i, i + cfg.batch))
        for (y, x), out in zip(job.origins[i:i + cfg.batch], outs):
            acc[:, y * s:(y + t) * s, x * s:(x + t) * s] += out.to(torch.float32) * window
            weight[y * s:(y + t) * s, x * s:(x + t) * s] += window
    full = torch.round(acc / weight).clamp_(0, 255).to(torch.uint8)
    return full[:, :image.shape[1] * s, :image.shape[2] * s]


@pytest.mark.parametrize("h, w, cfg", [
    (70, 50, TilingConfig(tile=16, overlap=4, batch=3)),   # rows 0,12,..,54 (last flush), batches cross rows
    (45, 23, TilingConfig(tile=16, overlap=7, batch=1)),   # wide overlaps, odd sizes
    (5, 40, TilingConfig(tile=16, overlap=4, batch=2)),    # padded: rows past the image are dropped
    (16, 16, TilingConfig(tile=16, overlap=0, batch=1)),   # one tile, no ramps
    (33, 17, TilingConfig(tile=16, overlap=4, batch=5, scale=2)),
])
def test_banded_blend_is_byte_identical_to_the_whole_image_blend(h, w, cfg):
    step = make_conv_step() if cfg.scale == 4 else (lambda t: torch.repeat_interleave(
        torch.repeat_interleave(t, 2, dim=2), 2, dim=3))
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))
    want = whole_image_blend(img, step, cfg)
    assert torch.equal(upscale_tiled(img, step, cfg), want)
    rows = []  # the same bytes through a sink, in order, top to bottom, each row once
    assert upscale_tiled(img, step, cfg, sink=lambda y, band: rows.append((y, band.clone()))) is None
    assert [y for y, _ in rows] == sorted({y for y, _ in rows}) and rows[0][0] == 0
    assert torch.equal(torch.cat([b for _, b in rows], dim=1), want)


def test_progress_reports_every_batch():
    cfg = TilingConfig(tile=16, overlap=4, batch=3)
    img = torch.zeros(3, 40, 40, dtype=torch.uint8)
    calls = []
    upscale_tiled(img, bicubic_step, cfg, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 9), (6, 9), (9, 9)]


def test_float_state_is_one_band_not_the_whole_output():
    """The float blend state never exceeds one band of tile*scale output rows (was: the whole output)."""
    from dfosd.runtime.tiling import TiledImage

    cfg = TilingConfig(tile=16, overlap=4, batch=4)
    job = TiledImage(torch.zeros(3, 200, 30, dtype=torch.uint8), cfg, sink=lambda y, band: None)
    biggest = 0
    for i in range(0, len(job), cfg.batch):
        job.add(i, bicubic_step(job.tiles(i, i + cfg.batch)))
        if job._acc is not None:
            biggest = max(biggest, job._acc.numel() + job._weight.numel())
    assert biggest == 4 * (16 * 4) * (30 * 4)  # 3 channels + weights, 64 rows, full width
    assert job._acc is None and job._out is None  # all freed / nothing output-sized with a sink
