"""``dfosd resshift-run``: upscale images with a ResShift-backbone export (``dfosd-export --vq``).

One noise field per image, from ``--seed`` (the same seed for every image) or ``--noise FILE.npy`` (one
image only: a float32 [1, 3, H, W] field for its H x W size). A bad image is reported and skipped; the
others go on; the exit code is 1 when any image failed. Outputs are PNGs written atomically; an existing
file is never replaced unless ``--force``. ``resshift-report.json`` in ``--out`` records the seed or
noise file and each image's result.
"""

from __future__ import annotations

from pathlib import Path

import click

from dfosd.core.cli_support import say, setup_logging, user_errors

REPORT = "resshift-report.json"


@click.command(name="resshift-run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--engines", required=True, type=click.Path(file_okay=False), help="A `dfosd-export --vq` folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--seed", default=None, type=int, help="Noise field seed (per image) [default: 0 unless --noise].")
@click.option("--noise", "noise_file", default=None, type=click.Path(dir_okay=False),
              help="The noise field as a float32 [1, 3, H, W] .npy (exact reproduction; one input image).")
@click.option("--overlap", default=None, type=int, help="LR pixels shared by neighbouring tiles [default: tile/8].")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(inputs, engines, out_dir, seed, noise_file, overlap, force, verbose):
    """Upscale INPUTS x4 with a ResShift/SinSR/TAD-SR export."""
    setup_logging(verbose)
    from dfosd.core.errors import DfosdError

    if seed is not None and noise_file is not None:
        raise DfosdError("--seed and --noise both given: the noise field comes from one of them")
    if noise_file is not None and len(inputs) != 1:
        raise DfosdError(f"--noise gives the field of one image; {len(inputs)} inputs were given",
                         hint="run one image per --noise file, or use --seed")
    if noise_file is not None and not Path(noise_file).is_file():
        raise DfosdError(f"--noise {noise_file} does not exist")
    seed = 0 if seed is None and noise_file is None else seed
    from dfosd.core.atomic import write_bytes_atomic, write_json_atomic
    from dfosd.core.errors import ImageInputError
    from dfosd.runtime.images import load_image
    from dfosd.runtime.resshift_run import ResShiftRunner, read_noise

    runner = ResShiftRunner.from_export(engines, overlap=overlap)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    for name in inputs:
        target = out / (Path(name).stem + ".png")
        try:
            if target.exists() and not force:
                raise ImageInputError(f"{target} exists; not replacing it (pass --force)")
            image = load_image(name).rgb
            noise = None if noise_file is None else read_noise(noise_file, image.shape[1], image.shape[2])
            sr = runner(image, seed=seed if noise is None else None, noise=noise)
            write_bytes_atomic(target, _png(sr))
            results.append({"input": str(name), "output": str(target), "ok": True})
            say(f"{name} -> {target}")
        except ImageInputError as exc:  # this image only: report it and go on
            failed += 1
            results.append({"input": str(name), "ok": False, "error": exc.message})
            say(f"skipped {name}: {exc.message}")
    write_json_atomic(out / REPORT, {"engines": str(Path(engines).resolve()), "seed": seed,
                                     "noise": None if noise_file is None else str(Path(noise_file).resolve()),
                                     "images": results, "failed": failed})
    if failed:
        raise SystemExit(1)


def _png(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":  # pragma: no cover
    main()
