"""Model families: the one-step SD-2.1-base super-resolution models dfosd compiles, as data.

Every family has the same deploy shape (VAE encoder -> one UNet call at a fixed timestep
with a constant conditioning -> x0 -> VAE decoder); what differs is declared here and
nowhere else: where LoRA sits, which layers are replaced whole, the merge scale rule,
the timestep, the x0 rule, the conditioning, the pre-processing, the default colour fix.

The facts were read in each project's own inference code; the citations are in
``UPSTREAM`` (repository, file and line) so a reader can check them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.vocab import COLOR_FIXES, FAMILY_NAMES, REFUSED_FAMILY_NAMES

# Parts a LoRA set or a replaced layer may sit in (module names are relative to them).
LORA_PARTS = ("unet", "vae")
# x0 rules: "ddpm"      x0 = (z - sqrt(1 - abar_T) * eps) / sqrt(abar_T)
#           "z-minus-eps" x0 = z - eps (PiSA-SR)
X0_RULES = ("ddpm", "z-minus-eps")
# Conditioning: a learned embedding stored in the checkpoint, or a prompt encoded once at
# export by the base's CLIP tokenizer + text encoder.
CONDITIONINGS = ("embedding", "prompt")
# Pre-processing of the uint8 LR tile into the VAE encoder's [-1, 1] input:
#   "torch-bicubic"          torch bicubic (a=-0.75, half-pixel), x2-1, clamped (DFOSD)
#   "torch-bicubic-unclamped" the same without the clamp (HYPIR: F.interpolate on [0,1])
#   "pil-bicubic"            PIL's bicubic on the uint8 image (a=-0.5, borders renormalised,
#                            width pass then height pass, rounded to uint8 after each)
PREPROCESSINGS = ("torch-bicubic", "torch-bicubic-unclamped", "pil-bicubic")
# How a LoRA set's merge scale is found when the file does not state alpha:
#   "stored"      alpha is in the file (DFOSD format 1, kohya's per-module alpha)
#   "peft-default" peft's LoraConfig default lora_alpha=8 (OSEDiff/PiSA-SR never set it)
#   "rank"        alpha = rank, scale 1 (HYPIR sets lora_alpha=lora_rank)
ALPHA_RULES = ("stored", "peft-default", "rank")
PEFT_DEFAULT_ALPHA = 8.0


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    upstream: str
    lora_parts: tuple[str, ...]
    replaced: tuple[str, ...]  # "<part>.<parameter>" replaced whole, e.g. "unet.conv_in.weight"
    alpha_rule: str
    timestep: int
    x0_rule: str
    conditioning: str
    default_prompt: str | None
    preprocess: str
    color_fix: str
    upscale: int = 4
    lora_groups: tuple[str, ...] = ("main",)  # PiSA-SR: ("pix", "sem")
    deviations: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        problems = []
        for attr, allowed in (("alpha_rule", ALPHA_RULES), ("x0_rule", X0_RULES), ("conditioning", CONDITIONINGS),
                              ("preprocess", PREPROCESSINGS), ("color_fix", COLOR_FIXES)):
            if getattr(self, attr) not in allowed:
                problems.append(f"{attr} {getattr(self, attr)!r} is not one of {', '.join(allowed)}")
        bad_parts = [p for p in self.lora_parts + tuple(r.split(".")[0] for r in self.replaced) if p not in LORA_PARTS]
        if bad_parts:
            problems.append(f"unknown part(s) {bad_parts}; parts are {', '.join(LORA_PARTS)}")
        if not 0 <= self.timestep <= 999:
            problems.append(f"timestep {self.timestep} is outside [0, 999]")
        if (self.conditioning == "prompt") != (self.default_prompt is not None):
            problems.append("a prompt family needs a default prompt (and only a prompt family has one)")
        if self.upscale < 1:
            problems.append(f"upscale {self.upscale} must be >= 1")
        if problems:
            raise problems_error(f"family {self.name!r}", problems)

    def summary(self) -> dict:
        return {"family": self.name, "title": self.title, "upstream": self.upstream, "timestep": self.timestep,
                "x0_rule": self.x0_rule, "conditioning": self.conditioning, "preprocess": self.preprocess,
                "color_fix": self.color_fix, "upscale": self.upscale, "lora_parts": list(self.lora_parts),
                "replaced": list(self.replaced), "deviations": list(self.deviations)}


COMMON_DEVIATIONS = (
    "VAE latent: the posterior mean instead of a random sample (a deterministic engine)",
    "tile-local VAE and UNet: GroupNorm statistics per engine tile, not pooled over the image; "
    "tiles blended by dfosd's runtime, not by upstream's Gaussian latent tiling",
    "uint8 output rounded to nearest (upstream's ToPILImage truncates: at most one level lower)",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="dfosd", title="DFOSD (Li et al. 2024)", upstream="no public code; dfosd's own format 1",
            lora_parts=("unet",), replaced=(), alpha_rule="stored", timestep=999, x0_rule="ddpm",
            conditioning="embedding", default_prompt=None, preprocess="torch-bicubic", color_fix="none",
        ),
        Family(
            name="osediff", title="OSEDiff (cswry/OSEDiff)", upstream="cswry/OSEDiff osediff.py, test_osediff.py",
            lora_parts=("unet", "vae"), replaced=("unet.conv_in.weight", "unet.conv_in.bias"),
            alpha_rule="peft-default", timestep=999, x0_rule="ddpm", conditioning="prompt", default_prompt="",
            preprocess="pil-bicubic", color_fix="adain",
            deviations=COMMON_DEVIATIONS + (
                "one fixed prompt embedding (default empty) instead of per-image RAM/DAPE tags + the user prompt",
                "no LANCZOS resize to a multiple of 8 (engine tiles are multiples of 8 already)",
            ),
        ),
        Family(
            name="pisa-sr", title="PiSA-SR (csslc/PiSA-SR)", upstream="csslc/PiSA-SR pisasr.py, test_pisasr.py",
            lora_parts=("unet",), replaced=(), alpha_rule="peft-default", timestep=1, x0_rule="z-minus-eps",
            conditioning="prompt", default_prompt="", preprocess="pil-bicubic", color_fix="adain",
            lora_groups=("pix", "sem"),
            deviations=COMMON_DEVIATIONS + (
                "both LoRA sets merged (upstream's default mode; equals its adjustable mode at "
                "lambda_pix = lambda_sem = 1)",
            ),
        ),
        Family(
            name="hypir", title="HYPIR (XPixelGroup/HYPIR)",
            upstream="XPixelGroup/HYPIR HYPIR/enhancer/sd2.py, base.py, configs/sd2_gradio.yaml",
            lora_parts=("unet",), replaced=(), alpha_rule="rank", timestep=200, x0_rule="ddpm",
            conditioning="prompt", default_prompt="", preprocess="torch-bicubic-unclamped", color_fix="wavelet",
            deviations=COMMON_DEVIATIONS[:2] + (
                "uint8 output rounded to nearest (upstream truncates after its wavelet fix)",
                "one fixed prompt embedding (default empty) instead of a per-image caption",
                "fp32/fp16 instead of upstream's bf16",
                "decoder output clamped to [-1, 1] before the colour fix (upstream clamps after it)",
            ),
        ),
        Family(
            name="omgsr-s", title="OMGSR-S (wuer5/OMGSR)",
            upstream="wuer5/OMGSR infer/infer_omgsr_s.py, infer/omgsr_s_infer_model.py, train/train_omgsr_s.py, "
                     "infer_omgsr_s.sh, configs/omgsr_s_512.yml (commit 8996613)",
            lora_parts=("unet", "vae"), replaced=(), alpha_rule="stored", timestep=273, x0_rule="ddpm",
            conditioning="prompt", default_prompt="", preprocess="pil-bicubic", color_fix="adain",
            deviations=COMMON_DEVIATIONS + (
                "one fixed prompt embedding (default empty, upstream's default) instead of a per-run prompt",
                "no LANCZOS resize to a multiple of 8 (engine tiles are multiples of 8 already) and no "
                "up-front resize of images whose short side is under 128 px (upstream's process_size 512 / 4)",
                "fp32/fp16 instead of upstream's default bf16",
            ),
        ),
    )
}

assert tuple(FAMILIES) == FAMILY_NAMES, "core/vocab.py names the families core/families.py defines"

# Checkpoints of one-step SR models that are not this deploy shape, with the reason.
NOT_SUPPORTED = {
    "s3diff": "S3Diff modulates its LoRA per image with a degradation network (state_dict_*_de_mlp): "
              "the LoRA depends on the input and cannot be merged into fixed weights",
    "tsd-sr": "TSD-SR is built on SD3-medium (an MMDiT transformer with a 16-channel VAE): another backbone",
    "invsr": "InvSR adds a noise-predictor network in front of SD-Turbo: an extra network dfosd does not compile",
    "osdface": "OSDFace makes its conditioning from the image with a visual representation embedder: "
               "the conditioning cannot be held constant",
    "adcsr": "AdcSR is a new pruned architecture, not SD-2.1-base's UNet",
}


assert set(NOT_SUPPORTED) == set(REFUSED_FAMILY_NAMES), "core/vocab.py names the refused families"


def get_family(name: str) -> Family:
    key = name.strip().lower()
    if key in NOT_SUPPORTED:
        raise DfosdError(f"{name} checkpoints are not supported: {NOT_SUPPORTED[key]}")
    if key not in FAMILIES:
        raise DfosdError(f"unknown family {name!r}", hint=f"use one of: {', '.join(FAMILIES)}")
    return FAMILIES[key]


def lora_alpha(family: Family, rank: int) -> float:
    """The LoRA alpha a family's upstream inference uses (scale = alpha / rank) when the file does
    not state one (format 2 stores it per LoRA set)."""
    if family.alpha_rule == "peft-default":
        return PEFT_DEFAULT_ALPHA
    if family.alpha_rule == "rank":
        return float(rank)
    raise DfosdError(f"family {family.name}: the checkpoint does not state lora_alpha",
                     hint="store alpha with each LoRA set (dfosd convert writes it)")
