"""Export a checkpoint to an artifact directory: ONNX per part and tile batch + manifest.

Layout of ``--out DIR``::

    manifest.json            what went in, software versions, contracts, file hashes
    encoder_b1.onnx          one file per part and tile batch (``<part>_b<batch>``)
    unet_b1.onnx[.data]      weights in external data once past 2 GiB
    decoder_b1.onnx

Re-running with identical inputs (base, checkpoint, options, software) reuses the
directory; any change rebuilds it. Only a new or empty folder or an earlier export is
written to, and only files an earlier export wrote are replaced or removed
(``export.ownership``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dfosd.calibration.recipe import QuantRecipe
from dfosd.core.contracts import Geometry, component_contracts
from dfosd.core.errors import DfosdError
from dfosd.core.manifest import (
    MANIFEST_FORMAT,
    ExportDir,
    build_key,
    changed_files,
    file_record,
    package_versions,
    software_versions,
    write_json_atomic,
)
from dfosd.core.vocab import COMPONENTS, EXPORT_KIND, MANIFEST_NAME, PRECISIONS, QUANT_PRECISIONS, onnx_name, stem

if TYPE_CHECKING:
    from dfosd.core.bases import Base

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
QDQ_FP16_OPSET = 19  # QuantizeLinear with fp16 scales, and any FP8 Q/DQ


@dataclass(frozen=True)
class ExportConfig:
    precision: str = "fp16"
    tile: int = 128
    batches: tuple[int, ...] = (1,)
    opset: int | None = None  # None: 17, or 19 where Q/DQ need it (fp8; int8 in fp16)
    quant: QuantRecipe | None = None  # int8/fp8 only: what is quantized, how, and on which photos
    # fp16 parts: the photos of the range pass that picks fp32 islands (export/fp16_islands.py);
    # None: scikit-image's CALIB_PHOTOS (an 8-bit export's fp16 parts use its --calib-data)
    range_data: str | None = None

    def __post_init__(self):
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        elif self.precision in QUANT_PRECISIONS:
            if self.quant is None or self.quant.calib_data is None:
                problems.append(f"--precision {self.precision} needs --calib-data DIR (LR photos to calibrate on)")
            elif self.quant.precision != self.precision:
                problems.append(f"--precision {self.precision} with a {self.quant.precision} recipe")
        elif self.quant is not None:
            problems.append(f"quantization settings apply to --precision int8/fp8 (got {self.precision})")
        if self.range_data is not None and self.precision != "fp16":
            problems.append(f"range photos are for --precision fp16 (got {self.precision})")
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(f"--batch {list(self.batches)}: tile batches must be integers >= 1")
        if len(set(self.batches)) != len(self.batches):
            problems.append(f"--batch {list(self.batches)}: repeated tile batch")
        if self.tile < 8 or self.tile % 2:
            problems.append(f"--tile {self.tile}: must be an even number >= 8 (LR pixels)")
        needed = self.min_opset
        if self.opset is None:
            object.__setattr__(self, "opset", max(DEFAULT_OPSET, needed))
        elif not max(13, needed) <= self.opset <= 21:
            why = f" ({self.precision} Q/DQ in {self.float_precision} need {needed})" if needed > 13 else ""
            problems.append(f"--opset {self.opset}: choose {max(13, needed)}..21{why}")
        if problems:
            raise DfosdError("; ".join(problems))
        object.__setattr__(self, "batches", tuple(sorted(self.batches)))

    @classmethod
    def from_options(cls, *, precision: str = "fp16", tile: int = 128, batches: tuple[int, ...] = (1,),
                     opset: int | None = None, float_precision: str | None = None, calib_data: str | None = None,
                     calib_count: int = 64, quantize: str | tuple[str, ...] | None = None,
                     conv_calibration: str = "percentile") -> "ExportConfig":
        """The config of ``dfosd-export``'s flags: the 8-bit ones become a ``QuantRecipe`` for
        int8/fp8 and are refused with a float precision."""
        quant = None
        if precision in QUANT_PRECISIONS:
            extra = {} if quantize is None else {"components": quantize}
            quant = QuantRecipe(precision=precision, float_precision=float_precision or "fp16",
                                conv_calibration=conv_calibration, calib_data=calib_data, calib_count=calib_count,
                                **extra)
        else:
            problems = []
            if calib_data is not None and precision != "fp16":
                problems.append(f"--calib-data is used by --precision fp16 (its range pass) and int8/fp8 only "
                                f"(got {precision})")
            if float_precision not in (None, precision):
                problems.append(f"--float-precision applies to int8/fp8 exports (got {precision})")
            if problems:
                raise DfosdError("; ".join(problems))
        return cls(precision=precision, tile=tile, batches=tuple(batches), opset=opset, quant=quant,
                   range_data=calib_data if precision == "fp16" else None)

    @property
    def float_precision(self) -> str:
        """The precision of every part not quantized and of the ops left in float."""
        return self.quant.float_precision if self.quant is not None else self.precision

    @property
    def quantize(self) -> tuple[str, ...]:
        """The quantized parts; () for fp32/fp16."""
        return tuple(self.quant.components) if self.quant is not None else ()

    @property
    def min_opset(self) -> int:
        if self.precision == "fp8" or (self.precision == "int8" and self.float_precision == "fp16"):
            return QDQ_FP16_OPSET
        return 13

    def component_precision(self, component: str) -> str:
        return self.precision if component in self.quantize else self.float_precision

    @property
    def range_photos(self) -> str | None:
        """Photos of the fp16 range pass (None: the scikit-image calibration photos)."""
        return self.quant.calib_data if self.quant is not None else self.range_data

    def has_fp16_parts(self) -> bool:
        return any(self.component_precision(c) == "fp16" for c in COMPONENTS)


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    reused: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def export_inputs(base_spec: str, base_fp: str | None, model, cfg: ExportConfig) -> dict:
    """What goes into the build key. ``model``: an SRModel (or a format-1 DfosdCheckpoint, whose
    key is what it always was)."""
    inputs = {
        "base": base_spec,
        "base_fingerprint": base_fp,
        "checkpoint_sha256": model.sha256,
        "config": asdict(cfg),
        "software": software_versions(),
    }
    family = getattr(model, "family", None)
    if family is not None and family.name != "dfosd":  # what an upstream checkpoint bakes besides its tensors
        inputs["family"] = family.name
        inputs["prompt"] = model.prompt
        if model.timestep != family.timestep:  # --timestep
            inputs["timestep"] = model.timestep
    if cfg.quant is not None:
        from dfosd.calibration.data import file_list_sha256

        inputs["calibration_sha256"] = file_list_sha256(cfg.quant.calib_data)  # new photos -> new build key
        inputs["software"].update(package_versions("nvidia-modelopt"))
    if cfg.has_fp16_parts():  # the range pass's photos decide the fp32 islands
        from dfosd.calibration.data import CALIB_PHOTOS, file_list_sha256

        photos = cfg.range_photos
        inputs["fp16_range_photos"] = (file_list_sha256(photos) if photos else
                                       "scikit-image:" + ",".join(CALIB_PHOTOS))
    return inputs


def reusable(out_dir: Path, key: str) -> dict | None:
    """The existing manifest when it matches ``key`` and every file is intact."""
    try:
        existing = ExportDir(out_dir, check="none")
    except DfosdError:
        return None
    if existing.build_key != key or changed_files(out_dir, existing.files):
        return None
    return existing.manifest


def export_checkpoint(ckpt_path: str | Path, base_spec: str | None, out_dir: str | Path, cfg: ExportConfig, *,
                      force: bool = False, progress: Callable[[str], None] = log.info, base: "Base | None" = None,
                      part_exporter: Callable[..., dict] | None = None, family: str | None = None,
                      prompt: str | None = None, pisa_scales: tuple[float, float] | None = None,
                      timestep: int | None = None) -> ExportResult:
    """Replace layers and merge the LoRA, trace every part for every tile batch, write the manifest.

    ``ckpt_path``: any checkpoint ``dfosd.core.readers`` reads (dfosd format 1/2, osediff.pkl,
    pisa_sr.pkl, HYPIR_sd2.pth, diffusers/kohya LoRA); ``base_spec`` None: the file's own base.
    ``base``: the base of ``base_spec`` already in memory (a caller that holds it saves the
    load; the LoRA is then merged into a copy of its UNet, so the caller's stays clean).
    ``part_exporter``: writes one float part, with ``onnx_export.export_part``'s signature
    and return value (the default); quantized parts always go through the Q/DQ writer.
    ``family``/``prompt``: override the detected family, the prompt encoded once (prompt families).
    ``timestep``: replaces the family's fixed timestep (upstream checkpoints; recorded as a deviation).
    ``pisa_scales``: PiSA-SR's adjustable two-pass UNet (lambda_pix, lambda_sem) instead of both sets merged.
    """
    from dfosd.core.bases import base_fingerprint, load_base
    from dfosd.core.readers import read_model, with_encoded_prompt
    from dfosd.core.srmodel import validate_model
    from dfosd.export.ownership import check_planned, owned_files, part_files

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    owned = owned_files(out_dir)  # a foreign non-empty folder is refused before any work
    planned = part_files([stem(name, batch) for batch in cfg.batches for name in COMPONENTS])
    check_planned(out_dir, owned, planned)
    # format problems surface before the base is loaded; a prompt family's text encoder runs only
    # when the export is not reused (the embedding is not part of the build key: the prompt is)
    model_file = read_model(ckpt_path, family=family, base_spec=base_spec, prompt=prompt, progress=progress,
                            base=base, encode=False)
    if timestep is not None:
        model_file = model_file.with_timestep(timestep)
    base_spec = base_spec or model_file.base_model
    inputs = export_inputs(base_spec, base_fingerprint(base_spec), model_file, cfg)
    if pisa_scales is not None:
        inputs["pisa_scales"] = [float(v) for v in pisa_scales]
    key = build_key(inputs)
    if not force and inputs["base_fingerprint"] is not None:
        old = reusable(out_dir, key)
        if old is not None:
            progress(f"reusing {out_dir}: same base, checkpoint, options and software as its manifest")
            return ExportResult(out_dir, old, reused=True, seconds=time.perf_counter() - t0)

    own_base = base is None
    if own_base:
        progress(f"loading base {base_spec}")
        base = load_base(base_spec)
    elif base.spec != base_spec:
        raise DfosdError(f"export of {base_spec} was handed the base {base.spec}")
    model_file = with_encoded_prompt(model_file, progress)
    validate_model(model_file, base)
    if inputs["base_fingerprint"] is None:  # e.g. a hub id fetched just now
        inputs["base_fingerprint"] = base.fingerprint
        key = build_key(inputs)
    from dfosd.core.onestep import build_from_model
    from dfosd.export.onnx_export import export_part
    from dfosd.export.ownership import clear_stale, writing

    # The eager model is always built and traced in fp32; fp16 is made on the ONNX
    # graph by export_part(precision="fp16") with fp32 islands (see export/onnx_export.py). Tracing
    # torch half modules on the CPU took >5 min for the full-size encoder alone. Quantized parts
    # may still build their own half copy if ModelOpt needs it.
    if part_exporter is None:
        part_exporter = export_part
    # a base of ours alone: merge in place
    model = build_from_model(base, model_file, copy=not own_base, pisa_scales=pisa_scales)
    quantized, calibration = {}, None
    if cfg.quant is not None:
        from dfosd.calibration.export import quantize_for_export

        quantized, calibration = quantize_for_export(model, cfg.quant, cfg.tile, progress=progress)
    range_inputs = {}  # part -> its fp32 inputs on the range pass's tiles (fp16 parts only)
    if cfg.has_fp16_parts() and part_exporter is export_part:
        from dfosd.calibration.data import range_tiles
        from dfosd.export.fp16_islands import RANGE_TILES, part_inputs

        progress(f"fp16 range pass: {RANGE_TILES} calibration tiles through the fp32 model")
        range_inputs = part_inputs(model, range_tiles(cfg.range_photos, cfg.tile, RANGE_TILES))
    with writing(out_dir, owned, planned):  # records what it may write first; cleans that up after a failure
        components, files = {}, {}
        for batch in cfg.batches:
            geo = Geometry(tile=cfg.tile, batch=batch, upscale=model_file.upscale,
                           vae_scale_factor=base.vae_scale_factor, latent_channels=base.latent_channels)
            for name, contract in component_contracts(geo).items():
                t = time.perf_counter()
                precision = cfg.component_precision(name)
                progress(f"exporting {contract.stem} ({precision})")
                if name in quantized:
                    from dfosd.export.onnx_qdq import export_quantized_part

                    info = export_quantized_part(quantized[name], contract, out_dir / onnx_name(contract.stem),
                                                 opset=cfg.opset, precision=cfg.precision)
                else:
                    extra = {}
                    if precision == "fp16" and name in range_inputs:
                        from dfosd.export.fp16_islands import batch_feeds

                        extra["range_inputs"] = batch_feeds(range_inputs[name], contract)
                    info = part_exporter(model.part(name), contract, out_dir / onnx_name(contract.stem), opset=cfg.opset,
                                         precision=precision, **extra)
                    if "fp16_islands" in info:
                        from dfosd.export.fp16_islands import summary

                        progress(summary(contract.stem, info["fp16_islands"], info["fp16_compute"]))
                for f in info["files"]:
                    files[f] = file_record(out_dir / f)
                components[contract.stem] = {"component": name, "batch": batch, "onnx": onnx_name(contract.stem),
                                             "precision": precision, "contract": contract.to_dict(), "export_seconds":
                                             round(time.perf_counter() - t, 2), **info}
        removed = clear_stale(out_dir, owned, set(files))
        if removed:
            progress(f"removed {len(removed)} file(s) of the earlier export that this one does not make: "
                     f"{', '.join(removed)}")
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": EXPORT_KIND,
            "build_key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": {**inputs, "checkpoint": str(Path(ckpt_path).resolve())},
            "precision": cfg.precision,
            "float_precision": cfg.float_precision,
            "tile": cfg.tile,
            "batches": list(cfg.batches),
            "upscale": model_file.upscale,
            "timestep": model_file.timestep,
            "family": {"name": model_file.family.name, "x0_rule": model_file.x0_rule,
                       "preprocess": model_file.preprocess, "color_fix": model_file.color_fix,
                       "prompt": model_file.prompt, "source": dict(model_file.source),
                       "pisa_scales": None if pisa_scales is None else [float(v) for v in pisa_scales],
                       "deviations": model_file.deviations()},
            "model": {"cross_attention_dim": base.cross_attention_dim, "vae_scale_factor": base.vae_scale_factor,
                      "latent_channels": base.latent_channels, "scaling_factor": base.scaling_factor,
                      "embedding_tokens": int(model_file.text_embedding.shape[1])},
            "components": components,
            "files": files,
        }
        if calibration is not None:
            manifest["calibration"] = calibration
        write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return ExportResult(out_dir, manifest, reused=False, seconds=time.perf_counter() - t0)

