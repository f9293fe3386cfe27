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
    part_repeats: int = 3  # per-part timing of the "auto" row's choice (after one warm-up run)
    # int8/fp8 rows: calibration photos (default: scikit-image photos held out from the timed
    # inputs, written into the work dir), tile count, and the precision of what stays float.
    calib_data: str | None = None
    calib_count: int = 8
    float_precision: str = "fp32"

    def __post_init__(self):
        problems = []
        if self.repeats < 1 or self.warmup < 0 or self.part_repeats < 1:
            problems.append("--repeats and --part-repeats must be >= 1 and --warmup >= 0")
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
    min_ms: float | None = None
    max_ms: float | None = None
    vs_eager: float | None = None  # median of per-round eager/this ratios
    vs_openvino: float | None = None  # the same against OpenVINO alone, same precision


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
    """All engines are loaded first, then timed round-robin (see measure.time_interleaved)."""
    import torch

    from dfosd.bench.measure import device_sync, paired_ratio, time_interleaved
    from dfosd.bench.results import machine_description
    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import read_checkpoint, write_random_checkpoint
    from dfosd.core.metrics import max_abs_diff, psnr_uint8
    from dfosd.core.onestep import build_onestep

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    say(f"loading base {cfg.base}")
    base = load_base(cfg.base)
    ckpt_path = Path(cfg.ckpt) if cfg.ckpt else work / "lora.safetensors"
    if not cfg.ckpt and not ckpt_path.exists():
        write_random_checkpoint(ckpt_path, base, rank=16, alpha=16)
        say(f"wrote a synthetic checkpoint {ckpt_path} (random LoRA: it does not super-resolve)")
    ckpt = read_checkpoint(ckpt_path)
    x = bench_inputs(cfg.tile, cfg.batch)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    engines: dict[str, dict] = {}  # name -> {fn, out(), backend, precision, device}

    for prec in ["fp32"] + (["fp16"] if cuda else []):
        dtype = torch.float32 if prec == "fp32" else torch.float16
        say(f"eager PyTorch {prec} on {dev}")
        model = build_onestep(base, ckpt, dtype=dtype).to(dev)
        engines[f"eager PyTorch {prec}"] = _eager_entry(model, x.to(dev), prec, dev)
    del base  # each export loads its own: two full-size bases at once pushed the fp16 export out of memory
    gc.collect()
    exports = export_all(cfg, ckpt_path, work, say)
    plans = {}
    for prec, folder in exports.items():
        plans.update(_engine_entries(cfg, prec, folder, x, engines, say))

    say(f"timing {len(engines)} engines round-robin: warm-up {cfg.warmup}, {cfg.repeats} rounds")
    timings = time_interleaved({n: e["fn"] for n, e in engines.items()}, warmup=cfg.warmup, repeats=cfg.repeats,
                               sync=device_sync)
    ref = engines["eager PyTorch fp32"]["out"]()
    rows: list[Row] = []
    for name, e in engines.items():
        t, out = timings[name], e["out"]()
        rows.append(Row(name, e["backend"], e["precision"], e["device"], round(t.median_ms, 3), round(t.p90_ms, 3),
                        round(cfg.batch * 1000.0 / t.median_ms, 4), round(psnr_uint8(out, ref), 3),
                        max_abs_diff(out, ref), [round(v, 3) for v in t.runs_ms],
                        round(min(t.runs_ms), 3), round(max(t.runs_ms), 3),
                        round(paired_ratio(timings["eager PyTorch fp32"], t), 4)))
        ov = f"openvino {e['precision']}"
        if ov in timings:
            rows[-1].vs_openvino = round(paired_ratio(timings[ov], t), 4)
        r = rows[-1]
        say(f"  {name:<28} median {r.median_ms:10.1f} ms  [{r.min_ms:.0f}-{r.max_ms:.0f}]  "
            f"x{r.vs_eager:.2f} vs eager  psnr {r.psnr_db}")
    return {
        "machine": machine_description(),
        "config": asdict(cfg),
        "output_shape": list(ref.shape),
        "reference": "eager PyTorch fp32",
        "timing": "round-robin: each round runs every engine once; vs_* are medians of per-round ratios",
        "per_part": plans,
        "rows": [asdict(r) for r in rows],
    }


def _eager_entry(model, xin, prec: str, dev: str) -> dict:
    import torch

    box = {}

    def fn():
        with torch.inference_mode():
            box["out"] = model(xin)

    return {"fn": fn, "out": lambda: box["out"].cpu().numpy(), "backend": "torch", "precision": prec, "device": dev}


def export_all(cfg: BenchConfig, ckpt_path: Path, work: Path, say) -> dict[str, Path]:
    from dfosd.export.artifacts import export_checkpoint

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
    return exports


def _runner_entry(runner, x, prec: str, name: str) -> dict:
    box = {}

    def fn():
        box["out"] = runner(x)

    return {"fn": fn, "out": lambda: box["out"].numpy(), "backend": name, "precision": prec,
            "device": runner.backend.device, "runner": runner}


# Bench-only row: OpenVINO told to compute in bf16 (INFERENCE_PRECISION_HINT=bf16) on the same
# fp32 graph. On CPUs with AMX / AVX512-BF16 that is OpenVINO's own default; dfosd's backend pins
# f32 so that a run gives the exported model's numbers. The row shows what that costs.
BF16_ROW = "openvino-bf16"


def _openvino_bf16_runner(folder: Path, batch: int):
    from dfosd.core.manifest import ExportDir
    from dfosd.engines.openvino_backend import OpenVinoBackend
    from dfosd.runtime.backend_choice import BackendPlan
    from dfosd.runtime.step import OneStepRunner

    backend = OpenVinoBackend(precision_hint="bf16", cache=False)  # the f32 cache stays as it is
    export = ExportDir(folder)
    entries, contracts = export.entries(batch), export.contracts(batch)
    parts = {p: (backend, backend.load(folder, entries[p], contracts[p])) for p in entries}
    return OneStepRunner.from_engines(folder, batch, parts, BackendPlan({p: BF16_ROW for p in parts},
                                                                        "bench: OpenVINO with bf16 compute"))


def _engine_entries(cfg: BenchConfig, prec: str, folder: Path, x, engines: dict, say) -> dict:
    """One runner per single backend; the per-part row ("auto") reuses their engines."""
    from dfosd.runtime.backend_choice import measured_choice
    from dfosd.runtime.step import OneStepRunner

    singles = {}
    for backend in (b for b in cfg.backends if b not in ("auto", BF16_ROW)):
        runner = OneStepRunner(folder, backend=backend, batch=cfg.batch, say=say)
        singles[runner.backend.name] = runner
        engines[f"{runner.backend.name} {prec}"] = _runner_entry(runner, x, prec, runner.backend.name)
    if BF16_ROW in cfg.backends:
        engines[f"{BF16_ROW} {prec}"] = _runner_entry(_openvino_bf16_runner(folder, cfg.batch), x, prec, BF16_ROW)
    if "auto" not in cfg.backends or len(singles) < 2:
        return {}
    first = next(iter(singles.values()))
    plan, _ = measured_choice(folder, first.manifest, first.batch, first.contracts,
                              {n: r.backend for n, r in singles.items()},
                              lambda b, part: singles[b.name].engines[part], say=say, remeasure=True,
                              repeats=cfg.part_repeats)
    say(f"{prec}: {plan.summary()}")
    for line in plan.timing_lines():
        say(line)
    best = OneStepRunner.from_engines(folder, first.batch, {
        p: (singles[plan.names[p]].backend, singles[plan.names[p]].engines[p]) for p in plan.names}, plan)
    engines[f"per-part best {prec}"] = _runner_entry(best, x, prec, "per-part")
    return {prec: plan.to_dict()}


def markdown_table(result: dict) -> str:
    eager = next(r for r in result["rows"] if r["name"] == "eager PyTorch fp32")
    has_ov = any(r.get("vs_openvino") for r in result["rows"])
    lines = ["| engine | device | median ms | min-max ms | images/s | speed-up vs eager fp32 |"
             + (" vs OpenVINO alone |" if has_ov else "") + " PSNR vs eager fp32 (dB) | max abs diff |",
             "|---|---|---:|---:|---:|---:|" + ("---:|" if has_ov else "") + "---:|---:|"]
    for r in result["rows"]:
        psnr = "reference" if r is eager else ("inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}")
        mad = "" if r is eager else f"{r['max_abs_diff']:.0f}"
        # older results (before round-robin timing) have no per-round ratio: fall back to medians
        vs_eager = r.get("vs_eager") or eager["median_ms"] / r["median_ms"]
        spread = f"{r['min_ms']:.0f}-{r['max_ms']:.0f}" if r.get("min_ms") is not None else f"p90 {r['p90_ms']:.0f}"
        ov = (f" {r['vs_openvino']:.2f}x |" if r.get("vs_openvino") else " |") if has_ov else ""
        lines.append(f"| {r['name']} | {r['device']} | {r['median_ms']:.1f} | {spread} | "
                     f"{r['images_per_s']:.3f} | {vs_eager:.2f}x |{ov} {psnr} | {mad} |")
    return "\n".join(lines)


def per_part_table(result: dict) -> str:
    """Per part: each backend's median and the one auto kept."""
    lines = []
    for prec, plan in (result.get("per_part") or {}).items():
        backends = sorted({b for ms in plan["median_ms"].values() for b in ms})
        lines += [f"Per part ({prec}), median ms of {', '.join(backends)} on the part alone:", "",
                  "| part | " + " | ".join(backends) + " | kept |", "|---|" + "---:|" * len(backends) + "---|"]
        for part, ms in plan["median_ms"].items():
            lines.append(f"| {part} | " + " | ".join(f"{ms[b]:.1f}" for b in backends) + f" | {plan['parts'][part]} |")
        lines.append("")
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
              f"{result['config']['warmup']}, {result['config']['repeats']} timed rounds (round-robin over the "
              "engines).\n\n")
    text = header + markdown_table(result) + "\n\n" + per_part_table(result)
    return write_result_files(result, out_dir, "bench", text.rstrip("\n"), plot)


def load_result(path: Path) -> dict:
    return json.loads(Path(path).read_text())
