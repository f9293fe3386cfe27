"""Parity of exported pipelines against the eager fp32 model on held-out photos.

Each export directory (e.g. one per ``--quantize`` choice) runs through the lean runtime
on ONNX Runtime's CPU provider, tile batch by tile batch, on every tile of the held-out
photos; the uint8 SR tiles are compared with what the eager fp32 model makes of the same
tiles: PSNR (peak 255), max and mean absolute error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from dfosd.calibration.data import load_tiles
from dfosd.core.metrics import psnr_uint8
from dfosd.core.errors import DfosdError

if TYPE_CHECKING:
    import torch

    from dfosd.core.onestep import OneStepSR

ALL_TILES = 1 << 30


@dataclass(frozen=True)
class ParityRow:
    label: str
    precision: str
    quantized: tuple[str, ...]
    tiles: int
    psnr_db: float
    max_abs: int
    mean_abs: float

    def to_dict(self) -> dict:
        return asdict(self)


def _eager(reference: "OneStepSR", tiles: "torch.Tensor", batch: int) -> "torch.Tensor":
    import torch

    with torch.no_grad():
        return torch.cat([reference(t) for t in tiles.split(batch)])


def parity_report(exports: Mapping[str, str | Path], reference: "OneStepSR", photos: str | Path, *,
                  max_tiles: int = ALL_TILES) -> list[ParityRow]:
    """One row per export directory (label -> dir): its ONNX pipeline through ONNX Runtime's
    CPU provider vs the eager fp32 ``reference`` on the tiles of the held-out ``photos``."""
    import torch

    from dfosd.runtime.step import OneStepRunner

    rows, eager = [], {}
    for label, export_dir in exports.items():
        runner = OneStepRunner(export_dir, backend="onnxruntime")
        calib = runner.export.calibration
        data = load_tiles(photos, runner.tile, max_tiles)
        if calib.get("file_list_sha256") == data.sha256:
            raise DfosdError(f"{photos} is the calibration folder of {export_dir}: parity needs held-out photos")
        key = (runner.tile, data.sha256)
        if key not in eager:
            eager[key] = _eager(reference, data.tiles, runner.batch)
        out = torch.cat([runner(t) for t in data.tiles.split(runner.batch)])
        diff = (out.int() - eager[key].int()).abs()
        rows.append(ParityRow(label, runner.precision, tuple(calib.get("components", ())),
                              int(data.tiles.shape[0]), psnr_uint8(out, eager[key]), int(diff.max()),
                              float(diff.float().mean())))
    return rows


def format_report(rows: list[ParityRow]) -> str:
    w = max([len("export")] + [len(r.label) for r in rows])
    lines = [f"{'export':<{w}} {'precision':<9} {'quantized':<22} {'tiles':>5} {'PSNR dB':>8} {'max':>4} {'mean':>6}"]
    for r in rows:
        lines.append(f"{r.label:<{w}} {r.precision:<9} {'+'.join(r.quantized) or '-':<22} {r.tiles:>5} "
                     f"{r.psnr_db:>8.2f} {r.max_abs:>4} {r.mean_abs:>6.3f}")
    return "\n".join(lines)
