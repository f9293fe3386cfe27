"""Export a checkpoint to an artifact directory: ONNX per part and tile batch + manifest.

Layout of ``--out DIR``::

    manifest.json            what went in, software versions, contracts, file hashes
    encoder_b1.onnx          one file per part and tile batch (``<part>_b<batch>``)
    unet_b1.onnx[.data]      weights in external data once past 2 GiB
    decoder_b1.onnx

Re-running with identical inputs (base, checkpoint, options, software) reuses the
directory; any change rebuilds it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from dfosd.core.contracts import Geometry, component_contracts
from dfosd.core.errors import DfosdError
from dfosd.core.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    build_key,
    files_intact,
    file_record,
    software_versions,
    write_json_atomic,
)
from dfosd.core.onestep import COMPONENTS

log = logging.getLogger(__name__)

EXPORT_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class ExportConfig:
    precision: str = "fp16"
    tile: int = 128
    batches: tuple[int, ...] = (1,)
    opset: int = 17

    def __post_init__(self):
        problems = []
        if self.precision not in EXPORT_PRECISIONS:
            problems.append(f"--precision {self.precision!r}: choose one of {', '.join(EXPORT_PRECISIONS)} "
                            "(int8/fp8 need calibration data: see README, 'Quantization')")
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(f"--batch {list(self.batches)}: tile batches must be integers >= 1")
        if len(set(self.batches)) != len(self.batches):
            problems.append(f"--batch {list(self.batches)}: repeated tile batch")
        if self.tile < 8 or self.tile % 2:
            problems.append(f"--tile {self.tile}: must be an even number >= 8 (LR pixels)")
        if not 13 <= self.opset <= 21:
            problems.append(f"--opset {self.opset}: choose 13..21")
        if problems:
            raise DfosdError("; ".join(problems))
        object.__setattr__(self, "batches", tuple(sorted(self.batches)))


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    reused: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16}[precision]


def export_inputs(base_spec: str, base_fp: str | None, ckpt, cfg: ExportConfig) -> dict:
    return {
        "base": base_spec,
        "base_fingerprint": base_fp,
        "checkpoint_sha256": ckpt.sha256,
        "config": asdict(cfg),
        "software": software_versions(),
    }


def reusable(out_dir: Path, key: str) -> dict | None:
    """The existing manifest when it matches ``key`` and every file is intact."""
    import json

    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if old.get("format") != MANIFEST_FORMAT or old.get("build_key") != key:
        return None
    return None if files_intact(out_dir, old.get("files", {})) else old


def export_checkpoint(ckpt_path: str | Path, base_spec: str, out_dir: str | Path, cfg: ExportConfig, *,
                      force: bool = False, progress: Callable[[str], None] = log.info) -> ExportResult:
    """Merge the LoRA, trace every part for every tile batch, write the manifest."""
    from dfosd.core.bases import base_fingerprint, load_base
    from dfosd.core.checkpoint import read_checkpoint, validate_checkpoint

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    ckpt = read_checkpoint(ckpt_path)  # format problems surface before the base is loaded
    inputs = export_inputs(base_spec, base_fingerprint(base_spec), ckpt, cfg)
    key = build_key(inputs)
    if not force and inputs["base_fingerprint"] is not None:
        old = reusable(out_dir, key)
        if old is not None:
            progress(f"reusing {out_dir}: same base, checkpoint, options and software as its manifest")
            return ExportResult(out_dir, old, reused=True, seconds=time.perf_counter() - t0)

    progress(f"loading base {base_spec}")
    base = load_base(base_spec)
    validate_checkpoint(ckpt, base)
    if inputs["base_fingerprint"] is None:  # e.g. a hub id fetched just now
        inputs["base_fingerprint"] = base.fingerprint
        key = build_key(inputs)
    from dfosd.core.onestep import build_onestep
    from dfosd.export.onnx_export import clear_stale, export_part

    model = build_onestep(base, ckpt, dtype=_torch_dtype(cfg.precision))
    components, files = {}, {}
    for batch in cfg.batches:
        geo = Geometry(tile=cfg.tile, batch=batch, upscale=ckpt.metadata.upscale,
                       vae_scale_factor=base.vae_scale_factor, latent_channels=base.latent_channels)
        for name, contract in component_contracts(geo).items():
            t = time.perf_counter()
            progress(f"exporting {contract.stem} ({cfg.precision})")
            info = export_part(model.part(name), contract, out_dir / f"{contract.stem}.onnx", opset=cfg.opset)
            for f in info["files"]:
                files[f] = file_record(out_dir / f)
            components[contract.stem] = {"component": name, "batch": batch, "onnx": f"{contract.stem}.onnx",
                                         "contract": contract.to_dict(), "export_seconds":
                                         round(time.perf_counter() - t, 2), **info}
    clear_stale(out_dir, set(files))
    meta = ckpt.metadata
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": "dfosd-export",
        "build_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {**inputs, "checkpoint": str(Path(ckpt_path).resolve())},
        "precision": cfg.precision,
        "tile": cfg.tile,
        "batches": list(cfg.batches),
        "upscale": meta.upscale,
        "timestep": meta.timestep,
        "model": {"cross_attention_dim": base.cross_attention_dim, "vae_scale_factor": base.vae_scale_factor,
                  "latent_channels": base.latent_channels, "scaling_factor": base.scaling_factor,
                  "embedding_tokens": int(ckpt.text_embedding.shape[1])},
        "components": components,
        "files": files,
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return ExportResult(out_dir, manifest, reused=False, seconds=time.perf_counter() - t0)


def components_for_batch(manifest: dict, batch: int) -> dict[str, dict]:
    """The manifest entries of each part for one tile batch."""
    found = {c["component"]: c for c in manifest["components"].values() if c["batch"] == batch}
    if set(found) != set(COMPONENTS):
        have = sorted({c["batch"] for c in manifest["components"].values()})
        raise DfosdError(f"the export has no tile batch {batch} (it has {have})",
                         hint=f"pass --batch {have[0]}, or re-export with --batch {batch}")
    return found
