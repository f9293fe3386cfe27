"""What the Python-backend model does with its requests, without Triton: check, tile, upscale.

Kept apart from ``python_model`` so the request handling (layouts, limits, error
messages) is plain Python that tests can call in-process; the Triton glue only converts
tensors and wraps errors into responses.

A request holds ``n >= 1`` images of one size, ``[n,H,W,3]`` (``layout`` HWC, the
default) or ``[n,3,H,W]`` (CHW), uint8; the reply has the same layout, x``scale``. The
tiles of all the requests handed over together are pooled into the engine's tile batches.
Each finished image gets the colour fix the request names (parameter ``color_fix``), by
default the export's family's (as ``dfosd-trt-run`` does): the same function of the
pixels as the local run (``runtime.color_fix.apply_color_fix``), so the bytes are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from dfosd.core.errors import DfosdError

LAYOUTS = ("HWC", "CHW")


def json_text(value) -> str:
    return {True: "true", False: "false"}.get(value, repr(value)) if isinstance(value, bool) else repr(value)


class RequestError(DfosdError):
    """A request this model cannot serve (its client gets the message; the server goes on)."""


@dataclass(frozen=True)
class ServiceLimits:
    max_pixels: int  # LR pixels per image (H*W)


def parse_layout(value) -> str:
    if value is not None and not isinstance(value, str):
        raise RequestError(f"parameter layout={json_text(value)}: use HWC or CHW (a string)")
    layout = "HWC" if value in (None, "") else value.upper()
    if layout not in LAYOUTS:
        raise RequestError(f"parameter layout={value!r}: use HWC or CHW")
    return layout


def parse_parameters(raw) -> dict:
    """A request's parameters (Triton hands them over as a JSON object in text): anything that is not
    a JSON object is the client's fault (400), never an internal error."""
    import json

    if raw in (None, ""):
        return {}
    try:
        params = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"the request parameters are not valid JSON ({exc})") from None
    if not isinstance(params, dict):
        raise RequestError(f"the request parameters must be a JSON object, got {type(params).__name__}")
    return params


def parse_color_fix(value, default: str) -> str:
    from dfosd.core.vocab import COLOR_FIXES

    if value in (None, ""):
        return default
    if not isinstance(value, str) or value not in COLOR_FIXES:
        raise RequestError(f"parameter color_fix={json_text(value)}: use one of {', '.join(COLOR_FIXES)}")
    return value


def parse_overlap(value, default: int) -> int:
    if value in (None, ""):
        return default
    if isinstance(value, bool):  # JSON true would pass int(); it is not a pixel count
        raise RequestError(f"parameter overlap={json_text(value)} is not an integer")
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
    """dfosd's runtime behind a request interface: OneStepRunner + the tiling of upscale_tiled.

    ``upscale_many`` serves the requests Triton hands over together (a dynamic batch) and
    pools their tiles into full tile batches; ``upscale`` serves one request.
    """

    def __init__(self, runner, overlap: int, limits: ServiceLimits, color_fix: str = "none"):
        from dfosd.runtime.tiling import TilingConfig

        self.runner = runner
        self.limits = limits
        self.color_fix = parse_color_fix(color_fix, "none")  # the default: the export family's
        self.default_tiling = TilingConfig(tile=runner.tile, overlap=overlap, batch=runner.batch, scale=runner.scale)
        self._windows = {}  # overlap -> blend window

    @classmethod
    def from_export(cls, export_dir, *, backend: str = "auto", tile_batch: int | None = None,
                    overlap: int | None = None, max_pixels: int, say=None) -> "UpscaleService":
        from dfosd.runtime.step import OneStepRunner

        runner = OneStepRunner(export_dir, backend=backend, batch=tile_batch, say=say or (lambda m: None))
        return cls(runner, runner.tile // 4 if overlap is None else overlap, ServiceLimits(max_pixels),
                   runner.export.color_fix)

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

    def upscale(self, images, *, layout: str = "HWC", overlap: int | None = None, color_fix: str | None = None):
        """uint8 torch tensor [n,H,W,3] / [n,3,H,W] -> the same layout x scale (contiguous, CPU)."""
        result = self.upscale_many([UpscaleRequest(images, layout, overlap, color_fix)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _prepare(self, request: "UpscaleRequest"):
        """(layout, [TiledImage per image], colour fix) of a request, or RequestError."""
        import torch

        from dfosd.runtime.tiling import TiledImage, blend_window

        layout = parse_layout(request.layout)
        color_fix = parse_color_fix(request.color_fix, self.color_fix)
        images = request.images
        self.check(tuple(images.shape), str(images.dtype).replace("torch.", ""), layout)
        cfg = self.tiling(self.default_tiling.overlap if request.overlap is None else request.overlap)
        if cfg.overlap not in self._windows:
            self._windows[cfg.overlap] = blend_window(cfg)
        # Each job owns its pixels, copied once after the checks: the tiles may run after the
        # caller's buffer is gone (the scheduler answers later; Triton reuses a request's memory).
        jobs = [TiledImage((image.permute(2, 0, 1) if layout == "HWC" else image).clone(
                    memory_format=torch.contiguous_format), cfg, self._windows[cfg.overlap]) for image in images]
        return layout, jobs, color_fix

    def finish(self, job, color_fix: str):
        """An image's uint8 output [3,H*s,W*s] once its last tile is blended, colour-fixed as the local
        run does (``runtime.batch.process_image``): towards the image's own LR pixels."""
        from dfosd.runtime.color_fix import apply_color_fix

        sr = job.result()
        if color_fix == "none":
            return sr
        return apply_color_fix(sr, job.padded[:, :job.height, :job.width], color_fix, self.scale)

    def run_tiles(self, picks):
        """The step on tiles ``picks`` [(TiledImage, tile index), ...] as one tile batch, checked."""
        import torch

        from dfosd.runtime.tiling import check_step_output

        out = self.runner(torch.cat([job.tiles(i, i + 1) for job, i in picks]))
        check_step_output(out, len(picks), self.default_tiling)
        return out

    @staticmethod
    def assemble(layout: str, srs: list):
        """A request's output: its images' SR results stacked, in the request's layout."""
        import torch

        return torch.stack([sr.permute(1, 2, 0) if layout == "HWC" else sr for sr in srs]).contiguous()

    def upscale_many(self, requests) -> list:
        """Serve several requests at once, pooling their tiles into the runner's tile batches.

        Every image of every valid request is cut into tiles (``TiledImage``: the plan and
        blend of ``upscale_tiled``); the tiles go through the runner in order, ``runner.batch``
        at a time across image and request boundaries, and each image is blended back as its
        last tile comes out. The runner computes each tile on its own, so the outputs are
        those of ``upscale_tiled`` per image. Returns, per request, the output tensor or the
        exception that failed it: a bad request (RequestError) or a runner failure in one of
        its batches fails that request only.
        """
        results: list = [None] * len(requests)
        prepared = {}  # request index -> (layout, jobs, colour fix)
        for r, request in enumerate(requests):
            try:
                prepared[r] = self._prepare(request)
            except Exception as exc:  # noqa: BLE001 - answered in this request's slot
                results[r] = exc
        # Every tile of the valid requests, in order: (request index, image job, tile index).
        queue = [(r, job, i) for r, (_, jobs, _) in prepared.items() for job in jobs for i in range(len(job))]
        outs: dict[int, list] = {r: [] for r in prepared}
        pos, batch = 0, self.runner.batch
        while pos < len(queue):
            chunk = []
            while pos < len(queue) and len(chunk) < batch:
                if results[queue[pos][0]] is None:  # skip the tiles of a request that failed meanwhile
                    chunk.append(queue[pos])
                pos += 1
            if not chunk:
                break
            try:
                out = self.run_tiles([(job, i) for _, job, i in chunk])
                for k, (r, job, i) in enumerate(chunk):
                    job.add(i, out[k:k + 1])
                    if job.done == len(job):
                        outs[r].append(self.finish(job, prepared[r][2]))
            except Exception as exc:  # noqa: BLE001 - fails the requests with tiles in this batch
                for r, _, _ in chunk:
                    if results[r] is None:
                        results[r] = exc
        for r, (layout, _, _) in prepared.items():
            if results[r] is None:
                results[r] = self.assemble(layout, outs[r])
        return results


@dataclass
class UpscaleRequest:
    """One request's input: uint8 [n,H,W,3] (HWC) or [n,3,H,W] (CHW), and its parameters."""

    images: object  # torch.Tensor
    layout: str | None = "HWC"
    overlap: int | None = None
    color_fix: str | None = None  # None: the service's default (the export family's)
