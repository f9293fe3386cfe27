"""Full-size OSEDiff-layout checkpoint: convert (and, with --export, export fp16 and run one tile).

    python -m dfosd.bench.fullsize_family WORK_DIR [--export] [--json out.json]

The checkpoint has the real SD-2.1-base shapes (module names and shapes read from the bundled
configs on PyTorch's meta device, so writing it costs no full model in memory), random values,
and OSEDiff's container: a ``torch.save``d dict with the module lists, ``rank_unet``/``rank_vae``
and peft-named ``state_dict_unet``/``state_dict_vae`` (adapters default_encoder/decoder/others,
``conv_in.base_layer`` retrained whole). Conversion encodes the empty prompt with the base's text
encoder (``synthetic:sd21-base``: the real OpenCLIP-H text tower shape, random weights).
Each stage's wall time and the process's peak RSS go to the JSON.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import click

from dfosd.core.cli_support import say, user_errors

BASE = "synthetic:sd21-base"
RANK = 4
UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                 "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _lora(mod, gen):
    import torch
    from torch import nn

    if isinstance(mod, nn.Linear):
        a, b = (RANK, mod.in_features), (mod.out_features, RANK)
    else:
        a, b = (RANK, mod.in_channels, *mod.kernel_size), (mod.out_channels, RANK, 1, 1)
    return torch.randn(a, generator=gen) * 0.01, torch.randn(b, generator=gen) * 0.01


def write_osediff_layout(path: Path) -> dict:
    """OSEDiff's container and names at full size (module selection: OSEDiff's osediff.py rules)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dfosd.core.bases import CONFIG_ROOT

    cfg = lambda n: json.loads((CONFIG_ROOT / "sd21-base" / n).read_text())  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg("unet.json"))
        vae = AutoencoderKL.from_config(cfg("vae.json"))
    gen = torch.Generator().manual_seed(0)
    groups = {"encoder": [], "decoder": [], "others": []}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(p in name for p in UNET_PATTERNS):
            continue
        kind = "encoder" if ("down_blocks" in name or "conv_in" in name) else \
            "decoder" if ("up_blocks" in name or "conv_out" in name) else "others"
        groups[kind].append(name.replace(".weight", ""))
    modules = dict(unet.named_modules())
    sd_unet = {}
    for kind, names in groups.items():
        for m in names:
            a, b = _lora(modules[m], gen)
            sd_unet[f"{m}.lora_A.default_{kind}.weight"], sd_unet[f"{m}.lora_B.default_{kind}.weight"] = a, b
    sd_unet["conv_in.base_layer.weight"] = torch.randn(tuple(unet.conv_in.weight.shape), generator=gen) * 0.05
    sd_unet["conv_in.base_layer.bias"] = torch.zeros(tuple(unet.conv_in.bias.shape))
    vae_list = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for p in VAE_PATTERNS:  # no break: OSEDiff's VAE list repeats a module once per matching pattern
            if (p in name and "encoder" in name) or ("quant_conv" in name and "post_quant_conv" not in name):
                vae_list.append(name.replace(".weight", ""))
    vmods = dict(vae.named_modules())
    sd_vae = {}
    for m in dict.fromkeys(vae_list):
        a, b = _lora(vmods[m], gen)
        sd_vae[f"{m}.lora_A.default_encoder.weight"], sd_vae[f"{m}.lora_B.default_encoder.weight"] = a, b
    torch.save({"vae_lora_encoder_modules": vae_list, "unet_lora_encoder_modules": groups["encoder"],
                "unet_lora_decoder_modules": groups["decoder"], "unet_lora_others_modules": groups["others"],
                "rank_unet": RANK, "rank_vae": RANK, "state_dict_unet": sd_unet, "state_dict_vae": sd_vae}, path)
    return {"unet_lora_layers": sum(len(v) for v in groups.values()), "vae_lora_layers": len(sd_vae) // 2,
            "vae_list_entries": len(vae_list), "bytes": path.stat().st_size}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("work_dir", type=click.Path(file_okay=False))
@click.option("--export", "do_export", is_flag=True, help="Also export fp16 and run one tile (10-17 GB RAM).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
@user_errors
def main(work_dir, do_export, json_path):
    from dfosd.core.manifest import write_json_atomic
    from dfosd.core.readers import read_model
    from dfosd.core.srmodel import write_model

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"base": BASE}
    t = time.perf_counter()
    record["checkpoint"] = write_osediff_layout(work / "osediff.pkl")
    record["write_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    model = read_model(work / "osediff.pkl", base_spec=BASE, progress=say)
    write_model(work / "osediff.safetensors", model)
    record["convert_s"] = round(time.perf_counter() - t, 2)
    record["peak_rss_gb_after_convert"] = round(_peak_gb(), 2)
    say(f"converted in {record['convert_s']} s: {record['checkpoint']}")
    if do_export:
        import numpy as np

        from dfosd.export.artifacts import ExportConfig, export_checkpoint
        from dfosd.runtime.step import OneStepRunner

        del model
        t = time.perf_counter()
        res = export_checkpoint(work / "osediff.safetensors", BASE, work / "engines",
                                ExportConfig(precision="fp16", tile=64, batches=(1,)), progress=say)
        record["export_s"] = round(time.perf_counter() - t, 2)
        record["export_parts_s"] = {k: v["export_seconds"] for k, v in res.manifest["components"].items()}
        t = time.perf_counter()
        lr = np.random.default_rng(0).integers(0, 256, (1, 3, 64, 64)).astype(np.uint8)
        import torch

        out = OneStepRunner(res.out_dir, backend="onnxruntime", batch=1)(torch.from_numpy(lr))
        record["one_tile_s"] = round(time.perf_counter() - t, 2)
        record["output_shape"] = list(out.shape)
        record["peak_rss_gb"] = round(_peak_gb(), 2)
    click.echo(json.dumps(record, indent=2))
    if json_path:
        write_json_atomic(Path(json_path), record)


if __name__ == "__main__":  # pragma: no cover
    main()
