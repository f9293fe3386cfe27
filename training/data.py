"""HR training images: a folder dataset, a seeded resumable sampler, and LR/HR pair dumps.

The sampler decides everything random about a batch (which images, which crops, which flips)
from ``(seed, step)`` alone, so a run resumed at step N sees exactly the batches an
uninterrupted run would have seen. It hands the dataset ``(index, item_seed)`` pairs; use it
as a ``batch_sampler`` of a ``torch.utils.data.DataLoader`` (any number of workers).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from dfosd.core.errors import DfosdError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms, unlike hash())."""
    h = hashlib.blake2b(b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def make_generator(seed: int, *parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded from (seed, *parts): e.g. (seed, step) for the
    degradation of batch ``step``, so a resumed run degrades its batches exactly as before."""
    return torch.Generator(device=device).manual_seed(_mix(seed, *parts))


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 HxWx3 (16-bit and float grays are rescaled, alpha dropped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(np.round(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


class HRImageFolder(torch.utils.data.Dataset):
    """Every image under ``root`` (recursive), served as random ``crop`` x ``crop`` float crops in [0,1].

    Items are addressed by ``(index, item_seed)``: the seed fixes the crop position and the flip.
    A plain integer index draws a fresh seed from torch's global RNG. Images whose short side is
    below ``crop`` are first upscaled (bicubic) so the short side equals ``crop``.

    Files that PIL cannot open are skipped when the folder is scanned; files that open but fail
    to decode (truncated) are skipped when first read, and the item is served from the next good
    image. Each bad file is logged once, as a warning.
    """

    def __init__(self, root: str | Path, crop: int = 512, *, flip: bool = True,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = Path(root)
        self.crop = int(crop)
        self.flip = bool(flip)
        if self.crop < 1:
            raise DfosdError(f"crop size {crop} must be >= 1")
        if not self.root.is_dir():
            raise DfosdError(f"training image folder {self.root} does not exist or is not a folder",
                             hint="pass --data DIR with a folder of HR images (png/jpg/webp/bmp/tif)")
        exts = tuple(e.lower() for e in extensions)
        candidates = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        self.files: list[Path] = []
        self.bad: set[Path] = set()
        for p in candidates:
            try:
                with Image.open(p) as im:
                    im.size  # header parsed
                self.files.append(p)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped
                self._mark_bad(p, e)
        if not self.files:
            found = f"{len(candidates)} image file(s), none readable" if candidates else "no image files"
            raise DfosdError(f"training image folder {self.root} has {found} "
                             f"(looked for {', '.join(exts)}, recursively)",
                             hint="point --data at a folder of HR photos, e.g. DIV2K/LSDIR/FFHQ crops")

    def _mark_bad(self, path: Path, err: Exception) -> None:
        if path not in self.bad:
            self.bad.add(path)
            log.warning("skipping unreadable training image %s: %s", path, err)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        """Decoded uint8 HxWx3 of file ``index``; raises OSError/ValueError if it does not decode."""
        with Image.open(self.files[index]) as im:
            im.load()
            return _to_rgb_array(ImageOps.exif_transpose(im))

    def _load_good(self, index: int) -> np.ndarray:
        n = len(self.files)
        for k in range(n):
            path = self.files[(index + k) % n]
            if path in self.bad:
                continue
            try:
                return self.load((index + k) % n)
            except Exception as e:  # noqa: BLE001
                self._mark_bad(path, e)
        raise DfosdError(f"none of the {n} images in {self.root} could be decoded",
                         hint="check the files (truncated downloads?) or point --data at another folder")

    def crop_array(self, arr: np.ndarray, item_seed: int) -> torch.Tensor:
        """uint8 HxWx3 -> float [3,crop,crop] in [0,1]: upscale if small, random crop, random flip."""
        c = self.crop
        h, w = arr.shape[:2]
        if min(h, w) < c:
            s = c / min(h, w)
            nw, nh = max(c, round(w * s)), max(c, round(h * s))
            arr = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BICUBIC))
            h, w = nh, nw
        g = np.random.default_rng(item_seed)
        top = int(g.integers(0, h - c + 1))
        left = int(g.integers(0, w - c + 1))
        patch = arr[top:top + c, left:left + c]
        if self.flip and g.random() < 0.5:
            patch = patch[:, ::-1]
        return torch.from_numpy(np.array(patch, copy=True)).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, item) -> torch.Tensor:
        if isinstance(item, (tuple, list)):
            index, item_seed = int(item[0]), int(item[1])
        else:
            index, item_seed = int(item), int(torch.randint(0, 2**62, ()).item())
        return self.crop_array(self._load_good(index), item_seed)


class ResumableSampler(torch.utils.data.Sampler):
    """Batches of ``(index, item_seed)`` fixed by ``(seed, step)``: epoch-wise permutations.

    Sample number p = step * batch_size + j (j < batch_size) is image ``perm_e[p % n]`` of epoch
    e = p // n, where perm_e is a permutation seeded by (seed, e), and gets item seed
    mix(seed, p). Iteration starts at ``start_step`` and runs to ``num_steps`` (forever if None).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, *, start_step: int = 0,
                 num_steps: int | None = None):
        if num_items < 1 or batch_size < 1 or start_step < 0:
            raise ValueError(f"bad sampler arguments: num_items={num_items} batch_size={batch_size} "
                             f"start_step={start_step}")
        self.n = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.num_steps = num_steps
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED))
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The (index, item_seed) pairs of batch ``step``."""
        out = []
        for j in range(self.batch_size):
            p = step * self.batch_size + j
            out.append((self._permutation(p // self.n)[p % self.n], _mix(self.seed, p)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless ResumableSampler has no length")
        return max(0, self.num_steps - self.start_step)


def dump_pairs(dataset: HRImageFolder, n: int, out_dir: str | Path, cfg=None, seed: int = 0) -> list[tuple[Path, Path]]:
    """Write n degraded pairs as ``out_dir/lr/NNNNN.png`` and ``out_dir/hr/NNNNN.png``.

    HR crops come from ``ResumableSampler(len(dataset), 1, seed)``; each is degraded alone (so
    every decision is per pair) with a generator seeded by (seed, i). Returns (lr, hr) paths.
    """
    from dfosd.training.degradations import DegradationConfig, degrade

    cfg = cfg or DegradationConfig()
    if dataset.crop % cfg.scale:
        raise DfosdError(f"crop {dataset.crop} is not divisible by the scale {cfg.scale}")
    out = Path(out_dir)
    (out / "lr").mkdir(parents=True, exist_ok=True)
    (out / "hr").mkdir(parents=True, exist_ok=True)
    sampler = ResumableSampler(len(dataset), 1, seed)
    paths = []
    for i in range(int(n)):
        hr = dataset[sampler.batch(i)[0]][None]
        lr = degrade(hr, cfg, make_generator(seed, i, 0xDE6))
        pair = (out / "lr" / f"{i:05d}.png", out / "hr" / f"{i:05d}.png")
        for t, p in zip((lr, hr), pair):
            arr = (t[0].permute(1, 2, 0).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
            Image.fromarray(arr).save(p)
        paths.append(pair)
    return paths
