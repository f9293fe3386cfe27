"""Calibration data: LR photos from a folder, cut into tiles of the export's tile size.

The runtime feeds the encoder uint8 LR tiles of exactly this size, so calibration does
the same: every photo is read as RGB, cut into non-overlapping ``tile x tile`` crops, and
``count`` of them are taken round-robin over the photos (one seeded random crop per photo
per round), so a few large photos cannot crowd out the others. Same folder, tile size and
count -> same tiles.

The folder's identity for the export's build key and manifest is a SHA-256 over the
sorted relative names and contents of every image in it (the "file list hash").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfosd.core.errors import DfosdError
from dfosd.core.manifest import sha256_file

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TILE_SEED = 0


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` or below it, sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DfosdError(f"calibration folder {folder} does not exist",
                         hint="pass --calib-data DIR: a folder of LR photos like the ones you will upscale")
    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise DfosdError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                         hint="put LR photos (PNG/JPEG) in it; calibration needs the product's real inputs")
    return files


def file_list_sha256(folder: str | Path, files: list[Path] | None = None) -> str:
    """SHA-256 over the sorted relative names and content hashes of the calibration images."""
    folder = Path(folder)
    files = list_images(folder) if files is None else files
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CalibrationTiles:
    tiles: "torch.Tensor"  # uint8 [N, 3, tile, tile]
    folder: Path
    files: tuple[str, ...]  # every image in the folder (relative names)
    files_used: int
    sha256: str

    def record(self) -> dict[str, Any]:
        """What the manifest keeps about the data (not the pixels)."""
        return {"data": str(self.folder.resolve()), "files": len(self.files), "files_used": self.files_used,
                "file_list_sha256": self.sha256, "tiles": int(self.tiles.shape[0]),
                "tile": int(self.tiles.shape[-1])}


def _read_rgb(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DfosdError(f"calibration image {path} cannot be read: {exc}",
                         hint="remove it from the calibration folder or re-save it as PNG/JPEG") from exc


def load_tiles(folder: str | Path, tile: int, count: int, *, seed: int = TILE_SEED) -> CalibrationTiles:
    """``count`` uint8 LR tiles (fewer if the photos hold fewer) from the images in ``folder``."""
    import numpy as np
    import torch

    if count < 1:
        raise DfosdError(f"--calib-count {count}: must be >= 1")
    folder = Path(folder)
    files = list_images(folder)
    rng = np.random.default_rng(seed)
    images, grids = [], []
    for p in files:
        img = _read_rgb(p)
        h, w = img.shape[:2]
        cells = [(y, x) for y in range(0, h - tile + 1, tile) for x in range(0, w - tile + 1, tile)]
        if cells:
            images.append(img)
            grids.append([cells[i] for i in rng.permutation(len(cells))])
    if not images:
        raise DfosdError(f"no calibration image in {folder} is at least {tile}x{tile} pixels (the LR tile size)",
                         hint="use larger LR photos, or export with a smaller --tile")
    picked = []
    for r in range(max(len(g) for g in grids)):
        for img, grid in zip(images, grids):
            if r < len(grid) and len(picked) < count:
                y, x = grid[r]
                picked.append(img[y:y + tile, x:x + tile])
        if len(picked) >= count:
            break
    tiles = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).contiguous()
    return CalibrationTiles(tiles, folder, tuple(p.relative_to(folder).as_posix() for p in files),
                            files_used=min(len(images), len(picked)), sha256=file_list_sha256(folder, files))


# Calibration photos (scikit-image, no download): the 8-bit bench rows and the fp16 range pass
# (export/fp16_islands.py) use them by default; none is one of bench.run.BENCH_PHOTOS, the
# held-out photos that verify, parity and bench judge on.
CALIB_PHOTOS = ("immunohistochemistry", "hubble_deep_field", "retina", "coins", "page")


def write_calibration_photos(folder: Path, lr_side: int) -> Path:
    """The ``CALIB_PHOTOS`` at about LR size (PNG), short side two LR tiles (>= 4 tiles each)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in CALIB_PHOTOS:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = 2 * lr_side / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        target = folder / f"{name}.png"
        if not target.exists():
            tmp = folder / f".{name}.tmp.png"
            img.save(tmp)
            tmp.replace(target)
    return folder


def range_tiles(folder: str | Path | None, tile: int, count: int):
    """uint8 LR tiles for the fp16 range pass: from ``folder`` (``--calib-data``), or from the
    scikit-image ``CALIB_PHOTOS`` when None."""
    import tempfile

    if folder is not None:
        return load_tiles(folder, tile, count).tiles
    with tempfile.TemporaryDirectory(prefix="dfosd-range-photos.") as tmp:
        return load_tiles(write_calibration_photos(Path(tmp), tile), tile, count).tiles
