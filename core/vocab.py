"""dfosd's vocabulary: one home for every word the stages share.

Part names, precisions, boundary tensor names and artifact file names are spelled here
and nowhere else. Plain strings and tuples only: importing this module costs nothing
(no torch, no numpy), so command-line front ends, the Triton client and the C++ runner's
manifest reader can all use it.
"""

from __future__ import annotations

# The deployable parts, in pipeline order. The manifest and the contracts call each one a
# "component"; the Triton ensembles chain them in this order.
COMPONENTS = ("encoder", "unet", "decoder")

# Precisions of an export. Float precisions are what un-quantized parts (and graphs) are
# stored in; the 8-bit ones carry explicit Q/DQ nodes around float islands.
FLOAT_PRECISIONS = ("fp32", "fp16")
QUANT_PRECISIONS = ("int8", "fp8")
PRECISIONS = FLOAT_PRECISIONS + QUANT_PRECISIONS

# Tensors at the part boundaries: each part's output feeds the input of the same name.
LR_IMAGE, LATENT, DENOISED, SR_IMAGE = "lr_image", "latent", "denoised_latent", "sr_image"
IMAGE_IN, IMAGE_OUT = LR_IMAGE, SR_IMAGE  # what clients send and get back
# The decoder's second output: one uint8 per tile, 1 where any value before the cast to uint8 was
# NaN or Inf. The cast turns a NaN into some byte (0: a black image), so the image tensor alone
# cannot show it; the runtime, dfosd-serve and the C++ runner fail such a tile's image.
SR_NONFINITE = "sr_nonfinite"

# Artifact files of an export directory.
MANIFEST_NAME = "manifest.json"
# What runtimes recorded in an export (caches, measured backend choices): beside the manifest,
# never in it, so the export's own record is only ever written by dfosd-export.
RUNTIME_RECORDS_NAME = "runtime.json"
RUNTIME_RECORDS_KIND = "dfosd-runtime-records"
EXPORT_KIND = "dfosd-export"  # the manifest's "kind"
EXPORT_IN_PROGRESS_KIND = "dfosd-export-in-progress"  # the kind of the record of an export being written
ONNX_SUFFIX = ".onnx"
PLAN_SUFFIX = ".plan"  # TensorRT engine
PLAN_MANIFEST_SUFFIX = ".plan.json"  # its build record, beside it
PACKAGE_SUFFIX = ".pt2"  # AOTInductor package
AOTI_MANIFEST_NAME = "manifest.aoti.json"  # AOTInductor build record, one section per device
REPORT_NAME = "dfosd-report.json"  # dfosd-trt-run's run report, by default in --out


def stem(component: str, batch: int) -> str:
    """File stem of one part for one tile batch: ``unet`` + 4 -> ``unet_b4``."""
    return f"{component}_b{int(batch)}"


def onnx_name(stem_: str) -> str:
    return stem_ + ONNX_SUFFIX


def plan_name(stem_: str) -> str:
    return stem_ + PLAN_SUFFIX


def plan_manifest_name(stem_: str) -> str:
    return stem_ + PLAN_MANIFEST_SUFFIX


def package_name(stem_: str, device: str) -> str:
    """``unet_b1`` + ``cuda`` -> ``unet_b1.cuda.pt2`` (packages for several devices live side by side)."""
    return f"{stem_}.{device}{PACKAGE_SUFFIX}"

# Model families dfosd compiles (their facts live in core/families.py), and the colour fixes
# a family may default to (the runtime implements them).
FAMILY_NAMES = ("dfosd", "osediff", "pisa-sr", "hypir", "omgsr-s")
RESSHIFT_FAMILY_NAMES = ("sinsr", "tad-sr", "resshift-s15", "resshift-s4")  # the second backbone (core/resshift.py)
DEFAULT_NOISE_SEED = 0  # dfosd-trt-run's --seed for that backbone when neither --seed nor --noise is given
REFUSED_FAMILY_NAMES = ("s3diff", "invsr", "osdface", "tsd-sr", "adcsr")  # named so the refusal can say why
COLOR_FIXES = ("none", "adain", "wavelet")
