"""``dfosd aoti-export``: compile an export's parts into AOTInductor packages for one device."""

from __future__ import annotations

import click

from dfosd.core.cli_support import say, setup_logging, user_errors
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
    """Compile every part and tile batch of an export to <part>_b<batch>.<device>.pt2 (AOTInductor)."""
    setup_logging(verbose)
    from dfosd.engines.base import cuda_available
    from dfosd.engines.aoti_build import export_aoti

    if device is None:
        device = "cuda" if cuda_available() else "cpu"
        say(f"device: {device}")
    result = export_aoti(export_dir, device=device, precision=precision, channels_last=channels_last,
                         max_autotune=max_autotune, force=force, base=base, ckpt=ckpt, progress=say)
    b = result.build
    verb = "reused" if result.reused else "wrote"
    say(f"{verb} {len(b['components'])} AOTInductor packages ({b['precision']}, {device}"
        f"{', channels_last' if b['channels_last'] else ''}, batches {b['batches']}) in {result.export_dir} "
        f"[{result.seconds:.1f} s]; run them with --backend aoti")
    click.echo(str(result.export_dir))


if __name__ == "__main__":  # pragma: no cover
    main()
