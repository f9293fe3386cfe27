"""The calibration step of ``dfosd-export --precision int8|fp8``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from dfosd.calibration.data import load_tiles
from dfosd.calibration.quantize import calibrate_onestep, for_export

if TYPE_CHECKING:
    from torch import nn

    from dfosd.calibration.recipe import QuantRecipe
    from dfosd.core.onestep import OneStepSR

log = logging.getLogger(__name__)


def quantize_for_export(model: "OneStepSR", recipe: "QuantRecipe", tile: int, *,
                        progress: Callable[[str], None] = log.info) -> tuple[dict[str, "nn.Module"], dict]:
    """Calibrate and quantize ``recipe.components`` on ``tile``-sized tiles of ``recipe.calib_data``;
    returns the parts in the recipe's float precision and the manifest's ``calibration`` record.

    ``model`` is the export's own fp32 model: the chosen parts are quantized in place (no
    copy of a full-size UNet), so its float versions of them are gone afterwards.
    """
    calib = load_tiles(recipe.calib_data, tile, recipe.calib_count)
    progress(f"calibration data: {calib.tiles.shape[0]} tiles of {tile}x{tile} from "
             f"{calib.files_used} of {len(calib.files)} photos in {recipe.calib_data}")
    result = calibrate_onestep(model, calib.tiles, recipe, recipe.components, in_place=True, progress=progress)
    parts = {name: for_export(part, recipe.float_precision) for name, part in result.parts.items()}
    record = {**calib.record(), "count_requested": recipe.calib_count, "components": list(recipe.components),
              "chain": "LR tiles -> encoder -> UNet -> decoder in fp32; each part calibrated on its fp32 inputs",
              "recipe": recipe.to_dict(), "quantizers": result.summaries, "seconds": round(result.seconds, 2)}
    return parts, record
