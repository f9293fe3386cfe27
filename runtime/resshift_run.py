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
from dfosd.runtime.tiling import TiledImage, TilingConfig, check_step_output

PARTS = ("encoder", "unet", "decoder")


def noise_field(seed: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """The whole image's ε from ``seed``: float32 [1, channels, height, width]."""
    return torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(int(seed)))


def read_noise(path: str | Path, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """``--noise FILE.npy``: float32 [1, channels, height, width] for an height x width LR image."""
    path = Path(path)
    want = (1, channels, height, width)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DfosdError(f"--noise {path}: not a readable .npy file ({exc})",
                         hint=f"save a float32 array of shape {list(want)} with numpy.save") from None
    problems = []
    if arr.dtype != np.float32:
        problems.append(f"dtype {arr.dtype} (want float32)")
    if tuple(arr.shape) != want:
        problems.append(f"shape {list(arr.shape)} (want {list(want)} for this {width}x{height} image)")
    if not problems and not np.isfinite(arr).all():
        problems.append("it holds NaN or Inf")
    if problems:
        raise DfosdError(f"--noise {path}: " + "; ".join(problems),
                         hint=f"one float32 [1, {channels}, H, W] field per image, H x W the LR size")
    return torch.from_numpy(arr.copy())


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


class ResShiftRunner:
    """The three ONNX parts of a ResShift one-step export on ONNX Runtime (CPU unless given providers)."""

    def __init__(self, folder: str | Path, *, tile: int, overlap: int = 0, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        folder = Path(folder)
        missing = [p for p in PARTS if not (folder / f"{p}.onnx").is_file()]
        if missing:
            raise DfosdError(f"{folder}: no {', '.join(p + '.onnx' for p in missing)} (a ResShift export has "
                             f"{', '.join(p + '.onnx' for p in PARTS)})")
        self.sessions = {p: ort.InferenceSession(str(folder / f"{p}.onnx"), providers=list(providers)) for p in PARTS}
        self.cfg = TilingConfig(tile=tile, overlap=overlap, batch=1, scale=4)

    @classmethod
    def from_export(cls, folder: str | Path, *, overlap: int | None = None, providers=("CPUExecutionProvider",)):
        """A folder ``dfosd-export --vq`` wrote: its record gives the tile; the parts are checked against it."""
        import json

        from dfosd.core.manifest import changed_files
        from dfosd.export.resshift_export import RECORD_KIND, RECORD_NAME

        folder = Path(folder)
        try:
            record = json.loads((folder / RECORD_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise DfosdError(f"{folder}: no readable {RECORD_NAME} ({exc})",
                             hint="export with dfosd-export --ckpt UNET.pth --vq autoencoder_vq_f4.pth --out DIR") from None
        if not isinstance(record, dict) or record.get("kind") != RECORD_KIND or not isinstance(record.get("files"), dict):
            raise DfosdError(f"{folder / RECORD_NAME}: not a ResShift export record", hint="export again")
        changed = changed_files(folder, record["files"])
        if changed:
            raise DfosdError(f"{folder}: {', '.join(changed)} changed since the export", hint="export again")
        tile = int(record["tile"])
        return cls(folder, tile=tile, overlap=tile // 8 if overlap is None else overlap, providers=providers)

    def _tile(self, lr: np.ndarray, noise: np.ndarray) -> np.ndarray:
        latent = self.sessions["encoder"].run(None, {LR_IMAGE: lr})[0]
        den = self.sessions["unet"].run(None, {LATENT: latent, NOISE: noise, LR_IMAGE: lr})[0]
        return self.sessions["decoder"].run(None, {DENOISED: den})[0]

    def __call__(self, image: torch.Tensor, *, seed: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [3, H, W] -> uint8 [3, 4H, 4W]; ε from ``noise`` ([1, 3, H, W]) or drawn from ``seed``."""
        if (seed is None) == (noise is None):
            raise DfosdError("give the noise field either as a seed or as an array, not both or neither")
        job = TiledImage(image, self.cfg)
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
        return job.result()
