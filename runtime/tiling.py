"""Fixed-shape tiling: upscale an image of any size with an engine of one static tile shape.

Engines are built for LR tiles of exactly ``tile x tile`` pixels in batches of at most
``batch``. An image is therefore cut into overlapping tiles on a regular grid (the last
row/column of tiles flush with the bottom/right edge), the tiles are upscaled in batches,
and the outputs are put back together as a *weighted average*: each tile's output is
multiplied by a window that is 1.0 in the middle and ramps down smoothly (raised cosine)
over the overlap, so neighbouring tiles cross-fade instead of meeting at a hard seam.

Images smaller than one tile are padded up to it (reflect where possible, else replicate)
and the output is cropped back, so the engine always sees the shape it was built for.

``seam_score`` measures whether the blending worked (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dfosd.core.errors import DfosdError

# uint8 [b,3,tile,tile] with 1 <= b <= batch  ->  uint8 [b,3,tile*scale,tile*scale].
# The step may assume b <= batch; padding a partial batch to the engine's batch is its job.
StepFn = Callable[[torch.Tensor], torch.Tensor]

MIN_TILE = 8


@dataclass(frozen=True)
class TilingConfig:
    """How to cut images into engine tiles. All sizes are in LR (input) pixels."""

    tile: int      # the engine's static LR tile size (square)
    overlap: int   # LR pixels shared by neighbouring tiles; the blend ramps span this
    batch: int     # most tiles per engine call
    scale: int = 4  # output pixels per input pixel

    def __post_init__(self) -> None:
        # Messages name the command-line options, since that is where the values come from.
        if self.tile < MIN_TILE:
            raise DfosdError(f"--tile {self.tile} is too small (at least {MIN_TILE})")
        if self.overlap < 0:
            raise DfosdError(f"--overlap {self.overlap} must not be negative")
        if 2 * self.overlap >= self.tile:
            # With 2*overlap >= tile the left and right ramps of one tile would meet, so
            # no pixel would get full weight from any tile, and stride would be <= tile/2.
            raise DfosdError(f"--overlap {self.overlap} must be smaller than half of --tile {self.tile}",
                             hint=f"use --overlap {self.tile // 4} (a quarter of the tile) or less")
        if self.batch < 1:
            raise DfosdError(f"--batch {self.batch} must be at least 1")
        if self.scale < 1:
            raise DfosdError(f"scale {self.scale} must be at least 1")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap


def _axis_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride`` pixels, the last one flush with the end.

    Flushing the last tile (rather than padding the image to a whole number of strides)
    keeps every tile on real pixels; it only means the last overlap can be wider than
    ``overlap``, which the weighted average handles. Axes shorter than a tile get one
    tile at 0 (the caller pads the image up to the tile).
    """
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def plan_tiles(height: int, width: int, cfg: TilingConfig) -> list[tuple[int, int]]:
    """LR (y, x) origins of the tiles covering a ``height x width`` image, row by row."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ys = _axis_origins(height, cfg.tile, cfg.stride)
    xs = _axis_origins(width, cfg.tile, cfg.stride)
    return [(y, x) for y in ys for x in xs]


def _ramp_1d(size: int, ramp: int) -> torch.Tensor:
    """1.0 in the middle, raised-cosine ramps of ``ramp`` samples at both ends.

    Samples sit at half-pixel positions, w(i) = 0.5 - 0.5*cos(pi*(i+0.5)/ramp), which
    makes every weight strictly positive (a pixel seen by a single tile, e.g. at the
    image border, is reproduced exactly) and makes two opposite ramps sum to exactly 1
    (w(i) + w(ramp-1-i) = 1), i.e. a true cross-fade where tiles overlap by ``overlap``.
    """
    w = torch.ones(size, dtype=torch.float64)
    if ramp > 0:
        i = torch.arange(ramp, dtype=torch.float64)
        up = 0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / ramp)
        w[:ramp] = up
        w[size - ramp:] = up.flip(0)
    return w


def blend_window(cfg: TilingConfig) -> torch.Tensor:
    """float32 [tile*scale, tile*scale] blend weights for one output tile (outer product of 1-D ramps)."""
    size = cfg.tile * cfg.scale
    w = _ramp_1d(size, cfg.overlap * cfg.scale)
    return torch.outer(w, w).to(torch.float32)


def _pad_to_tile(image: torch.Tensor, tile: int) -> torch.Tensor:
    """Pad [3,H,W] at the bottom/right up to at least tile x tile.

    Reflect padding continues the image's texture, which gives the model a more natural
    border than a smear of repeated pixels. One reflection can add at most size-1 pixels,
    so short axes are reflected repeatedly (10 -> 19 -> 32); only a 1-pixel axis, which
    has nothing to mirror, is replicated. The padded pixels are cropped away afterwards.
    """
    x = image.to(torch.float32)[None]  # padding modes other than constant want float
    for dim in (2, 3):
        while x.shape[dim] < tile:
            size = x.shape[dim]
            pad, mode = (min(tile - size, size - 1), "reflect") if size > 1 else (tile - 1, "replicate")
            x = F.pad(x, (0, 0, 0, pad) if dim == 2 else (0, pad, 0, 0), mode=mode)
    return x[0].to(torch.uint8)  # exact: the values are still the original integers


def check_step_output(out: torch.Tensor, n: int, cfg: TilingConfig) -> None:
    want = (n, 3, cfg.tile * cfg.scale, cfg.tile * cfg.scale)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != torch.uint8:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"tile step returned {got}, expected uint8 {want}")


# Receives finished output rows, top to bottom: (first row, uint8 [3, rows, W*scale]).
RowSink = Callable[[int, torch.Tensor], None]


class TiledImage:
    """One image cut into engine tiles, and the weighted average of their outputs, blended in bands.

    ``upscale_tiled`` in two halves, for callers that pool the tiles of several images
    into the engine's batches (the serving model): ``tiles(i, j)`` cuts LR tiles
    ``i..j-1`` of the plan, ``add(i, outputs)`` blends their outputs back (in plan order),
    ``result()`` returns the uint8 output.

    Memory: tiles come row by row, so once the first tile of the next tile row arrives,
    every output row above it is final (no later tile reaches up there). Only one band
    of ``tile*scale`` output rows is held in float32 (sum of weighted outputs, sum of
    weights); finished rows are rounded to uint8 at once and handed to ``sink``, or
    written into the uint8 output that ``result()`` returns. The float state is about
    16 bytes x tile*scale x output width; the whole-image float blend it replaces took
    16 bytes per output pixel (5.9 GB for a 3000x3000 input). Each pixel still gets
    exactly the same float32 sums, in the same order, rounded once: outputs are
    byte-identical to blending the whole image at once (and to the C++ runner).
    """

    def __init__(self, image: torch.Tensor, cfg: TilingConfig, window: torch.Tensor | None = None,
                 sink: RowSink | None = None):
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 [3,H,W] image, got {image.dtype} {tuple(image.shape)}")
        self.cfg = cfg
        _, self.height, self.width = image.shape
        t = cfg.tile
        self.padded = _pad_to_tile(image, t) if (self.height < t or self.width < t) else image
        self.origins = plan_tiles(*self.padded.shape[1:], cfg)
        self.window = blend_window(cfg) if window is None else window
        self.done = 0  # tiles blended so far
        self.sink = sink
        self._out: torch.Tensor | None = None  # uint8 output when there is no sink
        self._band_y = 0  # first output row of the float band
        self._acc = self._weight = None

    def __len__(self) -> int:
        return len(self.origins)

    def tiles(self, start: int, stop: int) -> torch.Tensor:
        """uint8 [n,3,tile,tile]: LR tiles start..stop-1 of the plan."""
        t = self.cfg.tile
        return torch.stack([self.padded[:, y:y + t, x:x + t] for y, x in self.origins[start:stop]])

    def add(self, start: int, outputs: torch.Tensor) -> None:
        """Blend the step's outputs for tiles start..start+len(outputs)-1 (the next ones in plan order)."""
        if start != self.done or start + len(outputs) > len(self):
            raise ValueError(f"tile outputs {start}..{start + len(outputs) - 1} do not follow tile {self.done - 1} "
                             f"of {len(self)} in plan order")
        check_step_output(outputs, len(outputs), self.cfg)
        s, t = self.cfg.scale, self.cfg.tile
        band = t * s
        for (y, x), tile_out in zip(self.origins[start:start + len(outputs)], outputs):
            oy, ox = y * s, x * s
            if self._acc is None:
                width = self.padded.shape[2] * s
                self._acc = torch.zeros(3, band, width, dtype=torch.float32)
                self._weight = torch.zeros(band, width, dtype=torch.float32)
                self._band_y = oy
            elif oy != self._band_y:  # a new tile row: the rows above it are final
                self._finish_rows(oy - self._band_y)
            self._acc[:, :, ox:ox + band] += tile_out.to(torch.float32) * self.window
            self._weight[:, ox:ox + band] += self.window
            self.done += 1
        if self.done == len(self):
            self._finish_rows(band, last=True)
            self._acc = self._weight = None

    def _finish_rows(self, n: int, last: bool = False) -> None:
        """Round the band's first ``n`` rows to uint8, hand them on, and move the band down by ``n``.

        All in place (no band-sized temporaries): the finished rows are divided, rounded
        and clamped where they lie -- the same float32 operations as on a whole image, so
        the same bytes -- and the rows still open are moved up in slices of at most ``n``
        rows, each of which never overlaps the rows it reads. ``last``: the final rows of the
        image; the band is dropped after them."""
        s = self.cfg.scale
        rows = min(n, self.height * s - self._band_y)  # rows past the image are padding
        acc, weight = self._acc, self._weight
        if rows > 0:
            done = acc[:, :rows].div_(weight[:rows]).round_().clamp_(0, 255)
            final = done[:, :, :self.width * s].to(torch.uint8)
            if self.sink is not None:
                self.sink(self._band_y, final)
            else:
                if self._out is None:
                    self._out = torch.empty(3, self.height * s, self.width * s, dtype=torch.uint8)
                self._out[:, self._band_y:self._band_y + rows] = final
        if last:  # the band is dropped next: nothing to move down or clear
            return
        band = acc.shape[1]
        for start in range(n, band, n):  # rows n.. move to 0..; each slice reads rows past what it writes
            stop = min(start + n, band)
            acc[:, start - n:stop - n] = acc[:, start:stop]
            weight[start - n:stop - n] = weight[start:stop]
        acc[:, max(band - n, 0):].zero_()
        weight[max(band - n, 0):].zero_()
        self._band_y += n

    def result(self) -> torch.Tensor:
        """uint8 [3,H*scale,W*scale], once every tile has been added (not with a ``sink``)."""
        if self.done != len(self):
            raise ValueError(f"{len(self) - self.done} of {len(self)} tiles have not been added")
        if self.sink is not None:
            raise ValueError("the output rows went to the sink")
        result, self._out = self._out, None
        return result


def upscale_tiled(image: torch.Tensor, step: StepFn, cfg: TilingConfig, *, sink: RowSink | None = None,
                  progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
    """uint8 [3,H,W] -> uint8 [3,H*scale,W*scale], calling ``step`` on batches of tiles.

    Outputs are accumulated as sum(window * tile_out) / sum(window) in float32 and rounded
    once. A one-tile image therefore comes back bit-exact: (w*v)/w rounds to v. With
    ``sink`` the output rows go there as they are finished, and nothing is returned
    (no output-sized tensor at all). ``progress(done, total)`` is called after each batch.
    """
    job = TiledImage(image, cfg, sink=sink)
    for i in range(0, len(job), cfg.batch):
        tiles = job.tiles(i, i + cfg.batch)
        out = step(tiles)
        check_step_output(out, len(tiles), cfg)
        job.add(i, out)
        if progress is not None:
            progress(job.done, len(job))
    return None if sink is not None else job.result()


def _seam_lines(length: int, cfg: TilingConfig) -> list[int]:
    """Output positions (boundaries between pixel p-1 and p) where tiling could leave a seam.

    For each pair of neighbouring tiles [a, a+tile) and [b, b+tile): where tile b starts
    (b), where tile a ends (a+tile), and the middle of their overlap -- the places a
    missing or broken cross-fade shows up (hard edges at tile borders, or a switch-over
    in the middle of the overlap).
    """
    starts = _axis_origins(max(length, cfg.tile), cfg.tile, cfg.stride)
    lines = set()
    for a, b in zip(starts, starts[1:]):
        for lr in (b, a + cfg.tile):
            lines.add(lr * cfg.scale)
        lines.add(round((b + a + cfg.tile) * cfg.scale / 2))
    out_len = length * cfg.scale
    # The second difference is defined at 1..out_len-2; a boundary p uses pixels p-1 and p.
    return sorted(p for p in lines if 2 <= p <= out_len - 2)


def _abs_second_diff(image: torch.Tensor, dim: int) -> torch.Tensor:
    """|I[k+1] - 2 I[k] + I[k-1]| along ``dim``; entry j belongs to position j+1."""
    x = image.to(torch.float64)
    n = x.shape[dim]
    return (x.narrow(dim, 2, n - 2) - 2 * x.narrow(dim, 1, n - 2) + x.narrow(dim, 0, n - 2)).abs()


def _seam_ratio(d2: torch.Tensor, lines: list[int], scale: int) -> tuple[float, float, int]:
    """Sum of |d2| next to seam ``lines`` along the last axis, the phase-matched expectation, and the count.

    ``d2`` is [..., n] with entry j at position j+1. The expectation for a seam position
    is the mean of all positions with the same phase (position mod ``scale``) -- an
    upscaler leaves a pattern of period ``scale`` in the second difference (seams sit
    on LR pixel boundaries, which have their own typical curvature), so comparing with
    every position regardless of phase would bias the score below 1 even without seams.
    """
    n = d2.shape[-1]
    per_pos = d2.reshape(-1, n).mean(0)  # mean |d2| at each position
    pos = torch.arange(n) + 1
    phase_mean = torch.stack([per_pos[pos % scale == k].mean() for k in range(scale)])
    idx = torch.tensor(sorted({p - 1 + k for p in lines for k in (-1, 0)}))  # pixels p-1 and p
    per_line = d2.numel() // n
    seam_sum = d2[..., idx].sum().item()
    expected_sum = phase_mean[(idx + 1) % scale].sum().item() * per_line
    return seam_sum, expected_sum, idx.numel() * per_line


def seam_score(image: torch.Tensor, cfg: TilingConfig, height: int, width: int) -> float:
    """How visible tile seams are in an upscaled [C,H*scale,W*scale] image of an LR ``height x width``.

    Measure: the mean absolute second difference *across* each potential seam (along x at
    seam columns, along y at seam rows; both pixels next to the boundary), divided by the
    same statistic over all columns/rows of the image at the same phase modulo ``scale``
    (see ``_seam_ratio``). A second difference ignores smooth gradients that continue
    across a boundary but responds strongly to a step, so:

    * ~1.0: pixels on the seam lines look like everywhere else -- no visible seam;
    * >> 1: a discontinuity lines up with the tile grid -- a seam.

    Seam lines are tile starts, tile ends and overlap centres of the plan ``upscale_tiled``
    uses (see ``_seam_lines``). It is a statistic: on a few seam lines of busy texture it
    scatters by tens of percent, so compare it with the same image upscaled whole, or use
    images with many seams. An image with a single tile has no seams: 1.0.
    """
    if image.dim() != 3 or tuple(image.shape[1:]) != (height * cfg.scale, width * cfg.scale):
        raise ValueError(f"expected [C,{height * cfg.scale},{width * cfg.scale}], got {tuple(image.shape)}")
    seam_sum = expected_sum = 0.0
    count = 0
    for dim, lines in ((2, _seam_lines(width, cfg)), (1, _seam_lines(height, cfg))):
        if lines:
            d2 = _abs_second_diff(image, dim).movedim(dim, -1)
            s, e, n = _seam_ratio(d2, lines, cfg.scale)
            seam_sum, expected_sum, count = seam_sum + s, expected_sum + e, count + n
    if count == 0:
        return 1.0
    if expected_sum == 0.0:
        return 1.0 if seam_sum == 0.0 else math.inf
    return seam_sum / expected_sum
