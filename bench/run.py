"""``dfosd-bench``: eager PyTorch vs every available engine, same weights, same inputs.

Rows: eager fp32 (the parity reference), eager fp16 on a GPU, then each exported
precision through each usable backend. Each row: median and p90 latency of one tile
batch after warm-up, images/s, and parity against eager fp32 (PSNR, max abs diff).
Outputs: a Markdown table, JSON, and a PNG plot.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dfosd.core.errors import DfosdError
from dfosd.core.vocab import FLOAT_PRECISIONS, PRECISIONS, QUANT_PRECISIONS

if TYPE_CHECKING:
    from dfosd.export.artifacts import ExportConfig


@dataclass(frozen=True)
class BenchConfig:
    base: str = "synthetic:sd21-base"
    ckpt: str | None = None
    work_dir: str = "dfosd-bench"
    tile: int = 128
    batch: int = 1
    precisions: tuple[str, ...] = ("fp32", "fp16")
    backends: tuple[str, ...] = ("onnxruntime",)
    warmup: int = 1
    repeats: int = 5
    # int8/fp8 rows: calibration photos (default: scikit-image photos held out from the timed
    # inputs, written into the work dir), tile count, and the precision of what stays float.
    calib_data: str | None = None
    calib_count: int = 8
    float_precision: str = "fp32"

    def __post_init__(self):
        problems = []
        if self.repeats < 1 or self.warmup < 0:
            problems.append("--repeats must be >= 1 and --warmup >= 0")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            problems.append(f"--precisions {','.join(bad)}: choose from {', '.join(PRECISIONS)}")
        if self.float_precision not in FLOAT_PRECISIONS:
            problems.append(f"--float-precision {self.float_precision!r}: choose one of {', '.join(FLOAT_PRECISIONS)}")
        if problems:
            raise DfosdError("; ".join(problems))

    def export_config(self, precision: str, calib_dir: Path | None) -> "ExportConfig":
        from dfosd.export.artifacts import ExportConfig

        if precision in QUANT_PRECISIONS:
            return ExportConfig.from_options(precision=precision, tile=self.tile, batches=(self.batch,),
                                             float_precision=self.float_precision, calib_data=str(calib_dir),
                                             calib_count=self.calib_count)
        return ExportConfig(precision=precision, tile=self.tile, batches=(self.batch,))


@dataclass
class Row:
    name: str
    backend: str
    precision: str
    device: str
    median_ms: float
    p90_ms: float
    images_per_s: float
    psnr_db: float | None
    max_abs_diff: float | None
    runs_ms: list[float] = field(default_factory=list)


BENCH_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
# Calibration photos for the 8-bit rows: real photographs, none of them a timed input.
CALIB_PHOTOS = ("immunohistochemistry", "hubble_deep_field", "retina", "coins", "page")


def write_calibration_photos(folder: Path, lr_side: int) -> Path:
    """scikit-image photos held out from the timed inputs, at about LR size (PNG)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in CALIB_PHOTOS:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = 2 * lr_side / min(img.size)  # short side = two LR tiles: >= 4 calibration tiles each
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        target = folder / f"{name}.png"
        if not target.exists():
            tmp = folder / f".{name}.tmp.png"
            img.save(tmp)
            tmp.replace(target)
    return folder


def bench_inputs(tile: int, batch: int):
    """LR tiles cut from real photographs that scikit-image ships (no download)."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    photos = [getattr(data, name)() for name in BENCH_PHOTOS]
    tiles = []
    for i in range(batch):
        img = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        side = min(img.size)
        img = img.crop((0, 0, side, side)).resize((tile, tile), Image.BICUBIC)
        tiles.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(tiles).contiguous()


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = print) -> dict:
    import torch

    from dfosd.bench.measure import time_runs
    from dfosd.bench.results import machine_description
    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import write_random_checkpoint
    from dfosd.core.metrics import max_abs_diff, psnr_uint8
    from dfosd.core.onestep import build_from_model
    from dfosd.core.readers import read_model
    from dfosd.export.artifacts import export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    say(f"loading base {cfg.base}")
    base = load_base(cfg.base)
    ckpt_path = Path(cfg.ckpt) if cfg.ckpt else work / "lora.safetensors"
    if not cfg.ckpt and not ckpt_path.exists():
        write_random_checkpoint(ckpt_path, base, rank=16, alpha=16)
        say(f"wrote a synthetic checkpoint {ckpt_path} (random LoRA: it does not super-resolve)")
    ckpt = read_model(ckpt_path, base_spec=cfg.base, progress=say)  # any family; a prompt is encoded once
    x = bench_inputs(cfg.tile, cfg.batch)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    rows: list[Row] = []

    def add(name, backend, precision, device, timing, out, ref):
        med = timing.median_ms
        rows.append(Row(name, backend, precision, device, round(med, 3), round(timing.p90_ms, 3),
                        round(cfg.batch * 1000.0 / med, 4),
                        None if ref is None else round(psnr_uint8(out, ref), 3),
                        None if ref is None else max_abs_diff(out, ref), [round(t, 3) for t in timing.runs_ms]))
        r = rows[-1]
        say(f"  {name:<28} median {r.median_ms:10.1f} ms  p90 {r.p90_ms:10.1f} ms  "
            f"{r.images_per_s:8.3f} img/s  psnr {r.psnr_db}")

    eager_precisions = ["fp32"] + (["fp16"] if cuda else [])
    ref = None
    for prec in eager_precisions:
        dtype = torch.float32 if prec == "fp32" else torch.float16
        say(f"eager PyTorch {prec} on {dev}")
        model = build_from_model(base, ckpt, dtype=dtype).to(dev)
        xin = x.to(dev)

        def eager():
            with torch.inference_mode():
                return model(xin)

        timing = time_runs(eager, warmup=cfg.warmup, repeats=cfg.repeats)
        out = timing.output.cpu().numpy()
        if ref is None:
            ref = out
        add(f"eager PyTorch {prec}", "torch", prec, dev, timing, out, ref)
        del model
        gc.collect()
    del base  # each export loads its own: two full-size bases at once pushed the fp16 export out of memory
    gc.collect()

    exports = {}
    calib_dir = Path(cfg.calib_data) if cfg.calib_data else None
    for prec in cfg.precisions:
        if prec in QUANT_PRECISIONS and calib_dir is None:
            calib_dir = write_calibration_photos(work / "calibration-photos", cfg.tile)
            say(f"calibration photos (held out from the timed inputs): {calib_dir}")
        say(f"export {prec} (reused when current)")
        res = export_checkpoint(ckpt_path, cfg.base, work / f"onnx-{prec}", cfg.export_config(prec, calib_dir),
                                progress=say)
        exports[prec] = res.out_dir
        gc.collect()
    for backend in cfg.backends:
        for prec, folder in exports.items():
            runner = OneStepRunner(folder, backend=backend, batch=cfg.batch, say=say)
            timing = time_runs(lambda: runner(x), warmup=cfg.warmup, repeats=cfg.repeats)
            add(f"{runner.backend.name} {prec}", runner.backend.name, prec, runner.backend.device, timing,
                timing.output.numpy(), ref)
            del runner
            gc.collect()
    return {
        "machine": machine_description(),
        "config": asdict(cfg),
        "output_shape": list(ref.shape),
        "reference": "eager PyTorch fp32",
        "rows": [asdict(r) for r in rows],
    }


def markdown_table(result: dict) -> str:
    eager = next(r for r in result["rows"] if r["name"] == "eager PyTorch fp32")
    lines = ["| engine | device | median ms | p90 ms | images/s | speed-up vs eager fp32 | PSNR vs eager fp32 (dB) | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        psnr = "reference" if r is eager else ("inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}")
        mad = "" if r is eager else f"{r['max_abs_diff']:.0f}"
        lines.append(f"| {r['name']} | {r['device']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['images_per_s']:.3f} | {eager['median_ms'] / r['median_ms']:.2f}x | {psnr} | {mad} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from dfosd.bench.results import latency_bars, pyplot, save_figure

    rows = result["rows"]
    fig, ax = pyplot().subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    latency_bars(ax, [r["name"] for r in rows], [r["median_ms"] for r in rows], [r["p90_ms"] for r in rows],
                 xlabel="latency per tile batch (ms)")
    m = result["machine"]
    shape = "x".join(map(str, result["output_shape"][-2:]))
    ax.set_title(f"{result['config']['base']}, {shape} output, batch {result['config']['batch']}\n"
                 f"{m.get('gpu') or m['cpu']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    """bench.json, bench.md (machine line + table) and bench.png in ``out_dir``."""
    from dfosd.bench.results import write_result_files

    m = result["machine"]
    header = (f"Machine: {m.get('gpu') or m['cpu']} ({m['cpu_count']} cores, torch {m['torch']}, "
              f"{m['torch_threads']} threads). Output {result['output_shape']}, warm-up "
              f"{result['config']['warmup']}, {result['config']['repeats']} timed runs.\n\n")
    return write_result_files(result, out_dir, "bench", header + markdown_table(result), plot)


def load_result(path: Path) -> dict:
    return json.loads(Path(path).read_text())
