"""``dfosd parity``: PSNR / max error of exported pipelines vs eager fp32 on held-out photos.

The way to choose ``--quantize``: export one directory per component choice, then

    dfosd parity int8-unet/ int8-vae-dec/ int8-all/ --photos held_out/ --json parity.json

Every directory must come from the same checkpoint and base (the reference is built once
from the first manifest's inputs, or from ``--ckpt`` / ``--base``).
"""

from __future__ import annotations

from pathlib import Path

import click

from dfosd.core.cli_support import say, setup_logging, user_errors


def _reference_inputs(export_dirs: list[Path], base: str | None, ckpt: str | None) -> tuple[str, str, dict]:
    """(base spec, checkpoint path, the first export's manifest) of the eager reference."""
    from dfosd.core.errors import DfosdError
    from dfosd.core.manifest import read_manifest

    manifests = {d: read_manifest(d) for d in export_dirs}
    shas = {m["inputs"]["checkpoint_sha256"] for m in manifests.values()}
    if len(shas) > 1:
        raise DfosdError("the export directories come from different checkpoints: "
                         + ", ".join(f"{d} ({m['inputs']['checkpoint_sha256'][:12]})" for d, m in manifests.items()),
                         hint="compare exports of one checkpoint at a time")
    first = manifests[export_dirs[0]]["inputs"]
    ckpt = ckpt or first["checkpoint"]
    if not Path(ckpt).is_file():
        raise DfosdError(f"checkpoint {ckpt} (recorded in {export_dirs[0]}/manifest.json) is not here",
                         hint="pass --ckpt PATH to the same lora.safetensors")
    return base or first["base"], ckpt, manifests[export_dirs[0]]


@click.command(name="parity", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--photos", required=True, type=click.Path(file_okay=False),
              help="Held-out LR photos (not the calibration folder): every tile of them is compared.")
@click.option("--base", default=None, help="Base of the reference model. [default: the first export's]")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False),
              help="Checkpoint of the reference model. [default: the first export's]")
@click.option("--max-tiles", default=64, show_default=True, type=click.IntRange(min=1),
              help="At most this many tiles of the photos.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write the rows as JSON.")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(export_dirs, photos, base, ckpt, max_tiles, json_path, verbose):
    """Compare exported pipelines (ONNX Runtime, CPU) with eager PyTorch fp32 on held-out photos."""
    setup_logging(verbose)
    from dfosd.bench.parity import format_report, parity_report
    from dfosd.core.bases import load_base
    from dfosd.core.manifest import write_json_atomic
    from dfosd.core.onestep import build_from_model
    from dfosd.core.readers import read_model_as_exported

    dirs = [Path(d) for d in export_dirs]
    base_spec, ckpt_path, first_manifest = _reference_inputs(dirs, base, ckpt)
    say(f"reference: eager PyTorch fp32 of {ckpt_path} on {base_spec}")
    base_model = load_base(base_spec)
    checkpoint = read_model_as_exported(ckpt_path, first_manifest)  # any family, as exported
    reference = build_from_model(base_model, checkpoint).eval()
    labels = {}
    for d in dirs:  # the folder name, made unique
        label = d.resolve().name
        labels[label if label not in labels else str(d)] = d
    rows = parity_report(labels, reference, photos, max_tiles=max_tiles)
    click.echo(format_report(rows))
    if json_path:
        write_json_atomic(Path(json_path), {"reference": "eager PyTorch fp32", "base": base_spec,
                                            "checkpoint": str(ckpt_path), "photos": str(Path(photos).resolve()),
                                            "rows": [r.to_dict() for r in rows]})
        say(f"wrote {json_path}")


if __name__ == "__main__":  # pragma: no cover
    main()
