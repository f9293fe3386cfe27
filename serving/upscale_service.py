"""What the Python-backend model does per request, without Triton: check, tile, upscale.

Kept apart from ``python_model`` so the request handling (layouts, limits, error
messages) is plain Python that tests can call in-process; the Triton glue only converts
tensors and wraps errors into responses.

A request holds ``n >= 1`` images of one size, ``[n,H,W,3]`` (``layout`` HWC, the
default) or ``[n,3,H,W]`` (CHW), uint8; the reply has the same layout, x``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dfosd.core.errors import DfosdError

LAYOUTS = ("HWC", "CHW")


class RequestError(DfosdError):
    """A request this model cannot serve (its client gets the message; the server goes on)."""


@dataclass(frozen=True)
class ServiceLimits:
    max_pixels: int  # LR pixels per image (H*W)


def parse_layout(value) -> str:
    layout = "HWC" if value in (None, "") else str(value).upper()
    if layout not in LAYOUTS:
        raise RequestError(f"parameter layout={value!r}: use HWC or CHW")
    return layout


def parse_overlap(value, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        overlap = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"parameter overlap={value!r} is not an integer") from None
    if isinstance(value, float) and value != overlap:
        raise RequestError(f"parameter overlap={value!r} is not an integer")
    return overlap


def image_size(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """(H, W) of a request tensor ``[n, ...]``, or RequestError saying what is wrong with it."""
    if len(shape) != 4:
        raise RequestError(f"lr_image must be [n,H,W,3] (HWC) or [n,3,H,W] (CHW), got shape {list(shape)}")
    n = shape[0]
    h, w, c = (shape[1], shape[2], shape[3]) if layout == "HWC" else (shape[2], shape[3], shape[1])
    if c != 3:
        other = "CHW" if layout == "HWC" else "HWC"
        looks_other = (shape[1] == 3) if layout == "HWC" else (shape[3] == 3)
        tip = f" (it looks like {other}: send parameter layout={other})" if looks_other else ""
        raise RequestError(f"lr_image {list(shape)} as {layout} has {c} channels; RGB (3) is needed{tip}")
    if n < 1 or h < 1 or w < 1:
        raise RequestError(f"lr_image {list(shape)} is empty")
    return h, w


class UpscaleService:
    """dfosd's runtime behind a request interface: OneStepRunner + upscale_tiled."""

    def __init__(self, runner, overlap: int, limits: ServiceLimits):
        from dfosd.runtime.tiling import TilingConfig

        self.runner = runner
        self.limits = limits
        self.default_tiling = TilingConfig(tile=runner.tile, overlap=overlap, batch=runner.batch, scale=runner.scale)

    @classmethod
    def from_export(cls, export_dir, *, backend: str = "auto", tile_batch: int | None = None,
                    overlap: int | None = None, max_pixels: int, say=None) -> "UpscaleService":
        from dfosd.runtime.step import OneStepRunner

        runner = OneStepRunner(export_dir, backend=backend, batch=tile_batch, say=say or (lambda m: None))
        return cls(runner, runner.tile // 4 if overlap is None else overlap, ServiceLimits(max_pixels))

    @property
    def scale(self) -> int:
        return self.default_tiling.scale

    def tiling(self, overlap: int):
        from dataclasses import replace

        if overlap == self.default_tiling.overlap:
            return self.default_tiling
        try:
            return replace(self.default_tiling, overlap=overlap)
        except DfosdError as exc:  # TilingConfig names the command-line option; say it as a parameter
            raise RequestError(exc.message.replace("--overlap", "parameter overlap").replace("--tile", "tile"))

    def check(self, shape: tuple[int, ...], dtype: str, layout: str) -> tuple[int, int]:
        if dtype != "uint8":
            raise RequestError(f"lr_image must be uint8, got {dtype}")
        h, w = image_size(tuple(int(d) for d in shape), layout)
        if h * w > self.limits.max_pixels:
            raise RequestError(f"lr_image {w}x{h} has {h * w} pixels, more than this server's limit of "
                               f"{self.limits.max_pixels} per image", hint="send a smaller image or tile it")
        return h, w

    def upscale(self, images, *, layout: str = "HWC", overlap: int | None = None):
        """uint8 torch tensor [n,H,W,3] / [n,3,H,W] -> the same layout x scale (contiguous, CPU)."""
        import torch

        from dfosd.runtime.tiling import upscale_tiled

        layout = parse_layout(layout)
        self.check(tuple(images.shape), str(images.dtype).replace("torch.", ""), layout)
        cfg = self.tiling(self.default_tiling.overlap if overlap is None else overlap)
        outs = []
        for image in images:
            chw = image.permute(2, 0, 1) if layout == "HWC" else image
            sr = upscale_tiled(chw.contiguous(), self.runner, cfg)
            outs.append(sr.permute(1, 2, 0) if layout == "HWC" else sr)
        return torch.stack(outs).contiguous()
