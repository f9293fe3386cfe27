"""Full-size ResShift/SinSR (the released architecture, seeded random weights): write upstream-layout
files, read them back, export the three parts (fp32, fp16) at one LR tile, and time eager PyTorch
against ONNX Runtime and OpenVINO in interleaved rounds (medians), with each engine's PSNR vs eager.

    python -m dfosd.bench.resshift_bench --out DIR [--tile 64] [--rounds 3]

Writes DIR/resshift_bench.json and prints a Markdown table. Random weights: the timings and the
agreement with eager are real; the pictures are not super-resolved.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click


def _write_release(folder: Path, seed: int) -> tuple[Path, Path]:
    import torch

    from dfosd.core.resshift import RELEASED_UNET, RELEASED_VQ
    from dfosd.core.resshift_unet import SwinUNet
    from dfosd.core.resshift_vq import VQAutoencoder

    torch.manual_seed(seed)
    unet, vq = SwinUNet(RELEASED_UNET), VQAutoencoder(RELEASED_VQ)
    with torch.no_grad():  # upstream zero-inits the last convs: draw them too, so every path carries signal
        for name, p in unet.named_parameters():
            if not p.any():
                p.normal_(0, 0.02)
    ckpt, vq_path = folder / "SinSR_v1.pth", folder / "autoencoder_vq_f4.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in unet.state_dict().items()}}, ckpt)
    torch.save(vq.state_dict(), vq_path)
    return ckpt, vq_path


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--tile", default=64, show_default=True, type=int, help="LR tile (a multiple of 64 for the released UNet).")
@click.option("--rounds", default=3, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
def main(out_dir, tile, rounds, threads):
    import numpy as np
    import onnxruntime as ort
    import torch

    from dfosd.core.metrics import psnr_uint8
    from dfosd.core.onestep import to_uint8
    from dfosd.core.resshift_parts import NOISE, check_tile, resshift_contracts, resshift_parts
    from dfosd.core.resshift_reader import read_resshift
    from dfosd.core.vocab import DENOISED, LATENT, LR_IMAGE
    from dfosd.engines.machine import cpu_model
    from dfosd.export.onnx_export import export_part

    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, vq = _write_release(out, 0)
    t0 = time.perf_counter()
    loaded = read_resshift(ckpt, vq, progress=click.echo)
    read_s = time.perf_counter() - t0
    model = loaded.model
    check_tile(model, tile)
    parts, contracts = resshift_parts(model), resshift_contracts(tile)
    export_s = {}
    for precision in ("fp32", "fp16"):
        t0 = time.perf_counter()
        for name, part in parts.items():
            export_part(part, contracts[name], out / precision / f"{name}.onnx", precision=precision)
        export_s[precision] = round(time.perf_counter() - t0, 1)
        click.echo(f"exported {precision} in {export_s[precision]} s")
    g = torch.Generator().manual_seed(1)
    lr = (torch.nn.functional.interpolate(torch.rand(1, 3, tile // 8, tile // 8, generator=g), size=(tile, tile),
                                          mode="bicubic").clamp(0, 1) * 255).round().to(torch.uint8)
    noise = torch.randn(1, 3, tile, tile, generator=g)

    def eager():
        with torch.no_grad():
            return to_uint8(model(lr, noise)).numpy()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    runners = {"eager PyTorch fp32": eager}
    for precision in ("fp32", "fp16"):
        sess = {n: ort.InferenceSession(str(out / precision / f"{n}.onnx"), opts, providers=["CPUExecutionProvider"])
                for n in parts}
        runners[f"ONNX Runtime {precision}"] = _chain(lambda n, f, s=sess: s[n].run(None, f)[0], lr, noise,
                                                       (LR_IMAGE, LATENT, NOISE, DENOISED))
    try:
        import openvino as ov

        core = ov.Core()
        comp = {n: core.compile_model(str(out / "fp32" / f"{n}.onnx"), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}) for n in parts}
        runners["OpenVINO fp32"] = _chain(lambda n, f, c=comp: next(iter(c[n](f).values())), lr, noise,
                                          (LR_IMAGE, LATENT, NOISE, DENOISED))
    except ImportError:
        click.echo("OpenVINO not installed: its row is left out")
    times = {k: [] for k in runners}
    outputs = {}
    names = list(runners)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # order rotated each round
            t0 = time.perf_counter()
            outputs[k] = runners[k]()
            times[k].append(time.perf_counter() - t0)
    ref = outputs["eager PyTorch fp32"].astype(np.float32)
    rows = []
    for k in names:
        med = statistics.median(times[k])
        rows.append({"candidate": k, "median_s": round(med, 3), "runs_s": [round(t, 3) for t in times[k]],
                     "speedup_vs_eager": round(statistics.median(times["eager PyTorch fp32"]) / med, 2),
                     "psnr_vs_eager_db": None if k.startswith("eager") else round(psnr_uint8(outputs[k].astype(np.float32), ref), 2)})
    result = {"what": "SinSR full-size architecture (random weights), one LR tile, one step", "tile": tile,
              "sr_tile": tile * 4, "rounds": rounds, "threads": threads, "cpu": cpu_model(),
              "torch": torch.__version__, "onnxruntime": ort.__version__, "read_s": round(read_s, 1),
              "export_s": export_s, "rows": rows,
              "parameters": {"unet": sum(p.numel() for p in model.unet.parameters()),
                             "vq": sum(p.numel() for p in model.vq.parameters())}}
    (out / "resshift_bench.json").write_text(json.dumps(result, indent=1))
    click.echo("| candidate | median s | runs s | speed-up vs eager | PSNR vs eager dB |\n|---|---|---|---|---|")
    for row in rows:
        click.echo(f"| {row['candidate']} | {row['median_s']} | {row['runs_s']} | {row['speedup_vs_eager']} | "
                   f"{row['psnr_vs_eager_db'] if row['psnr_vs_eager_db'] is not None else '—'} |")


def _chain(run, lr, noise, names):
    lr_name, lat_name, noise_name, den_name = names
    lr_np, noise_np = lr.numpy(), noise.numpy()

    def go():
        latent = run("encoder", {lr_name: lr_np})
        den = run("unet", {lat_name: latent, noise_name: noise_np, lr_name: lr_np})
        return run("decoder", {den_name: den})
    return go


if __name__ == "__main__":  # pragma: no cover
    main()
