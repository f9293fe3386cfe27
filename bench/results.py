"""Result writing and plotting shared by the benches: machine description, JSON + Markdown + PNG.

Every bench writes ``<stem>.json`` (the measurements), ``<stem>.md`` (the table) and
``<stem>.png`` (the plot) side by side; the two text files go through a temp file and a
rename, and a plot that fails is logged, never allowed to lose the measurements.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)


def machine_description(*, gpu_details: bool = False) -> dict:
    """CPU, core count, torch (and the GPU when there is one); ``gpu_details``: SM, GPU memory,
    cuDNN and the onnxruntime/diffusers versions too."""
    import os

    import torch

    from dfosd.engines.machine import cpu_model

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    if not gpu_details:
        return info
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        _, total = torch.cuda.mem_get_info()
        info.update(sm=f"{major}.{minor}", gpu_memory_gib=round(total / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    try:
        import onnxruntime as ort

        info["onnxruntime"] = f"{ort.__version__} {ort.get_available_providers()}"
    except ImportError:
        info["onnxruntime"] = None
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benches run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_bars(ax, names: Sequence[str], median_ms: Sequence[float], p90_ms: Sequence[float], *,
                 xlabel: str, color: str = "#4c72b0") -> None:
    """One horizontal bar per row (median) with a tick at its p90, first row on top."""
    ax.barh(list(names), list(median_ms), color=color, label="median")
    ax.errorbar(list(p90_ms), list(names), fmt="|", color="black", markersize=12, label="p90")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)


def save_figure(fig, path: Path) -> None:
    """Save to a temp file and rename: a half-written PNG is never left under the final name."""
    plt = pyplot()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def json_safe(value):
    """NaN/Inf as null (a relative error against a zero pixel, the PSNR of identical images): the
    file stays valid JSON, readable by any parser (Infinity is not JSON)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_result_files(result: dict, out_dir: Path, stem: str, markdown: str,
                       plot: Callable[[dict, Path], None] | None) -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and (when ``plot`` is given and succeeds) ``<stem>.png``."""
    from dfosd.core.manifest import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"{stem}.{k}" for k in ("json", "md", "png")}
    write_json_atomic(paths["json"], json_safe(result))
    write_text_atomic(paths["md"], markdown if markdown.endswith("\n") else markdown + "\n")
    if plot is None:
        del paths["png"]
        return paths
    try:
        plot(result, paths["png"])
    except Exception as exc:  # a plot must never lose the measurements
        log.warning("plot %s failed: %s", paths["png"], exc)
        del paths["png"]
    return paths
