"""GPU benchmark for one session on the GPU machine: eager, torch.compile and our engines, side by side.

Rows (each at every tile batch of ``--batches``, 512² output tiles with the default tile 128):

- ``eager``: eager PyTorch fp32 (the parity reference) and fp16: the diffusers modules of
  ``core/onestep.py`` as they are (SDPA attention processors), no compilation.
- ``compile``: ``torch.compile(mode="max-autotune")`` of the eager fp16 pipeline (the
  whole ``OneStepSR``; max-autotune includes inductor's CUDA graphs). Compile time is
  reported; only at ``--compile-batches`` (default 1) because each shape recompiles.
- ``aoti``: our AOTInductor packages (``engines/aoti_build.py``) run by ``OneStepRunner``:
  fp16, the whole chain in ONE CUDA graph, and the same packages without the graph.
- ``onnxruntime``: ``OneStepRunner`` on the fp16 ONNX export, only when onnxruntime's
  CUDA execution provider is present (onnxruntime-gpu); otherwise a skipped row says why.
- ``tiled``: a ``--tiled-size``² output (default 2048²) through ``runtime.tiling.upscale_tiled``
  at the largest batch, with eager fp16 and with the AOTI graph runner, against the same
  tiling run with eager fp32.

Every timing is wall clock from uint8 tiles on the CPU to the uint8 image on the CPU
(host<->device copies included, as a caller sees it), after ``--warmup`` runs: median,
p90, images/s and megapixels/s. Memory: ``peak_alloc_mib`` is torch's allocator peak
during the timed runs (weights included; AOTInductor allocates its weights outside
torch's allocator, so it misses them), ``device_mib`` is what the process holds on the
GPU after them above the baseline after CUDA start-up (``cudaMemGetInfo``: torch's
reserved pool plus memory allocated outside torch). Parity: PSNR and max abs diff
against eager fp32 on the same inputs. Per-component times (encoder/unet/decoder, each
part alone, synchronised) for the engine runners and eager fp16; the report names the
fastest engine's.

Results accumulate in ``<out>/gpu_bench.json`` (rows keyed by id), so a session can run
the rows in several commands (each under the device's 10-minute limit) and every command
rewrites ``gpu_bench.md`` and ``gpu_bench.png`` from everything measured so far;
``--merge a.json b.json --out DIR`` joins results brought back from separate machines.
``--time-budget-s`` stops starting new rows once spent, so a command ends in time.

Exports for the AOTI rows are *contracts-only* unless ONNX is needed for onnxruntime:
the full-size ONNX export (trace, fold, write 3.5 GB per UNet, per batch) costs minutes
of GPU-machine time and AOTInductor does not read it; see ``gpu_harness.contracts_only_export``.

Modules: this one (command line), ``gpu_config`` (configuration), ``gpu_harness`` (shared state: base,
eager models, references, AOTI builds), ``gpu_rows`` (the rows), ``gpu_report`` (JSON,
Markdown, plot); measuring and result files are shared with ``dfosd bench`` through
``measure`` and ``results``.

CPU smoke test (tiny model; on our shared 2-core machine eager+aoti+onnxruntime took 5 min,
mostly compiling the AOTI packages, and adding the 256² tiled row made it 25 min)::

    python -m dfosd.bench.gpu_bench --base synthetic:tiny --tile 32 --batches 1 \\
        --rows eager,aoti,onnxruntime --warmup 1 --repeats 3 --work /tmp/gb

``dfosd gpu-bench`` is the same command.
"""

from __future__ import annotations

import click

from dfosd.bench.gpu_config import ROW_KINDS, GpuBenchConfig
from dfosd.core.cli_support import parse_int_list, say, setup_logging, user_errors
from dfosd.core.vocab import FLOAT_PRECISIONS

@click.command(name="gpu-bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", default="synthetic:sd21-base", show_default=True, help="Base model spec.")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False),
              help="Checkpoint; default: a seeded random one in --work.")
@click.option("--work", "work_dir", default=".gpu-bench", show_default=True, type=click.Path(file_okay=False),
              help="Exports, packages, references (reused across commands).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="gpu_bench.json/.md/.png (default: WORK/results; with --merge: the current folder).")
@click.option("--tile", default=128, show_default=True, type=int, help="LR tile (output x4).")
@click.option("--batches", default="1,4,8", show_default=True, help="Tile batches, comma-separated.")
@click.option("--rows", default=",".join(ROW_KINDS), show_default=True, help="Row kinds to run, comma-separated.")
@click.option("--compile-batches", default="1", show_default=True)
@click.option("--compile-mode", default="max-autotune", show_default=True)
@click.option("--aoti-precision", type=click.Choice(FLOAT_PRECISIONS), default=None,
              help="Default: fp16 on CUDA, fp32 on the CPU.")
@click.option("--aoti-max-autotune", is_flag=True)
@click.option("--tiled-size", default=2048, show_default=True, type=int, help="Output side of the tiled row.")
@click.option("--tiled-overlap", default=None, type=int, help="LR pixels (default tile/8).")
@click.option("--warmup", default=3, show_default=True, type=int)
@click.option("--repeats", default=20, show_default=True, type=int)
@click.option("--tiled-repeats", default=5, show_default=True, type=int)
@click.option("--component-repeats", default=10, show_default=True, type=int)
@click.option("--time-budget-s", default=0.0, show_default=True, type=float,
              help="Start no new row after this many seconds (0: no limit).")
@click.option("--merge", is_flag=True, help="Only merge the gpu_bench.json files given as arguments into --out.")
@click.argument("merge_files", nargs=-1, type=click.Path(dir_okay=False, exists=True))
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(base, ckpt, work_dir, out_dir, tile, batches, rows, compile_batches, compile_mode, aoti_precision,
         aoti_max_autotune, tiled_size, tiled_overlap, warmup, repeats, tiled_repeats, component_repeats,
         time_budget_s, merge, merge_files, verbose):
    """GPU benchmark: eager, torch.compile and our engines side by side (rows accumulate across commands)."""
    import json
    from pathlib import Path

    setup_logging(verbose)
    if merge_files and not merge:
        raise click.UsageError("JSON files are arguments of --merge only")
    if merge:
        from dfosd.bench.gpu_report import merge_results, write_results

        paths = write_results(merge_results([Path(x) for x in merge_files]), Path(out_dir or "."))
        say("wrote " + ", ".join(str(p) for p in paths.values()))
        return
    from dfosd.bench.gpu_harness import GpuBench
    from dfosd.bench.gpu_report import markdown_report

    cfg = GpuBenchConfig(base=base, ckpt=ckpt, work_dir=work_dir, out_dir=out_dir, tile=tile,
                         batches=parse_int_list(batches, "--batches"),
                         rows=tuple(r.strip() for r in rows.split(",") if r.strip()),
                         compile_batches=parse_int_list(compile_batches, "--compile-batches"),
                         compile_mode=compile_mode, aoti_precision=aoti_precision,
                         aoti_max_autotune=aoti_max_autotune, tiled_size=tiled_size, tiled_overlap=tiled_overlap,
                         warmup=warmup, repeats=repeats, tiled_repeats=tiled_repeats,
                         component_repeats=component_repeats, time_budget_s=time_budget_s)
    bench = GpuBench(cfg, say)
    say(f"machine: {json.dumps(bench.result['machine'])}")
    bench.run()
    click.echo(markdown_report(bench.result))
    say(f"results in {bench.out}")


if __name__ == "__main__":  # pragma: no cover
    main()
