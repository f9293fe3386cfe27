"""``dfosd-bench``: latency and parity of eager PyTorch vs the exported engines."""

from __future__ import annotations

import click

from dfosd.core.cli_support import say, setup_logging, user_errors
from dfosd.core.vocab import FLOAT_PRECISIONS


@click.command(name="bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", default="synthetic:sd21-base", show_default=True, help="Base model spec.")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False),
              help="Checkpoint; default: a synthetic random one written into --work.")
@click.option("--work", "work_dir", default="dfosd-bench", show_default=True, type=click.Path(file_okay=False),
              help="Where exports are kept (reused across runs).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where bench.json/.md/.png go (default: --work).")
@click.option("--tile", default=128, show_default=True, type=int, help="LR tile (output is x4).")
@click.option("--batch", default=1, show_default=True, type=int, help="Tile batch.")
@click.option("--precisions", default="fp32,fp16", show_default=True,
              help="Exported precisions to time (fp32, fp16, int8, fp8).")
@click.option("--calib-data", default=None, type=click.Path(file_okay=False),
              help="int8/fp8: calibration photos (default: scikit-image photos that are not timed inputs).")
@click.option("--calib-count", default=8, show_default=True, type=int, help="int8/fp8: calibration tiles.")
@click.option("--float-precision", type=click.Choice(FLOAT_PRECISIONS), default="fp32", show_default=True,
              help="int8/fp8: precision of what is not quantized (fp16 pays only on a GPU).")
@click.option("--backends", default="onnxruntime", show_default=True,
              help="Backends to time (comma-separated: onnxruntime, openvino, openvino-bf16, tensorrt, aoti; auto adds the "
                   "per-part best of onnxruntime and openvino, measured per part, as the runtime's auto; "
                   "openvino-bf16 also adds eager PyTorch under bf16 autocast, its eager counterpart).")
@click.option("--warmup", default=1, show_default=True, type=int)
@click.option("--repeats", default=5, show_default=True, type=int)
@click.option("--part-repeats", default=3, show_default=True, type=int,
              help="Timed runs per part and backend behind the per-part row (--backends ...,auto).")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(base, ckpt, work_dir, out_dir, tile, batch, precisions, calib_data, calib_count, float_precision, backends,
         warmup, repeats, part_repeats, verbose):
    """Time eager PyTorch and every available engine on the same weights and inputs."""
    setup_logging(verbose)
    from dfosd.bench.run import BenchConfig, markdown_table, per_part_table, run_bench, write_outputs

    cfg = BenchConfig(base=base, ckpt=ckpt, work_dir=work_dir, tile=tile, batch=batch,
                      precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
                      backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
                      warmup=warmup, repeats=repeats, part_repeats=part_repeats, calib_data=calib_data,
                      calib_count=calib_count,
                      float_precision=float_precision)
    result = run_bench(cfg, say=say)
    paths = write_outputs(result, out_dir or work_dir)
    click.echo(markdown_table(result))
    click.echo(per_part_table(result))
    say("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":  # pragma: no cover
    main()
