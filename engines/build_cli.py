"""``dfosd build DIR --backend X``: build what one backend runs from an export, ahead of the first run.

One command for every backend (``Backend.prepare``): TensorRT plans, OpenVINO's compiled
blobs, ONNX Runtime's optimized graphs, AOTInductor packages. The older per-backend
commands (``dfosd aoti-export``, ``python -m dfosd.engines.tensorrt_build``) are aliases
of it until ``ALIASES_END``.
"""

from __future__ import annotations

import click

from dfosd.core.cli_support import say, setup_logging, user_errors
from dfosd.core.vocab import FLOAT_PRECISIONS
from dfosd.engines.base import BACKENDS

ALIASES_END = "2027-06-30"  # the last day the deprecated build commands are kept


def deprecated(old: str, new: str) -> None:
    click.echo(f"warning: `{old}` is deprecated and goes after {ALIASES_END}: use `{new}`", err=True)


def build(export_dir: str, backend: str, *, device: str | None = None, force: bool = False, **options) -> None:
    """Check cheaply, then prepare ``backend`` for the export (the CLI and its aliases)."""
    from dfosd.core.manifest import ExportDir
    from dfosd.engines.base import select_backend

    export = ExportDir(export_dir)  # a missing or damaged export is refused before any backend import
    cls, why = select_backend(backend)
    say(why)
    instance = cls() if device is None else cls(device)
    instance.prepare(export, progress=say, force=force, **options)


@click.command(name="build", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--backend", required=True, type=click.Choice(BACKENDS),
              help="tensorrt: plans; openvino / openvino-bf16: compiled blobs; onnxruntime: optimized graphs (CPU); "
                   "aoti: AOTInductor packages.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="onnxruntime / aoti: the device to build for. [default: cuda when usable, else cpu]")
@click.option("--force", is_flag=True, help="Rebuild even what is current.")
@click.option("--workspace-gib", type=float, default=None, help="tensorrt: builder workspace pool limit. [default: 8]")
@click.option("--precision", type=click.Choice(FLOAT_PRECISIONS), default=None,
              help="aoti: fp16 or fp32 networks. [default: the export's (its float precision for int8/fp8)]")
@click.option("--channels-last/--no-channels-last", default=None,
              help="aoti: channels_last conv weights. [default: on for cuda]")
@click.option("--max-autotune", is_flag=True, default=None,
              help="aoti: let inductor benchmark GEMM/conv kernels on this GPU (slower build, faster packages).")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False),
              help="aoti: the export's checkpoint, when the path in its manifest is not valid here (checked by sha256).")
@click.option("--base", default=None, help="aoti: the export's base, when its recorded spec is not valid here.")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(export_dir, backend, device, force, workspace_gib, precision, channels_last, max_autotune, ckpt, base,
         verbose):
    """Build what --backend runs from EXPORT_DIR (written by dfosd-export) now, instead of at the first run."""
    setup_logging(verbose)
    build(export_dir, backend, device=device, force=force, workspace_gib=workspace_gib, precision=precision,
          channels_last=channels_last, max_autotune=max_autotune or None, ckpt=ckpt, base=base)
    click.echo(str(export_dir))


if __name__ == "__main__":  # pragma: no cover
    main()
