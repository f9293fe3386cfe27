"""``dfosd-trt-run``: upscale image files with exported engines.

Each image is tiled to the engines' fixed tile, run in tile batches, blended, optionally
colour-fixed, and written atomically. A bad file costs one line and the batch goes on;
the exit code is non-zero when anything failed, and a JSON report records each image.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from dfosd.core.cli_support import say, setup_logging, user_errors
from dfosd.core.vocab import COLOR_FIXES
from dfosd.engines.base import BACKEND_CHOICES

FORMATS = ("png", "jpg", "webp")
REPORT_NAME = "dfosd-report.json"


def _process_one(src, rel, upscale, tcfg, opts, out_dir):
    """Upscale one file with ``upscale`` (uint8 [3,H,W] -> x scale); returns the report record
    (raises nothing for bad input)."""
    from dfosd.runtime.color_fix import apply_color_fix
    from dfosd.runtime.images import ImageInputError, compose_output, load_image, output_path_for, save_image_atomic

    dst = output_path_for(Path(rel), out_dir, opts["fmt"])
    rec = {"input": str(src), "output": str(dst)}
    if opts["skip_existing"] and dst.exists():
        return {**rec, "status": "skipped", "reason": "output exists (--skip-existing)"}
    t0 = time.perf_counter()
    try:
        img = load_image(src)
        sr = upscale(img.rgb)
        sr = apply_color_fix(sr, img.rgb, opts["color_fix"], tcfg.scale)
        notes = list(img.notes) + list(save_image_atomic(compose_output(sr, img, tcfg.scale), dst, opts["fmt"],
                                                          quality=opts["quality"]) or [])
    except ImageInputError as exc:
        return {**rec, "status": "failed", "error": exc.message}
    except OSError as exc:
        return {**rec, "status": "failed", "error": f"could not write {dst}: {exc}"}
    h, w = img.rgb.shape[1:]
    return {**rec, "status": "ok", "seconds": round(time.perf_counter() - t0, 4), "input_size": [w, h],
            "output_size": [w * tcfg.scale, h * tcfg.scale], "notes": notes}


@click.command(name="run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True)
@click.option("--engines", "export_dir", default="dfosd-engines", show_default=True,
              type=click.Path(file_okay=False), help="Directory written by dfosd-export.")
@click.option("--out", "out_dir", default="dfosd-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (sub-folders of folder inputs are mirrored).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--batch", type=int, default=None, help="Tile batch to use (one the export built; default: largest).")
@click.option("--tile", type=int, default=None,
              help="LR tile size; must equal the export's (default: the export's).")
@click.option("--overlap", type=int, default=None, help="Tile overlap in LR pixels (default: tile/4).")
@click.option("--color-fix", type=click.Choice(COLOR_FIXES), default=None,
              help="Match the output's colours to the bicubic-upsampled input. [default: the model family's "
                   "upstream default from the export's manifest (none for DFOSD, adain for OSEDiff/PiSA-SR, "
                   "wavelet for HYPIR)]")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="png", show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="jpg/webp quality.")
@click.option("--skip-existing", is_flag=True, help="Leave images whose output already exists.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help=f"JSON report path (default: OUT/{REPORT_NAME}).")
@click.option("--server", default=None, metavar="URL",
              help="Upscale on a dfosd-serve / Triton server (http://HOST:PORT or grpc://HOST:PORT) instead of "
                   "loading engines here; --engines/--backend/--batch do not apply.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(inputs, export_dir, out_dir, backend, batch, tile, overlap, color_fix, fmt, quality, skip_existing,
         report, server, progress, verbose):
    """Upscale INPUT... (files, folders searched recursively, or glob patterns) x4.

    Grayscale inputs give grayscale outputs; alpha is carried over bicubic-resized (not
    super-resolved); 16-bit inputs are written as 8-bit; EXIF orientation is applied.
    """
    setup_logging(verbose)
    if server is None:  # no export there: a clear error now, not after seconds of imports (issue 12.13)
        from dfosd.core.manifest import ExportDir

        ExportDir(export_dir, check="none")
    from tqdm import tqdm

    from dfosd.core.errors import DfosdError
    from dfosd.core.manifest import write_json_atomic
    from dfosd.runtime.images import collect_inputs
    from dfosd.runtime.step import OneStepRunner
    from dfosd.runtime.tiling import TilingConfig

    pairs, problems = collect_inputs(inputs)
    for p in problems:
        say(f"error: {p}")
    if not pairs:  # nothing to upscale: say so before loading any engine (issue 12.13)
        raise DfosdError("no input images found" + (f" ({'; '.join(problems)})" if problems else ""),
                         hint="pass image files, folders or glob patterns")
    if server is not None:
        from dfosd.serving.client import local_only_options, remote_runner

        local_only_options(click.get_current_context(), ("export_dir", "backend", "batch"))
        runner = remote_runner(server, say)  # same attributes as OneStepRunner: tile, batch, scale, ...
    else:
        runner = OneStepRunner(export_dir, backend=backend, batch=batch, say=say)
    if tile is not None and tile != runner.tile:
        raise DfosdError(f"--tile {tile} differs from the engines' tile {runner.tile} (engines have static shapes)",
                         hint=f"omit --tile, or re-export with dfosd-export --tile {tile}")
    tcfg = TilingConfig(tile=runner.tile, overlap=runner.tile // 4 if overlap is None else overlap,
                        batch=runner.batch, scale=runner.scale)
    if server is not None:
        def upscale(rgb):
            return runner.upscale(rgb, overlap=tcfg.overlap)  # the server tiles and blends
    else:
        from dfosd.runtime.tiling import upscale_tiled

        def upscale(rgb):
            return upscale_tiled(rgb, runner, tcfg)
    if color_fix is None:
        color_fix = _family_color_fix(export_dir if server is None else None)
    out = Path(out_dir)
    opts = {"fmt": fmt, "quality": quality, "skip_existing": skip_existing, "color_fix": color_fix}
    records = [{"input": p, "status": "failed", "error": p} for p in problems]
    t_all = time.perf_counter()
    for src, rel in tqdm(pairs, desc="dfosd", unit="img", disable=not progress, file=sys.stderr):
        rec = _process_one(src, rel, upscale, tcfg, opts, out)
        if rec["status"] == "failed":
            tqdm.write(f"error: {rec['error']}", file=sys.stderr)
        records.append(rec)
    if server is not None:
        runner.client.close()  # an idle keep-alive connection would hold up the server's shutdown
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    report_path = Path(report) if report else out / REPORT_NAME
    write_json_atomic(report_path, {
        "engines": server or str(Path(export_dir).resolve()), "backend": runner.backend.describe(),
        "precision": runner.precision, "tiling": {"tile": tcfg.tile, "overlap": tcfg.overlap, "batch": tcfg.batch},
        "color_fix": color_fix, "total_seconds": round(time.perf_counter() - t_all, 3), "summary": counts,
        "images": records,
    })
    say(f"{counts['ok']} upscaled, {counts['skipped']} skipped, {counts['failed']} failed -> {out} "
        f"(report: {report_path})")
    if counts["failed"]:
        raise SystemExit(1)


def _family_color_fix(export_dir) -> str:
    """The colour fix upstream applies by default for the export's model family."""
    if export_dir is None:
        return "none"
    from dfosd.core.manifest import ExportDir

    family = ExportDir(export_dir, check="none").family
    fix = family.get("color_fix", "none")
    if fix != "none":
        say(f"colour fix: {fix} ({family.get('name')}'s upstream default; --color-fix none turns it off)")
    return fix


if __name__ == "__main__":  # pragma: no cover
    main()
