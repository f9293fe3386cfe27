"""``dfosd demo``: the whole product on the embedded default, end to end.

1. writes a synthetic checkpoint (random LoRA on a synthetic base: it does NOT
   super-resolve; the point is the pipeline, the shapes and the timings),
2. exports it (dfosd-export, fp32 and fp16),
3. upscales real photographs that scikit-image ships (dfosd-trt-run),
4. prints the latency comparison against eager PyTorch (dfosd-bench): interleaved rounds, the
   spread of the runs shown, and a plain warning when they disagree by more than 20 %.
Each step is run as the command a user would type, and printed first. Everything goes under
``--work`` (said at the start and the end), which gets a ``.gitignore`` of ``*`` so that a
demo run inside a checkout never shows up in ``git status``.
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
              help="synthetic:tiny (144 s end to end, measured on a busy 2-core AMD EPYC) or synthetic:sd21-base "
                   "(full size: its fp32 and fp16 exports alone took about 6 minutes there, BENCHMARKS.md).")
@click.option("--work", "work_dir", default="dfosd-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where everything goes (checkpoint, exports, photos, outputs, timings).")
@click.option("--tile", default=None, type=int, help="LR tile (default: 32 for tiny, 128 for sd21-base).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(2),
              help="Interleaved timing rounds (the spread of the runs is shown).")
@user_errors
def main(base, work_dir, tile, repeats):
    """Synthetic checkpoint -> export -> upscale real photos -> latency vs eager PyTorch."""
    setup_logging(False)
    work = Path(work_dir).resolve()
    say(f"dfosd demo: writing everything under {work}")
    work.mkdir(parents=True, exist_ok=True)
    ignore = work / ".gitignore"
    if not ignore.exists():  # git-ignored wherever it is (never replaces a .gitignore that is there)
        ignore.write_text("# written by dfosd demo: nothing in here belongs in a repository\n*\n")

    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import write_random_checkpoint

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
    say(f"dfosd demo: done. Look at {work / 'sr'} (the upscaled photos; random weights: not super-resolved) and "
        f"{work / 'bench' / 'bench.md'} (timings, with the spread of the runs).")


if __name__ == "__main__":  # pragma: no cover
    main()
