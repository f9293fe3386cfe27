"""What a run leaves to look at: a CSV of the losses and sample SR images.

``train_log.csv``: one row per optimizer step. On ``--resume`` the rows after the resumed step
(written by the interrupted run after its last state) are dropped, so the file reads as one run.
``samples/step-NNNNNNN.png``: for a fixed set of training crops, one row each of
[bicubic x4 of the LR | generated SR | HR].
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dfosd.core.manifest import write_bytes_atomic, write_text_atomic

LOG_COLUMNS = ("step", "loss_g", "mse", "ea_dists", "g_adv", "loss_d", "d_real", "d_fake", "lr", "sec_per_step")


class CsvLog:
    def __init__(self, path: Path, *, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.is_file():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_COLUMNS)
        else:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, LOG_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(self.path, buf.getvalue())

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in LOG_COLUMNS])


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def _to_uint8(x01: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [0,1] -> HxWx3 uint8."""
    return (x01.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def sample_grid(lr01: torch.Tensor, sr_m11: torch.Tensor, hr01: torch.Tensor) -> np.ndarray:
    """Rows of [bicubic x4 LR | SR | HR] for a batch: uint8 HxWx3."""
    up = F.interpolate(lr01.float(), size=hr01.shape[-2:], mode="bicubic", align_corners=False)
    sr01 = (sr_m11.float() + 1.0) / 2.0
    rows = [np.concatenate([_to_uint8(a), _to_uint8(b), _to_uint8(c)], axis=1) for a, b, c in zip(up, sr01, hr01)]
    return np.concatenate(rows, axis=0)


def save_png(array: np.ndarray, path: Path) -> Path:
    """Write atomically (temp file + rename): a viewer never sees half an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return path


def losses_postfix(row: dict, keys: Sequence[str] = ("loss_g", "mse", "ea_dists", "g_adv", "loss_d")) -> dict:
    """The short form tqdm shows."""
    return {k: f"{row[k]:.4g}" for k in keys if k in row}
