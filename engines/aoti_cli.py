"""``dfosd aoti-export``: deprecated alias of ``dfosd build DIR --backend aoti`` (engines/build_cli.py)."""

from __future__ import annotations

import click

from dfosd.core.cli_support import setup_logging, user_errors
from dfosd.core.vocab import FLOAT_PRECISIONS


@click.command(name="aoti-export", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engines", "export_dir", required=True, type=click.Path(file_okay=False),
              help="Export directory written by dfosd-export (its manifest.json gives tile, batches, base, checkpoint).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Device the packages run on; they only load there. [default: cuda when a GPU is visible, else cpu]")
@click.option("--precision", type=click.Choice(FLOAT_PRECISIONS), default=None,
              help="fp16: half-precision networks with fp32 islands and fp32 part boundaries. "
                   "[default: the export's precision (its float precision for int8/fp8)]")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Convert the VAE/UNet conv weights to channels_last before compiling. [default: on for cuda]")
@click.option("--max-autotune", is_flag=True,
              help="Let inductor benchmark GEMM/conv kernels on this GPU (slower build, faster packages).")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False),
              help="The export's checkpoint, when the path in its manifest is not valid here (checked by sha256).")
@click.option("--base", default=None, help="The export's base, when its recorded spec is not valid here.")
@click.option("--force", is_flag=True, help="Rebuild even when the packages are current.")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(export_dir, device, precision, channels_last, max_autotune, ckpt, base, force, verbose):
    """Deprecated alias of `dfosd build DIR --backend aoti` (same options)."""
    setup_logging(verbose)
    from dfosd.engines.build_cli import build, deprecated

    deprecated("dfosd aoti-export --engines DIR", "dfosd build DIR --backend aoti")
    build(export_dir, "aoti", device=device, force=force, precision=precision, channels_last=channels_last,
          max_autotune=max_autotune or None, ckpt=ckpt, base=base)
    click.echo(str(export_dir))


if __name__ == "__main__":  # pragma: no cover
    main()
