"""The calibration step of ``dfosd-export --precision int8|fp8``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from dfosd.calibration.data import load_tiles
from dfosd.calibration.quantize import calibrate_onestep, for_export

if TYPE_CHECKING:
    from torch import nn

    from dfosd.core.onestep import OneStepSR
    from dfosd.export.artifacts import ExportConfig

log = logging.getLogger(__name__)


def quantize_for_export(model: "OneStepSR", cfg: "ExportConfig", *,
                        progress: Callable[[str], None] = log.info) -> tuple[dict[str, "nn.Module"], dict]:
    """Calibrate and quantize ``cfg.quantize``; returns the parts in the export's float
    precision and the manifest's ``calibration`` record.

    ``model`` is the export's own fp32 model: the chosen parts are quantized in place (no
    copy of a full-size UNet), so its float versions of them are gone afterwards.
    """
    recipe = cfg.recipe()
    calib = load_tiles(cfg.calib_data, cfg.tile, cfg.calib_count)
    progress(f"calibration data: {calib.tiles.shape[0]} tiles of {cfg.tile}x{cfg.tile} from "
             f"{calib.files_used} of {len(calib.files)} photos in {cfg.calib_data}")
    result = calibrate_onestep(model, calib.tiles, recipe, cfg.quantize, in_place=True, progress=progress)
    parts = {name: for_export(part, cfg.float_precision) for name, part in result.parts.items()}
    record = {**calib.record(), "count_requested": cfg.calib_count, "components": list(cfg.quantize),
              "chain": "LR tiles -> encoder -> UNet -> decoder in fp32; each part calibrated on its fp32 inputs",
              "recipe": recipe.to_dict(), "quantizers": result.summaries, "seconds": round(result.seconds, 2)}
    return parts, record
