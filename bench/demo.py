"""``dfosd demo``: the whole product on the embedded default, end to end.

1. writes a synthetic checkpoint (random LoRA on a synthetic base: it does NOT
   super-resolve; the point is the pipeline, the shapes and the timings),
2. exports it (dfosd-export, fp32 and fp16),
3. upscales real photographs that scikit-image ships (dfosd-trt-run),
4. prints the latency comparison against eager PyTorch (dfosd-bench).
Each step is run as the command a user would type, and printed first.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import click

from dfosd.core.cli_support import say, setup_logging, user_errors

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def write_photos(folder: Path, lr_side: int) -> list[Path]:
    """Real photos reduced to LR size (grayscale 'camera' included)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(data, name)())
        scale = lr_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        p = folder / f"{name}.png"
        img.save(p)
        paths.append(p)
    return paths


def _run(args: list[str]) -> None:
    say("$ " + " ".join(shlex.quote(a) for a in args))
    cmd = [sys.executable, "-m", {"dfosd-export": "dfosd.export.cli", "dfosd-trt-run": "dfosd.runtime.cli",
                                  "dfosd-bench": "dfosd.bench.cli"}[args[0]], *args[1:]]
    rc = subprocess.call(cmd)
    if rc:
        raise SystemExit(rc)


@click.command(name="demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", default="synthetic:tiny", show_default=True,
              help="synthetic:tiny (seconds) or synthetic:sd21-base (full size: minutes on a CPU).")
@click.option("--work", "work_dir", default="dfosd-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--tile", default=None, type=int, help="LR tile (default: 32 for tiny, 128 for sd21-base).")
@click.option("--repeats", default=3, show_default=True, type=int)
@user_errors
def main(base, work_dir, tile, repeats):
    """Synthetic checkpoint -> export -> upscale real photos -> latency vs eager PyTorch."""
    setup_logging(False)
    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import write_random_checkpoint

    work = Path(work_dir)
    tile = tile or (32 if base == "synthetic:tiny" else 128)
    ckpt = work / "lora.safetensors"
    if not ckpt.exists():
        write_random_checkpoint(ckpt, load_base(base), rank=16, alpha=16)
    say(f"synthetic checkpoint: {ckpt} (random weights: outputs are NOT super-resolved)")
    photos = write_photos(work / "photos", lr_side=2 * tile)
    say(f"{len(photos)} real photos (scikit-image) at LR size in {work / 'photos'}")
    for prec in ("fp32", "fp16"):
        _run(["dfosd-export", "--ckpt", str(ckpt), "--base", base, "--precision", prec, "--tile", str(tile),
              "--out", str(work / "bench" / f"onnx-{prec}")])  # where dfosd-bench looks, so it reuses them
    _run(["dfosd-trt-run", str(work / "photos"), "--engines", str(work / "bench" / "onnx-fp16"), "--out",
          str(work / "sr"), "--color-fix", "wavelet"])
    _run(["dfosd-bench", "--base", base, "--ckpt", str(ckpt), "--tile", str(tile), "--work", str(work / "bench"),
          "--repeats", str(repeats)])


if __name__ == "__main__":  # pragma: no cover
    main()
