"""``dfosd-export --ckpt SinSR_v1.pth --vq autoencoder_vq_f4.pth``: the ResShift backbone's three ONNX parts.

Writes ``encoder.onnx``, ``unet.onnx`` (inputs: latent, noise, lr_image), ``decoder.onnx`` and a record,
``resshift-export.json`` (kind ``dfosd-resshift-export``: family, schedule, tile, contracts, file hashes,
inputs, deviations), into a new or empty folder, or over an earlier ResShift export of the folder (only the
files its record lists are replaced). Its own record, not ``manifest.json``: ``dfosd-trt-run`` recognises it
(``resshift_record``) and runs it with the noise field (runtime/resshift_run.py); serving, the C++ runner
and the SD-family engine loaders do not run this backbone yet, and refuse the folder (no dfosd manifest)
instead of feeding a UNet that wants noise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from dfosd.core.errors import DfosdError

RECORD_NAME = "resshift-export.json"
RECORD_KIND = "dfosd-resshift-export"
PART_FILES = ("encoder.onnx", "unet.onnx", "decoder.onnx")
DEVIATIONS = (
    "UNet and autoencoder in the export's precision (upstream's inference.py: fp16 UNet torso, fp16 autoencoder)",
    "dfosd's tiling and blending instead of upstream's 512 px chops (stride 448) and padding to 64",
    "one noise field per image (seeded or given) sliced per tile instead of torch.randn per chop",
)


def resshift_record(folder: str | Path) -> dict | None:
    """The folder's ResShift export record, or None when the folder holds no such record (an SD export,
    or no export): cheap and torch-free, so ``dfosd-trt-run`` can say which kind of export it was given
    before any model is loaded. A record that is there but unreadable is an error naming the fix."""
    from dfosd.core.vocab import MANIFEST_NAME

    folder = Path(folder)
    path = folder / RECORD_NAME
    if not path.is_file() or (folder / MANIFEST_NAME).exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DfosdError(f"{path}: not readable ({exc})", hint="export again with dfosd-export --vq") from None
    if not isinstance(record, dict) or record.get("kind") != RECORD_KIND or not isinstance(record.get("files"), dict):
        raise DfosdError(f"{path}: not a ResShift export record", hint="export again with dfosd-export --vq")
    return record


def _owned(out_dir: Path) -> set[str]:
    """Files an earlier ResShift export of ``out_dir`` wrote; a foreign non-empty folder is refused."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DfosdError(f"--out {out_dir} is a file, not a folder", hint="pass a new or empty folder as --out")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return set()
    try:
        record = json.loads((out_dir / RECORD_NAME).read_text())
        if record.get("kind") == RECORD_KIND:
            return set(record.get("files", {})) | {RECORD_NAME}
    except (OSError, ValueError, AttributeError):
        pass
    raise DfosdError(f"--out {out_dir} is not empty and is not a ResShift export (no {RECORD_NAME}); dfosd only "
                     "writes into a new or empty folder or an earlier export of its own",
                     hint="pass a new or empty folder as --out")


def export_resshift(ckpt: str | Path, vq: str | Path, out_dir: str | Path, *, tile: int, precision: str = "fp32",
                    config: str | Path | None = None, family: str | None = None, opset: int = 17,
                    progress: Callable[[str], None] = lambda msg: None) -> dict:
    from dfosd.core.atomic import write_json_atomic
    from dfosd.core.manifest import file_record, sha256_file
    from dfosd.core.resshift_parts import check_tile, resshift_contracts, resshift_parts
    from dfosd.core.resshift_reader import read_resshift
    from dfosd.export.onnx_export import export_part
    from dfosd.export.ownership import check_out_folder

    if precision not in ("fp32", "fp16"):
        raise DfosdError(f"--precision {precision}: the ResShift backbone exports fp32 or fp16 (8-bit not yet)")
    out_dir = Path(out_dir)
    check_out_folder(out_dir)
    owned = _owned(out_dir)
    foreign = [n for n in PART_FILES + (RECORD_NAME,) if (out_dir / n).exists() and n not in owned]
    if foreign:
        raise DfosdError(f"--out {out_dir} holds {', '.join(foreign)}, which no earlier export of the folder wrote")
    t0 = time.perf_counter()
    loaded = read_resshift(ckpt, vq, config=config, family=family, progress=progress)
    check_tile(loaded.model, tile)
    parts, contracts = resshift_parts(loaded.model), resshift_contracts(tile)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RECORD_NAME).unlink(missing_ok=True)  # no record while the parts are being replaced
    files = {}
    for name, part in parts.items():
        progress(f"exporting {name} ({precision}, LR tile {tile})")
        info = export_part(part, contracts[name], out_dir / f"{name}.onnx", opset=opset, precision=precision)
        for f in info["files"]:
            files[f] = file_record(out_dir / f)
    s = loaded.schedule
    record = {
        "kind": RECORD_KIND, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backbone": "resshift",
        "family": loaded.family, "detected": loaded.reason, "precision": precision, "tile": tile, "upscale": 4,
        "tile_multiple": loaded.model.unet.cfg.tile_multiple, "window_size": loaded.model.unet.cfg.window_size,
        "latent_channels": loaded.model.vq.cfg.embed_dim, "timestep": loaded.model.timestep,
        "schedule": {"steps": s.steps, "min_noise_level": s.min_noise_level, "kappa": s.kappa, "power": s.power,
                     "etas_end": s.etas_end, "noise_scale": loaded.model.noise_scale,
                     "input_scale": loaded.model.input_scale},
        "contracts": {n: c.to_dict() for n, c in contracts.items()},
        "inputs": {"checkpoint": str(Path(ckpt).resolve()), "checkpoint_sha256": sha256_file(Path(ckpt)),
                   "vq": str(Path(vq).resolve()), "vq_sha256": sha256_file(Path(vq)),
                   "config": None if config is None else str(Path(config).resolve())},
        "deviations": list(DEVIATIONS), "files": files, "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out_dir / RECORD_NAME, record)
    return record
