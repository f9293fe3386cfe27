"""``dfosd-export``: checkpoint -> ONNX per part (and engines for the chosen backend)."""

from __future__ import annotations

import click

from dfosd.core.cli_support import parse_int_list, say, setup_logging, user_errors
from dfosd.core.vocab import (FAMILY_NAMES, FLOAT_PRECISIONS, PRECISIONS, REFUSED_FAMILY_NAMES,
                              RESSHIFT_FAMILY_NAMES)
from dfosd.engines.base import BACKEND_CHOICES


@click.command(name="export", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", "ckpt", required=True, type=click.Path(),
              help="Checkpoint: DFOSD lora.safetensors, a `dfosd convert` model, osediff.pkl, pisa_sr.pkl, "
                   "HYPIR_sd2.pth, an OMGSR-S folder (unet_lora_adapter/ + vae_encoder_lora_adapter/), a PEFT "
                   "adapter folder, or a diffusers/kohya UNet LoRA (family detected from the keys).")
@click.option("--family", default=None,
              type=click.Choice(FAMILY_NAMES + RESSHIFT_FAMILY_NAMES + REFUSED_FAMILY_NAMES),
              help="Override the family detected from the checkpoint's keys.")
@click.option("--prompt", default=None,
              help="Prompt families: the prompt encoded once into the engine [default: the family's, empty].")
@click.option("--vq", "vq", default=None, type=click.Path(dir_okay=False),
              help="ResShift backbone (SinSR, TAD-SR): the VQ-f4 autoencoder (autoencoder_vq_f4.pth); --ckpt is then "
                   "the UNet file. Writes the three ONNX parts and resshift-export.json (fp32/fp16).")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False),
              help="ResShift backbone: upstream's config YAML (SinSR.yaml, ...) [default: from the keys and the family].")
@click.option("--timestep", default=None, type=click.IntRange(0, 999),
              help="Upstream checkpoints: the fixed timestep baked into the UNet [default: the family's, e.g. "
                   "OMGSR-S 273] (recorded as a deviation when it differs).")
@click.option("--pisa-scales", default=None,
              help="PiSA-SR: LAMBDA_PIX,LAMBDA_SEM builds its adjustable two-pass UNet (two weight sets, two UNet "
                   "calls per tile) instead of merging both LoRA sets.")
@click.option("--base", default=None,
              help="Base model: diffusers dir, hub id, single file, synthetic:tiny or synthetic:sd21-base. "
                   "Default: the checkpoint's base_model (SD-2.1-base for upstream checkpoints).")
@click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="auto", show_default=True,
              help="auto: fp16 where the chosen backend runs it fast (TensorRT, CUDA), fp32 for a CPU (printed "
                   "with the reason). fp16: fp16 graph with fp32 pre/post-processing and x0 step. int8/fp8: "
                   "ModelOpt Q/DQ graphs calibrated on --calib-data (needs dfosd[quant]).")
@click.option("--float-precision", type=click.Choice(FLOAT_PRECISIONS), default=None,
              help="int8/fp8: precision of the parts not quantized and of the ops left in float. [default: fp16]")
@click.option("--calib-data", type=click.Path(exists=True, file_okay=False), default=None,
              help="int8/fp8: folder of LR photos; cut into --tile tiles and run through the pipeline to calibrate. "
                   "fp16: the photos of the range pass that picks fp32 islands (default: scikit-image photos).")
@click.option("--calib-count", default=64, show_default=True, type=int, help="int8/fp8: calibration tiles.")
@click.option("--quantize", "quantize", default="unet,vae-enc,vae-dec", show_default=True,
              help="int8/fp8: parts to quantize, comma-separated (the others stay in --float-precision).")
@click.option("--conv-calibration", type=click.Choice(["percentile", "max"]), default="percentile",
              show_default=True, help="int8/fp8: amax of the Conv inputs (99.99th percentile of |x|, or max).")
@click.option("--out", "out_dir", default="dfosd-engines", show_default=True, type=click.Path(file_okay=False),
              help="Artifact directory (ONNX, manifest, engines).")
@click.option("--tile", default=128, show_default=True, type=int, help="LR tile size in pixels (output x4).")
@click.option("--batch", "batches", default="1", show_default=True,
              help="Tile batch sizes to build, comma-separated (one static-shape set each).")
@click.option("--opset", default=None, type=int,
              help="ONNX opset. [default: 17; 19 for fp8 and for int8 with fp16 floats]")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Engines to prepare: onnxruntime uses the ONNX files; tensorrt also builds plans; openvino "
                   "compiles its cache, openvino-bf16 its bf16 one (auto picks per part at the first run, on the CPU).")
@click.option("--force", is_flag=True, help="Rebuild even when the manifest says the artifacts are current.")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(ckpt, family, prompt, vq, config, timestep, pisa_scales, base, precision, float_precision, calib_data, calib_count, quantize, conv_calibration, out_dir, tile,
         batches, opset, backend, force, verbose):
    """Export a one-step SR checkpoint (DFOSD, OSEDiff, PiSA-SR, HYPIR, OMGSR-S) to static-shape ONNX (and engines)."""
    setup_logging(verbose)
    from dfosd.core.checkpoint import check_checkpoint_exists
    from dfosd.engines.base import auto_precision, select_backend
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.export.ownership import check_out_folder

    # Cheap checks first: options and files, before any heavy import or work.
    def options(precision):
        return ExportConfig.from_options(precision=precision, tile=tile, batches=parse_int_list(batches, "--batch"),
                                         opset=opset, float_precision=float_precision, calib_data=calib_data,
                                         calib_count=calib_count, quantize=quantize, conv_calibration=conv_calibration)

    if vq is not None:  # the second backbone (ResShift, SinSR, TAD-SR): its own export and record
        return _export_resshift(ckpt, vq, config, family, precision, tile, out_dir, verbose)
    cfg = options("fp32" if precision == "auto" else precision)  # the options are checked either way
    check_checkpoint_exists(ckpt)
    check_out_folder(out_dir)
    if cfg.quant is not None:
        from dfosd.calibration.recipe import require_modelopt

        require_modelopt()
    scales = None
    if pisa_scales is not None:
        try:
            scales = tuple(float(v) for v in pisa_scales.split(","))
        except ValueError:
            scales = ()
        if len(scales) != 2:
            raise click.BadParameter(f"{pisa_scales!r}: give two numbers, e.g. 1.0,0.5", param_hint="--pisa-scales")
    backend_cls, why = select_backend(backend)
    say(why)
    if precision == "auto":
        precision, reason = auto_precision(backend_cls)
        say(f"precision auto: {precision}, because {reason}")
        cfg = options(precision)
    result = export_checkpoint(ckpt, base, out_dir, cfg, force=force, progress=say, family=family, prompt=prompt,
                               pisa_scales=scales, timestep=timestep)
    from dfosd.core.manifest import ExportDir

    export = ExportDir(result.out_dir, check="none")  # just written and hashed by the exporter
    if base is None:
        say(f"base: {export.inputs.get('base')} (from the checkpoint's metadata)")
    if backend_cls.prepare_on_export:  # plans / compiled caches now, so the first run does not wait
        backend_cls().prepare(export, progress=say)
    verb = "reused" if result.reused else "wrote"
    if cfg.quantize:
        precision = f"{precision} {'+'.join(cfg.quantize)}, {cfg.float_precision} elsewhere"
    say(f"{verb} {len(export.components)} ONNX parts ({precision}, tile {tile}, "
        f"batches {list(cfg.batches)}) in {result.out_dir} [{result.seconds:.1f} s]")
    click.echo(str(result.out_dir))


def _export_resshift(ckpt, vq, config, family, precision, tile, out_dir, verbose):
    from pathlib import Path

    from dfosd.core.errors import DfosdError
    from dfosd.export.resshift_export import RECORD_NAME, export_resshift

    for path, flag in ((ckpt, "--ckpt"), (vq, "--vq")) + (((config, "--config"),) if config else ()):
        if not Path(path).is_file():
            raise DfosdError(f"{flag} {path} does not exist")
    if precision == "auto":
        precision = "fp32"
        say("precision auto: fp32, because the ResShift backbone is exported for ONNX Runtime/OpenVINO here")
    record = export_resshift(ckpt, vq, out_dir, tile=tile, precision=precision, config=config, family=family,
                             progress=say)
    say(f"wrote the 3 ResShift parts ({precision}, LR tile {tile}) and {RECORD_NAME} in {out_dir} "
        f"[{record['seconds']} s]")
    click.echo(str(out_dir))


if __name__ == "__main__":  # pragma: no cover
    main()
