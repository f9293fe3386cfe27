"""INT8 / FP8 quantization of the deployable parts with NVIDIA ModelOpt.

Calibration runs the real pipeline on the product's inputs, one part after the other:
the encoder is calibrated on uint8 LR tiles, the UNet on the encoder's latents of those
tiles, the decoder on the UNet's denoised latents. The activations passed on are the fp32
pipeline's, not those of the quantized parts: a quantized UNet at T=999 is chaotic in its
rounding (float noise flips rounding decisions, which cascade), so calibrating the decoder
on its outputs would make the decoder's scales depend on thread counts, hardware and on
which other parts are quantized. With fp32 activations every part's quantization is the
same for any ``--quantize`` choice and reproducible. Parts are quantized as copies unless
the caller owns the model (``in_place``), in fp32 with fake quantization; ``for_export``
then casts them to the export's float precision.

After quantization the enabled quantizers are counted per layer class and printed; a
class the recipe meant to quantize that ended with none enabled (ModelOpt silently
disables some name patterns) is an error, not a silently slower-and-no-smaller engine.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from dfosd.calibration.recipe import QUANTIZED_CLASSES, QuantRecipe
from dfosd.core.errors import DfosdError
from dfosd.core.vocab import COMPONENTS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dfosd.core.onestep import OneStepSR

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dfosd[quant]' (nvidia-modelopt; keep your torch build: see README)"
CALIB_BATCH = 4  # tiles per calibration forward


def modelopt():
    """``modelopt.torch.quantization``, imported on first use (it takes seconds)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "transformers X is not tested with modelopt"
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise DfosdError(f"INT8/FP8 export needs NVIDIA ModelOpt, which does not import ({exc})",
                         hint=INSTALL_HINT) from exc
    return mtq


@functools.lru_cache(maxsize=None)
def percentile_calibrator():
    """A ModelOpt histogram calibrator whose amax is a percentile of |x| by default.

    ModelOpt's max/SmoothQuant passes call ``compute_amax()`` without arguments, which
    the stock HistogramCalibrator does not accept.
    """
    modelopt()
    from modelopt.torch.quantization.calib import HistogramCalibrator

    class PercentileCalibrator(HistogramCalibrator):
        def __init__(self, num_bits=8, axis=None, unsigned=False, *, percentile: float = 99.99, **kwargs):
            super().__init__(num_bits, axis, unsigned, **kwargs)
            self.percentile = float(percentile)

        def compute_amax(self, method: str = "percentile", **kwargs):
            if method == "percentile":
                kwargs.setdefault("percentile", self.percentile)
            return super().compute_amax(method, **kwargs)

    return PercentileCalibrator


def modelopt_config(recipe: QuantRecipe) -> dict[str, Any]:
    """The recipe as a ModelOpt ``quantize`` config, written out in full (no ModelOpt defaults)."""
    bits = 8 if recipe.precision == "int8" else (4, 3)
    weight = {"num_bits": bits, "axis": 0 if recipe.precision == "int8" else None}
    act = {"num_bits": bits, "axis": None}
    if recipe.float_precision == "fp16":
        # Q/DQ in the graph's own float type: TensorRT's strongly typed mode needs it.
        weight["trt_high_precision_dtype"] = act["trt_high_precision_dtype"] = "Half"
    conv_act = dict(act)
    if recipe.conv_calibration == "percentile":
        conv_act["calibrator"] = (percentile_calibrator(), (), {"num_bits": bits, "percentile": recipe.percentile})
    quant_cfg = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": weight},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": act},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Conv2d", "cfg": weight},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Conv2d", "cfg": conv_act},
    ]
    quant_cfg += [{"quantizer_name": pattern, "enable": False} for pattern in recipe.exclude]
    return {"quant_cfg": quant_cfg, "algorithm": recipe.algorithm}


def _layer_class(module) -> str:
    """The torch/diffusers class a ModelOpt quant module was made from (QuantConv2d -> Conv2d)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("torch.nn.", "diffusers.")):
            return cls.__name__
    return type(module).__name__


def quantizer_summary(module: "nn.Module", exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Per layer class: layers with quantizers, quantizers enabled/total, and which layers
    the recipe meant to quantize (class in QUANTIZED_CLASSES, name not excluded) but are not."""
    mtq = modelopt()
    exclude = tuple(exclude)
    out: dict[str, dict[str, Any]] = {}
    for name, mod in module.named_modules():
        quantizers = [q for q in mod.children() if isinstance(q, mtq.nn.TensorQuantizer)]
        if not quantizers:
            continue
        row = out.setdefault(_layer_class(mod), {"layers": 0, "quantizers": 0, "enabled": 0, "meant": 0,
                                                  "quantized_layers": 0, "meant_but_disabled": []})
        enabled = sum(bool(q.is_enabled) for q in quantizers)
        row["layers"] += 1
        row["quantizers"] += len(quantizers)
        row["enabled"] += enabled
        row["quantized_layers"] += bool(enabled)
        excluded = any(fnmatch.fnmatch(f"{name}.input_quantizer", p) or fnmatch.fnmatch(f"{name}.weight_quantizer", p)
                       for p in exclude)
        if _layer_class(mod) in QUANTIZED_CLASSES and not excluded:
            row["meant"] += 1
            if enabled < 2:
                row["meant_but_disabled"].append(name)
    return dict(sorted(out.items()))


def format_summary(component: str, summary: dict[str, dict[str, Any]]) -> str:
    total = sum(r["quantizers"] for r in summary.values())
    enabled = sum(r["enabled"] for r in summary.values())
    lines = [f"{component}: {enabled} of {total} quantizers enabled"]
    for cls, r in summary.items():
        line = (f"  {cls:<10} {r['enabled']:>4}/{r['quantizers']:<4} quantizers enabled in "
                f"{r['quantized_layers']}/{r['layers']} layers")
        if r["meant"]:
            line += f" (recipe: {r['meant']} layers)"
        if r["meant_but_disabled"]:
            line += f"; not quantized although meant: {', '.join(r['meant_but_disabled'][:3])}"
            line += " ..." if len(r["meant_but_disabled"]) > 3 else ""
        lines.append(line)
    return "\n".join(lines)


def check_summary(component: str, summary: dict[str, dict[str, Any]]) -> None:
    """DfosdError when a class the recipe meant to quantize has no enabled quantizer."""
    empty = [cls for cls, r in summary.items() if cls in QUANTIZED_CLASSES and r["meant"] and not r["enabled"]]
    if empty:
        meant = ", ".join(f"{summary[c]['meant']} {c} layers" for c in empty)
        raise DfosdError(
            f"{component}: ModelOpt left every {'/'.join(empty)} quantizer disabled although the recipe quantizes "
            f"{meant}\n{format_summary(component, summary)}",
            hint="a quant_cfg pattern disables them (ModelOpt defaults disable e.g. *proj_out*): check the "
            "recipe in dfosd/calibration/recipe.py against your ModelOpt version")


def quantize_part(part: "nn.Module", recipe: QuantRecipe, batches: list["torch.Tensor"], *, component: str,
                  progress: Callable[[str], None] = log.info) -> tuple["nn.Module", dict]:
    """Quantize ``part`` in place (pass a copy) with ``batches`` as calibration data."""
    import torch

    mtq = modelopt()

    def forward_loop(m):
        for b in batches:
            m(b)

    # ModelOpt prints progress to stdout; dfosd-export keeps stdout for its result.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = mtq.quantize(part, modelopt_config(recipe), forward_loop)
    summary = quantizer_summary(part, recipe.exclude)
    progress(format_summary(component, summary))
    check_summary(component, summary)
    return part, summary


@dataclass
class CalibratedParts:
    parts: dict[str, "nn.Module"]  # component -> quantized copy (fp32, fake quantization, CPU)
    summaries: dict[str, dict]
    seconds: float


def calibrate_onestep(model: "OneStepSR", tiles: "torch.Tensor", recipe: QuantRecipe, components: Iterable[str], *,
                      batch: int = CALIB_BATCH, device: str | None = None, in_place: bool = False,
                      progress: Callable[[str], None] = log.info) -> CalibratedParts:
    """Quantize the chosen parts of an fp32 model, chaining real inputs through the fp32 pipeline.

    ``tiles``: uint8 LR tiles [N,3,t,t]; each part's fp32 outputs are the next part's
    calibration inputs. ``in_place``: quantize the model's own parts instead of copies
    (saves a full-size UNet copy; for callers that own the model and its base).
    """
    import torch

    t0 = time.perf_counter()
    components = tuple(components)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise DfosdError(f"cannot quantize unknown part(s) {sorted(unknown)}; parts are {', '.join(COMPONENTS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    last = max(COMPONENTS.index(c) for c in components)
    x = tiles
    parts, summaries = {}, {}
    for name in COMPONENTS[: last + 1]:
        part = model.part(name)
        if part.dtype != torch.float32:
            raise DfosdError(f"calibration runs the fp32 model; the {name} part is {part.dtype}")
        home = next(part.parameters()).device
        # only a part being quantized needs a copy; the others just run (and go back home)
        work = (part if in_place or name not in components else copy.deepcopy(part)).eval().to(device)
        batches = [b.to(device) for b in x.split(batch)]
        seen = f"{len(x)} tiles of {tuple(x.shape[1:])}"
        if name != COMPONENTS[last]:
            with torch.no_grad():  # fp32 activations for the next part, before quantizing this one
                x = torch.cat([work(b) for b in batches]).cpu()
        if name in components:
            progress(f"calibrating {name} ({recipe.precision}) on {seen}")
            work, summaries[name] = quantize_part(work, recipe, batches, component=name, progress=progress)
            parts[name] = work.cpu()
        else:
            work.to(home)
    return CalibratedParts(parts, summaries, time.perf_counter() - t0)


def for_export(part: "nn.Module", float_precision: str) -> "nn.Module":
    """A quantized part in the export's float precision (its fake quantizers become Q/DQ)."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[float_precision]
    part = part.to(dtype)
    part.dtype = dtype  # the parts cast their inputs to .dtype (see core/onestep.py)
    return part
