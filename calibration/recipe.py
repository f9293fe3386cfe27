"""The 8-bit recipe: what is quantized, how it is calibrated, as one record.

Light on purpose (no ModelOpt import): the export config validates against it and the
manifest stores ``QuantRecipe.to_dict()``; ``calibration.quantize`` turns it into a
ModelOpt config.

INT8 (what NVIDIA's diffusion recipes do): per-channel weights, per-tensor
activations; SmoothQuant (alpha 0.8) on Linear layers; percentile (or max) calibration
of the Conv inputs. FP8 E4M3: per-tensor weights and activations, max calibration of the
Linear inputs and the same Conv choice. Never quantized (ModelOpt name patterns): conv_in,
conv_out, conv_shortcut, the time embedding (``time_embedding`` and the ResNets'
``time_emb_proj``), norm_out, proj_out, and the cross-attention K/V projections, whose
only input is the checkpoint's fixed text embedding: left in float they fold into
constants at export, quantized they would be runtime work with quantization error for
nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from dfosd.core.errors import DfosdError
from dfosd.core.vocab import COMPONENTS, FLOAT_PRECISIONS, QUANT_PRECISIONS

CONV_CALIBRATIONS = ("percentile", "max")
# --quantize names (CLI) -> component names (contracts, manifest); component names are accepted too.
QUANTIZE_NAMES = {"unet": "unet", "vae-enc": "encoder", "vae-dec": "decoder"}
EXCLUDE_PATTERNS = (
    "*conv_in*",
    "*conv_out*",
    "*conv_shortcut*",
    "*time_emb*",  # time_embedding.linear_1/2 and every ResNet's time_emb_proj
    "*norm_out*",
    "*proj_out*",
    "*attn2.to_k*",  # input = the fixed text embedding: folded at export
    "*attn2.to_v*",
)
# Layer classes the recipe quantizes; each must end with at least one enabled quantizer.
QUANTIZED_CLASSES = ("Linear", "Conv2d")


def parse_quantize(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"unet,vae-enc"`` (or component names) -> component names in pipeline order."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if not items:
        raise DfosdError("--quantize is empty: name at least one of " + ", ".join(QUANTIZE_NAMES))
    comps = set()
    for item in items:
        comp = QUANTIZE_NAMES.get(item, item if item in COMPONENTS else None)
        if comp is None:
            raise DfosdError(f"--quantize {item!r}: choose from {', '.join(QUANTIZE_NAMES)}")
        comps.add(comp)
    return tuple(c for c in COMPONENTS if c in comps)


@dataclass(frozen=True)
class QuantRecipe:
    precision: str = "int8"
    float_precision: str = "fp16"  # of every op left unquantized (and of unquantized parts)
    conv_calibration: str = "percentile"
    percentile: float = 99.99
    smoothquant_alpha: float = 0.8
    exclude: tuple[str, ...] = EXCLUDE_PATTERNS
    # What is quantized, and on what: the parts (``--quantize`` names or component names,
    # kept in pipeline order) and the calibration photos (an export needs them; calibrating
    # in memory on given tiles does not).
    components: tuple[str, ...] | str = COMPONENTS
    calib_data: str | None = None
    calib_count: int = 64

    def __post_init__(self):
        problems = []
        try:
            object.__setattr__(self, "components", parse_quantize(self.components))
        except DfosdError as exc:
            problems.append(exc.message)
        if self.calib_data is not None:
            object.__setattr__(self, "calib_data", str(Path(self.calib_data).expanduser().resolve()))
        if self.calib_count < 1:
            problems.append(f"--calib-count {self.calib_count}: must be >= 1")
        if self.precision not in QUANT_PRECISIONS:
            problems.append(f"--precision {self.precision!r}: 8-bit recipes are {', '.join(QUANT_PRECISIONS)}")
        if self.float_precision not in FLOAT_PRECISIONS:
            problems.append(f"--float-precision {self.float_precision!r}: choose one of {', '.join(FLOAT_PRECISIONS)}")
        if self.conv_calibration not in CONV_CALIBRATIONS:
            problems.append(f"--conv-calibration {self.conv_calibration!r}: choose one of {', '.join(CONV_CALIBRATIONS)}")
        if not 50.0 < self.percentile <= 100.0:
            problems.append(f"percentile {self.percentile} must be in (50, 100]")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            problems.append(f"SmoothQuant alpha {self.smoothquant_alpha} must be in [0, 1]")
        if problems:
            raise DfosdError("; ".join(problems))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def algorithm(self) -> dict[str, Any] | str:
        """ModelOpt's calibration algorithm: SmoothQuant is INT8-only."""
        if self.precision == "int8":
            return {"method": "smoothquant", "alpha": self.smoothquant_alpha}
        return "max"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["components"] = list(self.components)
        d["algorithm"] = self.algorithm
        d["weights"] = "per-channel (axis 0)" if self.precision == "int8" else "per-tensor"
        d["activations"] = "per-tensor"
        d["linear_calibration"] = "smoothquant+max" if self.precision == "int8" else "max"
        return d


def require_modelopt() -> None:
    """The cheap check for int8/fp8 before any model is loaded: ModelOpt is installed (found,
    not imported: importing it takes seconds; calibration/quantize.py imports it when it runs)."""
    import importlib.util

    if importlib.util.find_spec("modelopt") is None:
        raise DfosdError("int8/fp8 export needs NVIDIA ModelOpt (nvidia-modelopt), which is not installed",
                         hint="pip install 'dfosd[quant]' (nvidia-modelopt; keep your torch build: see README), "
                              "or export --precision fp16 / fp32")
