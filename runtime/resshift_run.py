"""Upscale whole images with ResShift's three ONNX parts: tiles, and one noise field per image.

The UNet part takes the noise ε as an input. For a whole image the field is drawn once — from
``--seed`` (``torch.Generator().manual_seed(seed)``, ``randn`` of [1, 3, H, W] for the image as tiled,
i.e. after the padding of images smaller than a tile) or read from ``--noise FILE.npy`` ([1, 3, H, W]
float32 for an H x W LR image: the VQ-f4 latent of the x4 image has the LR's size) — and every tile
gets its slice at its own origin, so overlapping tiles see the same ε where they overlap and the
blend averages two estimates of the same sample, not of two samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfosd.core.errors import DfosdError
from dfosd.core.resshift_parts import NOISE
from dfosd.core.vocab import DENOISED, LATENT, LR_IMAGE
from dfosd.export.resshift_export import resshift_record
from dfosd.runtime.tiling import TiledImage, TilingConfig, check_step_output

PARTS = ("encoder", "unet", "decoder")


def noise_field(seed: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """The whole image's ε from ``seed``: float32 [1, channels, height, width]."""
    return torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(int(seed)))


def read_noise(path: str | Path, height: int | None = None, width: int | None = None,
               channels: int = 3) -> np.ndarray:
    """``--noise FILE.npy``: float32 [1, channels, height, width] for an height x width LR image (the size
    unchecked when not given: ``dfosd-trt-run`` reads the file before the image, and checks it per image)."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DfosdError(f"--noise {path}: not a readable .npy file ({exc})",
                         hint=f"save a float32 array of shape [1, {channels}, H, W] with numpy.save") from None
    check_noise_array(arr, str(path), height, width, channels)
    return arr


def _pad_like_image(noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The field at the size the image was padded to (tiling pads images smaller than a tile): the
    padded pixels get a reflection of the field, like the image itself."""
    x = noise
    for dim, size in ((2, height), (3, width)):
        while x.shape[dim] < size:
            pad = min(size - x.shape[dim], max(x.shape[dim] - 1, 1))
            mode = "reflect" if x.shape[dim] > 1 else "replicate"
            x = torch.nn.functional.pad(x, (0, 0, 0, pad) if dim == 2 else (0, pad, 0, 0), mode=mode)
    return x




def check_noise_array(arr: np.ndarray, where: str, height: int | None = None, width: int | None = None,
                      channels: int = 3) -> None:
    """A noise field is float32 [1, channels, H, W] (H x W: the LR image's size, when known), finite."""
    shape = list(arr.shape)
    want = [1, channels, "H" if height is None else height, "W" if width is None else width]
    problems = []
    if arr.dtype != np.float32:
        problems.append(f"dtype {arr.dtype} (want float32)")
    if len(shape) != 4 or shape[:2] != [1, channels] or (height is not None and shape[2:] != [height, width]):
        size = "" if height is None else f" for this {width}x{height} image"
        problems.append(f"shape {shape} (want {want}{size})".replace("'", ""))
    if not problems and not np.isfinite(arr).all():
        problems.append("it holds NaN or Inf")
    if problems:
        raise DfosdError(f"--noise {where}: " + "; ".join(problems),
                         hint=f"one float32 [1, {channels}, H, W] field per image, H x W the LR size "
                              "(numpy.save of such an array)")


OPENVINO = ("openvino", "openvino-bf16")


class _OpenVinoPart:
    """A compiled part called like an ONNX Runtime session (``run(None, feeds)`` -> [output])."""

    def __init__(self, compiled):
        self.compiled = compiled

    def run(self, names, feeds):
        return [next(iter(self.compiled(feeds).values()))]


def _openvino_sessions(folder: Path, name: str):
    """OpenVINO on the CPU with the SD backend's own settings (threads, f32 or bf16 hint); compiled
    at each run (no blob cache for these exports yet)."""
    from dfosd.engines.base import select_backend

    cls, _ = select_backend(name)  # refuses openvino-bf16 where the CPU has no native bf16, with the reason
    backend = cls()
    return backend, {p: _OpenVinoPart(backend.core.compile_model(str(folder / f"{p}.onnx"), "CPU",
                                                                 backend.compile_config())) for p in PARTS}


class ResShiftRunner:
    """The three ONNX parts of a ResShift one-step export on ONNX Runtime or OpenVINO (CPU)."""

    batch = 1  # the export's parts take one tile: the noise slice differs per tile
    scale = 4
    plan = None  # one backend for all parts, nothing measured

    def __init__(self, folder: str | Path, *, tile: int, overlap: int = 0, precision: str = "fp32",
                 backend: str = "onnxruntime"):
        folder = Path(folder)
        missing = [p for p in PARTS if not (folder / f"{p}.onnx").is_file()]
        if missing:
            raise DfosdError(f"{folder}: no {', '.join(p + '.onnx' for p in missing)} (a ResShift export has "
                             f"{', '.join(p + '.onnx' for p in PARTS)})")
        if backend in OPENVINO:
            self.backend, self.sessions = _openvino_sessions(folder, backend)
        else:
            import onnxruntime as ort

            from dfosd.engines.onnxruntime_backend import OnnxRuntimeBackend

            # the SD backend's own session settings (threads, no spinning); no optimized-graph cache here
            self.backend = OnnxRuntimeBackend("cpu")
            self.sessions = {p: ort.InferenceSession(str(folder / f"{p}.onnx"), self.backend.session_options(),
                                                     providers=["CPUExecutionProvider"]) for p in PARTS}
        self.cfg = TilingConfig(tile=tile, overlap=overlap, batch=1, scale=4)
        self.tile, self.precision = tile, precision

    @classmethod
    def from_export(cls, folder: str | Path, *, overlap: int | None = None, backend: str = "onnxruntime"):
        """A folder ``dfosd-export --vq`` wrote: its record gives the tile; the parts are checked against it."""
        from dfosd.core.manifest import changed_files
        from dfosd.export.resshift_export import RECORD_NAME

        folder = Path(folder)
        record = resshift_record(folder)
        if record is None:
            raise DfosdError(f"{folder}: no {RECORD_NAME} (or a dfosd manifest.json: an SD-family export)",
                             hint="export with dfosd-export --ckpt UNET.pth --vq autoencoder_vq_f4.pth --out DIR")
        changed = changed_files(folder, record["files"])
        if changed:
            raise DfosdError(f"{folder}: {', '.join(changed)} changed since the export", hint="export again")
        tile = int(record["tile"])
        return cls(folder, tile=tile, overlap=tile // 8 if overlap is None else overlap,
                   precision=str(record.get("precision", "fp32")), backend=backend)

    def _tile(self, lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        from dfosd.runtime.step import NonFiniteOutput

        latent = self.sessions["encoder"].run(None, {LR_IMAGE: lr})[0]
        den = self.sessions["unet"].run(None, {LATENT: latent, NOISE: noise, LR_IMAGE: lr})[0]
        for name, value in (("encoder", latent), ("unet", den)):  # the decoder's uint8 cast would hide NaN
            if not np.isfinite(value).all():
                fix = ("re-export with --precision fp32 (an fp16 overflow)" if self.precision != "fp32"
                       else "check the checkpoint: the weights make this part overflow")
                raise NonFiniteOutput(f"the {name} produced NaN or Inf; the output would be wrong, so it is not "
                                      "written", hint=fix)
        return self.sessions["decoder"].run(None, {DENOISED: den})[0]

    def __call__(self, image: torch.Tensor, *, seed: int | None = None, noise: torch.Tensor | None = None,
                 sink=None, progress=None) -> torch.Tensor | None:
        """uint8 [3, H, W] -> uint8 [3, 4H, 4W]; ε from ``noise`` ([1, 3, H, W]) or drawn from ``seed``.
        With ``sink`` the output rows go there as they are finished (``TiledImage``) and None is returned;
        ``progress(done, total)`` after each tile."""
        if (seed is None) == (noise is None):
            raise DfosdError("give the noise field either as a seed or as an array, not both or neither")
        job = TiledImage(image, self.cfg, sink=sink)
        ph, pw = job.padded.shape[1:]
        if noise is not None:
            if tuple(noise.shape) != (1, 3, job.height, job.width):
                raise DfosdError(f"noise field of shape {list(noise.shape)} for a {job.width}x{job.height} image",
                                 hint=f"give [1, 3, {job.height}, {job.width}]")
            field = _pad_like_image(noise.float(), ph, pw)
        else:
            field = noise_field(seed, ph, pw)
        t = self.cfg.tile
        for i, (y, x) in enumerate(job.origins):
            lr = job.tiles(i, i + 1)
            out = torch.from_numpy(self._tile(lr.numpy(), field[:, :, y:y + t, x:x + t].contiguous().numpy()))
            check_step_output(out, 1, self.cfg)
            job.add(i, out)
            if progress is not None:
                progress(job.done, len(job))
        return None if sink is not None else job.result()


def resshift_upscaler(export_dir, backend: str, batch: int | None, tile: int | None, overlap: int | None,
                      say, *, seed: int | None = None, noise: np.ndarray | None = None):
    """``batch.local_upscaler`` for a ResShift export: (runner, tiling, upscale(rgb, sink, progress)).

    Each image gets its own field: drawn from ``seed`` (the same seed for every image, so an image's
    output does not depend on the others in the run), or ``noise`` (one image's field, its shape checked
    against the image: a mismatch fails that image with the shape it wants)."""
    from dfosd.runtime.batch import check_tile

    if backend not in ("auto", "onnxruntime", *OPENVINO):
        raise DfosdError(f"--backend {backend}: a ResShift-backbone export runs on ONNX Runtime or OpenVINO (CPU) "
                         "for now, one backend for all parts", hint="omit --backend, or pass --backend onnxruntime")
    if batch not in (None, 1):
        raise DfosdError(f"--batch {batch}: a ResShift export takes one tile per call (each tile its own noise "
                         "slice)", hint="omit --batch")
    record = resshift_record(export_dir)
    if record is None:
        raise DfosdError(f"{export_dir}: not a ResShift export")
    try:
        check_tile(tile, int(record["tile"]))
    except DfosdError as exc:
        rule = record.get("tile_multiple")
        if not rule or tile % int(rule) == 0:
            raise
        raise DfosdError(exc.message + f"; a ResShift tile must also be a multiple of {rule} (Swin window "
                         f"{record.get('window_size')} x the UNet's downsamplings: the windows and their shift mask "
                         "are constants of the exported size)", hint=exc.hint) from None
    runner = ResShiftRunner.from_export(export_dir, overlap=int(record["tile"]) // 4 if overlap is None else overlap,
                                        backend="onnxruntime" if backend == "auto" else backend)
    say(f"{record.get('family')} (ResShift backbone, {runner.precision}) on {runner.backend.describe()}; noise: "
        + (f"seed {seed}" if noise is None else "the --noise field"))

    def upscale(rgb, sink, progress):
        if noise is None:
            return runner(rgb, seed=seed, sink=sink, progress=progress)
        check_noise_array(noise, "field", rgb.shape[1], rgb.shape[2])
        return runner(rgb, noise=torch.from_numpy(noise), sink=sink, progress=progress)
    return runner, runner.cfg, upscale
