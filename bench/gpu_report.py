"""The GPU bench's results: one JSON file that accumulates rows across commands and machines,
rendered as a Markdown report and a plot (written through ``bench/results.py`` like every bench)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from dfosd.core.errors import DfosdError

RESULT_NAME = "gpu_bench"


def load_results(path: Path, config: dict, machine: dict, say: Callable[[str], None]) -> dict:
    """The results so far at ``path`` when they are of the same base, tile and GPU; else a fresh set."""
    fresh = {"format": 1, "kind": "dfosd-gpu-bench", "machine": machine, "config": config,
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": {}}
    if not path.is_file():
        return fresh
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    same = isinstance(old, dict) and (
        old.get("config", {}).get("base") == config["base"] and old.get("config", {}).get("tile") == config["tile"]
        and old.get("machine", {}).get("gpu") == machine.get("gpu"))
    if not same:  # the rows written next would replace that file: it is kept under another name
        aside = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S', time.localtime(path.stat().st_mtime))}"
                               f"{path.suffix}")
        n = 1
        while aside.exists():
            aside, n = path.with_name(f"{aside.stem.rsplit('~', 1)[0]}~{n}{path.suffix}"), n + 1
        path.rename(aside)
        say(f"{path} holds {'unreadable results' if old is None else 'results of another base/tile/machine'}: "
            f"kept as {aside}, starting a new file")
        return fresh
    old["config"] = config
    old["machine"] = machine
    return old


def merge_results(paths: list[Path]) -> dict:
    merged: dict | None = None
    for p in paths:
        data = json.loads(Path(p).read_text())
        if merged is None:
            merged = data
        else:
            merged["rows"].update(data.get("rows", {}))
    if merged is None:
        raise DfosdError("--merge needs at least one gpu_bench.json")
    return merged


def _fmt(v, spec=".1f") -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return format(v, spec)


def markdown_report(result: dict) -> str:
    rows = [r for r in result["rows"].values() if not r.get("skipped")]
    skipped = [r for r in result["rows"].values() if r.get("skipped")]
    m = result["machine"]
    cfg = result["config"]
    lines = [f"# dfosd GPU bench: {cfg['base']}",
             "",
             f"Machine: {m.get('gpu') or m.get('cpu')} (SM {m.get('sm', '-')}), torch {m.get('torch')}, CUDA "
             f"{m.get('cuda', '-')}, diffusers {m.get('diffusers')}, onnxruntime {m.get('onnxruntime')}. "
             f"Wall clock from uint8 CPU tiles to the uint8 CPU image, after {cfg['warmup']} warm-up runs, "
             f"{cfg['repeats']} timed ({cfg['tiled_repeats']} for tiled). PSNR against eager PyTorch fp32 on the "
             "same inputs. peak alloc: torch's allocator (misses AOTInductor weights); device: held on the GPU "
             "above the CUDA baseline.", ""]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["output"] if r["kind"] != "tiled" else f"tiled {r['output']}", []).append(r)
    for title, rs in sorted(groups.items(), key=lambda kv: (kv[0].startswith("tiled"), kv[1][0]["batch"])):
        eager32 = next((r for r in rs if r["kind"] == "eager" and r["precision"] == "fp32"), None)
        lines += [f"## {title} (batch {rs[0]['batch']})", "",
                  "| engine | median ms | p90 ms | images/s | MP/s | vs eager fp32 | PSNR dB | max diff | "
                  "peak alloc MiB | device MiB | build s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rs, key=lambda r: r["median_ms"]):
            speed = f"{eager32['median_ms'] / r['median_ms']:.2f}x" if eager32 else ""
            psnr = "reference" if r is eager32 else _fmt(r.get("psnr_db"))
            lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.2f} | "
                         f"{r['megapixels_per_s']:.2f} | {speed} | {psnr} | {_fmt(r.get('max_abs_diff'), '.0f')} | "
                         f"{_fmt(r.get('peak_alloc_mib'), '.0f')} | {_fmt(r.get('device_mib'), '.0f')} | "
                         f"{_fmt(r.get('build_seconds'))} |")
        lines.append("")
    with_parts = [r for r in rows if r.get("components_ms")]
    if with_parts:
        lines += ["## Per-component times (each part alone, synchronised; ms)", "",
                  "| engine | batch | encoder | unet | decoder | sum | chain median |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(with_parts, key=lambda r: (r["batch"], r["median_ms"])):
            c = r["components_ms"]
            lines.append(f"| {r['name']} | {r['batch']} | {c['encoder']:.2f} | {c['unet']:.2f} | {c['decoder']:.2f} | "
                         f"{sum(c.values()):.2f} | {r['median_ms']:.2f} |")
        engines = [r for r in with_parts if r["kind"] == "engine"]
        if engines:
            best = min(engines, key=lambda r: r["median_ms"] / r["batch"])
            c = best["components_ms"]
            total = sum(c.values())
            lines += ["", f"Fastest engine per image: **{best['name']}** at batch {best['batch']}: "
                      + ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f} %)" for k, v in c.items()), ""]
    if skipped:
        lines += ["## Not measured", ""] + [f"- {r['id']}: {r['skipped']}" for r in skipped] + [""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Images/s per engine and tile batch; beside it, the tiled rows' latency."""
    from dfosd.bench.results import latency_bars, pyplot, save_figure

    rows = [r for r in result["rows"].values() if not r.get("skipped")]
    tiles = [r for r in rows if r["kind"] != "tiled"]
    tiled = [r for r in rows if r["kind"] == "tiled"]
    fig, axes = pyplot().subplots(1, 2 if tiled else 1, figsize=(12 if tiled else 8, 5), squeeze=False)
    ax = axes[0][0]
    batches = sorted({r["batch"] for r in tiles})
    names = sorted({r["name"] for r in tiles})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, b in enumerate(batches):
            r = next((r for r in tiles if r["name"] == name and r["batch"] == b), None)
            if r:
                xs.append(j + i * width)
                ys.append(r["images_per_s"])
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    side = 4 * result["config"]["tile"]
    ax.set_ylabel(f"{side}² images/s (higher is better)")
    ax.legend(fontsize=7)
    m = result["machine"]
    ax.set_title(f"{result['config']['base']}, {side}² tiles, {m.get('gpu') or m.get('cpu')}", fontsize=9)
    if tiled:
        ax2 = axes[0][1]
        latency_bars(ax2, [r["name"] for r in tiled], [r["median_ms"] for r in tiled], [r["p90_ms"] for r in tiled],
                     xlabel="ms per image (median; | = p90)", color="#55a868")
        ax2.set_title(f"{result['config']['tiled_size']}² through the tiler", fontsize=9)
    save_figure(fig, path)


def write_results(result: dict, out_dir: Path) -> dict[str, Path]:
    """gpu_bench.json, gpu_bench.md and (once a row was measured) gpu_bench.png in ``out_dir``."""
    from dfosd.bench.results import write_result_files

    measured = any(not r.get("skipped") for r in result["rows"].values())
    return write_result_files(result, out_dir, RESULT_NAME, markdown_report(result), plot if measured else None)
