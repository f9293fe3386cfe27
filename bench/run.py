"""``dfosd-bench``: eager PyTorch vs every available engine, same weights, same inputs.

Rows: eager fp32 (the parity reference), eager fp16 on a GPU, then each exported
precision through each usable backend. Each row: median and p90 latency of one tile
batch after warm-up, images/s, and parity against eager fp32 (PSNR, max abs diff).
Outputs: a Markdown table, JSON, and a PNG plot.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dfosd.calibration.data import CALIB_PHOTOS, write_calibration_photos  # noqa: F401  (bench rows use them)
from dfosd.core.checkpoint import check_checkpoint_exists
from dfosd.core.errors import DfosdError
from dfosd.core.vocab import FLOAT_PRECISIONS, PRECISIONS, QUANT_PRECISIONS
from dfosd.engines.base import BACKENDS

# Beyond one row per backend: auto, the per-part best of the exact CPU backends (as the runtime's auto).
BENCH_BACKENDS = BACKENDS + ("auto",)

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
    part_repeats: int = 3  # per-part timing behind the "auto" row (after one warm-up run)
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
        unknown = [b for b in self.backends if b not in BENCH_BACKENDS]
        if unknown or not self.backends:
            problems.append(f"--backends {','.join(unknown) or '(none)'}: choose from {', '.join(BENCH_BACKENDS)}")
        if not self.precisions:
            problems.append(f"--precisions: give at least one of {', '.join(PRECISIONS)}")
        if self.tile < 1 or self.batch < 1:
            problems.append("--tile and --batch must be >= 1")
        if self.calib_data is not None and not Path(self.calib_data).is_dir():
            problems.append(f"--calib-data {self.calib_data}: no such folder")
        if self.float_precision not in FLOAT_PRECISIONS:
            problems.append(f"--float-precision {self.float_precision!r}: choose one of {', '.join(FLOAT_PRECISIONS)}")
        if problems:
            raise DfosdError("; ".join(problems))
        if self.ckpt is not None:
            check_checkpoint_exists(self.ckpt)

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
    spread_pct: float = 0.0  # (max - min) / median of the runs
    speedup_range: list[float] = field(default_factory=list)  # per-round eager fp32 / this: min, median, max
    vs_openvino: list[float] = field(default_factory=list)  # per-round OpenVINO alone / this, same precision


BENCH_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # held out: never in CALIB_PHOTOS


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
    """Exports first, then every candidate (eager and each engine) loaded together and timed in
    interleaved rounds (``time_interleaved``): their medians and per-round ratios are comparable."""
    from dfosd.engines.base import select_backend

    for backend in cfg.backends:  # an unusable backend (tensorrt not installed) fails before any export
        select_backend(backend)

    import torch

    from dfosd.bench.measure import NOISY_SPREAD, ratio_range, spread, time_interleaved
    from dfosd.bench.results import machine_description
    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import write_random_checkpoint
    from dfosd.core.metrics import max_abs_diff, psnr_uint8
    from dfosd.core.onestep import build_from_model
    from dfosd.core.readers import read_model
    from dfosd.export.artifacts import export_checkpoint

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(cfg.ckpt) if cfg.ckpt else work / "lora.safetensors"
    if not cfg.ckpt and not ckpt_path.exists():
        say(f"loading base {cfg.base}")
        write_random_checkpoint(ckpt_path, load_base(cfg.base), rank=16, alpha=16)
        say(f"wrote a synthetic checkpoint {ckpt_path} (random LoRA: it does not super-resolve)")
        gc.collect()
    ckpt = read_model(ckpt_path, base_spec=cfg.base, progress=say)  # any family; a prompt is encoded once

    # Exports before the eager model exists: each loads its own base (two full-size bases at once
    # pushed the fp16 export out of memory).
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

    say(f"loading base {cfg.base}")
    base = load_base(cfg.base)
    x = bench_inputs(cfg.tile, cfg.batch)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    candidates = {}  # name -> (backend, precision, device, fn returning the uint8 output as numpy)
    for prec in ["fp32"] + (["fp16"] if cuda else []):
        model = build_from_model(base, ckpt, dtype=torch.float32 if prec == "fp32" else torch.float16).to(dev)
        xin = x.to(dev)

        def eager(model=model, xin=xin):
            with torch.inference_mode():
                return model(xin)

        candidates[f"eager PyTorch {prec}"] = ("torch", prec, dev, eager)
        if prec == "fp32" and not cuda and "openvino-bf16" in cfg.backends:
            # The eager counterpart of an engine computing in bf16: the same fp32 weights under
            # CPU autocast (no second model in memory).
            def eager_bf16(model=model, xin=xin):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(xin)

            candidates["eager PyTorch bf16 autocast"] = ("torch", "bf16", dev, eager_bf16)
    del base
    gc.collect()
    plans = {}
    for prec, folder in exports.items():
        plans.update(_engine_candidates(cfg, prec, folder, x, candidates, say))
    outputs = {name: c[3]().cpu().numpy() for name, c in candidates.items()}  # parity, and a first warm-up
    say(f"timing {len(candidates)} candidates in {cfg.repeats} interleaved rounds (warm-up {cfg.warmup})")
    timings = time_interleaved({name: c[3] for name, c in candidates.items()}, warmup=cfg.warmup,
                               repeats=cfg.repeats)
    ref_name = "eager PyTorch fp32"
    ref = outputs[ref_name]
    rows: list[Row] = []
    warnings: list[str] = []
    for name, (backend, prec, device, _) in candidates.items():
        t = timings[name]
        lo, mid, hi = ratio_range(timings[ref_name], t)
        r = Row(name, backend, prec, device, round(t.median_ms, 3), round(t.p90_ms, 3),
                round(cfg.batch * 1000.0 / t.median_ms, 4),
                None if name == ref_name else round(psnr_uint8(outputs[name], ref), 3),
                None if name == ref_name else max_abs_diff(outputs[name], ref), [round(v, 3) for v in t.runs_ms],
                round(100 * spread(t), 1), [round(lo, 3), round(mid, 3), round(hi, 3)])
        if f"openvino {prec}" in timings:
            r.vs_openvino = [round(v, 3) for v in ratio_range(timings[f"openvino {prec}"], t)]
        rows.append(r)
        say(f"  {name:<28} median {r.median_ms:10.1f} ms  runs {min(t.runs_ms):.1f}-{max(t.runs_ms):.1f} ms "
            f"(spread {spread_text(r.spread_pct)})  {r.images_per_s:8.3f} img/s  psnr {r.psnr_db}")
        if spread(t) > NOISY_SPREAD:
            warnings.append(f"{name}: its {len(t.runs_ms)} runs disagree by {spread_text(r.spread_pct)} "
                            f"({min(t.runs_ms):.1f} to {max(t.runs_ms):.1f} ms): the machine was busy or throttling, "
                            "so the speed-ups below are not a property of the engines; rerun with more --repeats "
                            "on an idle machine")
    for w in warnings:
        say(f"warning: {w}")
    return {
        "machine": machine_description(),
        "config": asdict(cfg),
        "output_shape": list(ref.shape),
        "reference": "eager PyTorch fp32",
        "timing": f"interleaved: {cfg.repeats} rounds, one run of each candidate per round, order rotated",
        "rows": [asdict(r) for r in rows],
        "per_part": plans,
        "warnings": warnings,
    }


def _engine_candidates(cfg: BenchConfig, prec: str, folder: Path, x, candidates: dict, say) -> dict:
    """One runner per backend; the per-part row ("auto") reuses their engines, part by part."""
    from dfosd.engines.base import backend_class
    from dfosd.runtime.backend_choice import measured_choice
    from dfosd.runtime.step import OneStepRunner

    singles = {}
    for backend in (b for b in cfg.backends if b != "auto"):
        runner = OneStepRunner(folder, backend=backend, batch=cfg.batch, say=say)
        candidates[f"{runner.backend.name} {prec}"] = (runner.backend.name, prec, runner.backend.device,
                                                       lambda runner=runner: runner(x))
        if backend_class(runner.backend.name).cpu_auto_candidate:  # auto's candidates: the exact ones
            singles[runner.backend.name] = runner
    if "auto" not in cfg.backends or len(singles) < 2:
        return {}
    first = next(iter(singles.values()))
    plan, _ = measured_choice(first.export, first.batch, first.contracts,
                              {n: r.backend for n, r in singles.items()},
                              lambda b, part: singles[b.name].engines[part], say=say, remeasure=True,
                              repeats=cfg.part_repeats)
    say(f"{prec}: {plan.summary()}")
    for line in plan.timing_lines():
        say(line)
    best = OneStepRunner.from_engines(folder, first.batch, {
        p: (singles[plan.names[p]].backend, singles[plan.names[p]].engines[p]) for p in plan.names}, plan)
    candidates[f"per-part best {prec}"] = ("per-part", prec, best.backend.device, lambda runner=best: runner(x))
    return {prec: plan.to_dict()}


def spread_text(spread_pct: float) -> str:
    """A row's stored spread (percent, one decimal) as every line of the report shows it: one
    rounding, so the table and the warning never give the same runs two numbers."""
    return f"{spread_pct:.1f} %"


def markdown_table(result: dict) -> str:
    eager = next(r for r in result["rows"] if r["name"] == "eager PyTorch fp32")
    has_ov = any(r.get("vs_openvino") for r in result["rows"])
    lines = ["| engine | device | median ms | runs min-max ms (spread) | images/s | speed-up vs eager fp32 "
             "(per-round range) |" + (" vs OpenVINO alone (per-round median) |" if has_ov else "")
             + " PSNR vs eager fp32 (dB) | max abs diff |",
             "|---|---|---:|---:|---:|---:|" + ("---:|" if has_ov else "") + "---:|---:|"]
    for r in result["rows"]:
        psnr = "reference" if r is eager else ("inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}")
        mad = "" if r is eager else f"{r['max_abs_diff']:.0f}"
        runs = r.get("runs_ms") or [r["median_ms"]]
        speedup = f"{eager['median_ms'] / r['median_ms']:.2f}x"
        if r is not eager and r.get("speedup_range"):
            speedup += f" ({r['speedup_range'][0]:.2f}-{r['speedup_range'][2]:.2f})"
        ov = (f" {r['vs_openvino'][1]:.2f}x |" if r.get("vs_openvino") else " |") if has_ov else ""
        lines.append(f"| {r['name']} | {r['device']} | {r['median_ms']:.1f} | {min(runs):.1f}-{max(runs):.1f} "
                     f"({spread_text(r.get('spread_pct', 0))}) | {r['images_per_s']:.3f} | {speedup} |{ov} {psnr} | {mad} |")
    for w in result.get("warnings", []):
        lines.append(f"\n**Warning:** {w}")
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
              f"{result['config']['warmup']}, {result['config']['repeats']} timed runs "
              f"({result.get('timing', 'one candidate after the other')}).\n\n")
    text = header + markdown_table(result) + "\n\n" + per_part_table(result)
    return write_result_files(result, out_dir, "bench", text.rstrip("\n"), plot)
