"""Peak memory of ``dfosd-trt-run``'s image path on one big input.

    python -m dfosd.bench.big_image_memory --size 3000 [--tile 128] [--json out.json]

Runs one image through exactly what ``dfosd-trt-run`` does per file (decode, tile, blend,
write the PNG: ``runtime.batch.process_image``), with a stand-in engine step (nearest
x4 of each tile) so that only the runtime's own memory is measured, not a model's. Run
in a fresh process: the figure is the peak resident set (``VmHWM``, reset just before the
image) minus the resident set just before it, next to the uint8 output size, to check the bound
"peak <= 2 x uint8 output + a constant" (README, "Limits").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) so that it measures the image alone (Linux >= 4.0).

    ``ru_maxrss`` cannot: a child inherits its parent's peak across fork and exec, so run
    from a big process (pytest) it reported the parent's 650 MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def nearest_step(tiles):
    """Stand-in engine: uint8 [b,3,t,t] -> [b,3,4t,4t], each pixel repeated (costs next to nothing)."""
    return tiles.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


def measure(size: int, tile: int, folder: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from dfosd.runtime.batch import process_image
    from dfosd.runtime.tiling import TilingConfig, upscale_tiled

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    src = folder / "big.png"  # noise compresses badly: a PNG as heavy to encode as a photo
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(src, compress_level=1)
    cfg = TilingConfig(tile=tile, overlap=tile // 4, batch=4, scale=4)

    def upscale(rgb, sink, progress):
        return upscale_tiled(rgb, nearest_step, cfg, sink=sink, progress=progress)

    opts = {"fmt": "png", "quality": 95, "skip_existing": False, "color_fix": "none", "max_pixels": size * size}
    reset = _reset_peak()
    base_rss = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    rec = process_image(src, Path("big.png"), upscale, 4, opts, folder / "out")
    seconds = time.perf_counter() - t0
    if rec["status"] != "ok":
        raise SystemExit(f"the image failed: {rec}")
    peak = _status_bytes("VmHWM")
    output_bytes = 3 * (4 * size) ** 2
    return {"input": f"{size}x{size}", "output": f"{4 * size}x{4 * size}", "tile": tile,
            "uint8_output_mib": round(output_bytes / 2**20, 1),
            "peak_rss_mib": round(peak / 2**20, 1), "rss_before_mib": round(base_rss / 2**20, 1),
            # what the image added (an upper bound if the peak could not be reset: it may predate it)
            "peak_over_baseline_mib": round((peak - base_rss) / 2**20, 1),
            "peak_over_baseline_per_output_byte": round((peak - base_rss) / output_bytes, 3),
            "peak_reset_before_image": reset,
            "seconds": round(seconds, 1), "python": sys.version.split()[0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=3000, help="input side in pixels (square)")
    ap.add_argument("--tile", type=int, default=128, help="LR tile (the export default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dfosd-bigimage-") as tmp:
        result = measure(args.size, args.tile, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json is not None:
        from dfosd.core.manifest import write_json_atomic

        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
