"""The big-image memory measurement on the code before banding (commit 548e027, run against a
checkout of it): load_image -> upscale_tiled (whole-image float blend) -> compose_output -> save,
with the same stand-in step and input as dfosd.bench.big_image_memory. Run as
``python before.py 3000`` in a fresh process (started from a shell: ru_maxrss is the peak)."""
import json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
import dfosd
from dfosd.runtime.images import load_image, compose_output, save_image_atomic
from dfosd.runtime.tiling import TilingConfig, upscale_tiled


def main():
    print(dfosd.__file__, file=sys.stderr)
    size = int(sys.argv[1]); torch.set_num_threads(1)
    def rss():
        for l in open("/proc/self/status"):
            if l.startswith("VmRSS:"): return int(l.split()[1]) * 1024
    step = lambda t: t.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(src, compress_level=1)
        cfg = TilingConfig(tile=128, overlap=32, batch=4, scale=4)
        base = rss(); t0 = time.perf_counter()
        img = load_image(src)
        sr = upscale_tiled(img.rgb, step, cfg)
        save_image_atomic(compose_output(sr, img, 4), Path(tmp) / "out" / "big.png", "png")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = 3 * (4 * size) ** 2
        print(json.dumps({"input": f"{size}x{size}", "uint8_output_mib": round(out / 2**20, 1), "peak_rss_mib": round(peak / 2**20, 1),
                          "rss_before_mib": round(base / 2**20, 1), "peak_over_baseline_mib": round((peak - base) / 2**20, 1),
                          "peak_over_baseline_per_output_byte": round((peak - base) / out, 3), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
