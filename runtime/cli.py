"""``dfosd-trt-run``: upscale image files with exported engines.

Each image is tiled to the engines' fixed tile, run in tile batches, blended, optionally
colour-fixed, and written atomically. A bad file costs one line and the batch goes on;
the exit code is non-zero when anything failed, and a JSON report records each image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dfosd.core.cli_support import progress_bars, say, setup_logging, user_errors
from dfosd.core.vocab import COLOR_FIXES, REPORT_NAME
from dfosd.engines.base import BACKEND_CHOICES
from dfosd.runtime.inputs import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS  # torch-free: --help stays light

FORMATS = tuple(OUTPUT_FORMATS)
TILE_BAR_MIN_CALLS = 4  # a per-tile progress bar for images that take more engine calls than this


@click.command(name="run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True)
@click.option("--engines", "export_dir", default="dfosd-engines", show_default=True,
              type=click.Path(file_okay=False), help="Directory written by dfosd-export.")
@click.option("--out", "out_dir", default="dfosd-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (sub-folders of folder inputs are mirrored).")
@click.option("--backend", default="auto", show_default=True, metavar="|".join(BACKEND_CHOICES),
              help="Engine backend, or one per part (encoder=openvino,unet=onnxruntime,decoder=openvino). auto: "
                   "TensorRT on a GPU; on a CPU the fastest of ONNX Runtime and OpenVINO per part, measured once "
                   "and cached in the export's runtime.json. openvino-bf16: OpenVINO computing in bf16 on a CPU with "
                   "AMX or AVX512-BF16 (several times faster, approximate; auto never picks it).")
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
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse inputs with more pixels than this, read from the header before decoding "
                   "(the default is about 2 GiB at the run's ~88 bytes per input pixel).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on a Ray cluster (pip install 'dfosd[ray]'): ADDRESS from `ray start` (HOST:PORT) or auto; "
                   "none: join the Ray on this machine or start one; local: start a new one for this run. Put it "
                   "after INPUTS. Resumable: the same command again skips images whose output is complete and current.")
@click.option("--ray-actors", type=click.IntRange(1), default=None,
              help="Ray workers, each holding one set of engines (default: one per GPU for a GPU backend, else "
                   "the cluster's CPUs / --ray-cpus-per-actor).")
@click.option("--ray-cpus-per-actor", type=click.IntRange(1), default=1, show_default=True,
              help="CPUs (engine threads) per Ray worker of a CPU backend.")
@click.option("--seed", type=int, default=None,
              help="ResShift-backbone exports (SinSR, ResShift, TAD-SR): the seed of each image's noise field, the "
                   "same for every image [default: 0 unless --noise]. Recorded in the report.")
@click.option("--noise", "noise_file", type=click.Path(dir_okay=False), default=None, metavar="FILE.npy",
              help="ResShift-backbone exports, one input image: its whole noise field, float32 [1, 3, H, W] for an "
                   "H x W image (exact reproduction against upstream or across machines).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(inputs, export_dir, out_dir, backend, batch, tile, overlap, color_fix, fmt, quality, skip_existing,
         report, server, max_pixels, ray_address, ray_actors, ray_cpus_per_actor, seed, noise_file, progress, verbose):
    """Upscale INPUT... (files, folders searched recursively, or glob patterns) x4.

    Grayscale inputs give grayscale outputs; alpha is carried over bicubic-resized (not
    super-resolved); 16-bit inputs are written as 8-bit; EXIF orientation is applied;
    GIFs are read by their first frame. --out must not be, or be inside, an input folder.
    """
    setup_logging(verbose)
    if ray_address is not None:
        if server is not None:
            raise click.UsageError("--ray and --server are two ways to run: pass one")
        _check_noise_options(export_dir, seed, noise_file, None, ray=True)
        from dfosd.runtime.ray_cli import ray_main

        return ray_main(inputs, address=ray_address, actors=ray_actors, cpus_per_actor=ray_cpus_per_actor,
                        export_dir=export_dir, out_dir=out_dir, backend=backend, batch=batch, tile=tile,
                        overlap=overlap, color_fix=color_fix, fmt=fmt, quality=quality, skip_existing=skip_existing,
                        report=report, max_pixels=max_pixels, progress=progress)
    # Everything up to the report is cheap and torch-free: inputs, --out, the report, the
    # export's manifest. A mistake there is reported in well under a second, before any model.
    from dfosd.core.errors import DfosdError
    from dfosd.runtime.batch import (
        Interrupted,
        RunReport,
        check_report_path,
        check_writable_folder,
        exit_code_for,
        report_lock,
        stop_on_signals,
    )
    from dfosd.runtime.inputs import check_output_folder, collect_inputs

    out = Path(out_dir)
    found = collect_inputs(inputs, out_dir=out)
    if not found.pairs:  # nothing to do: say why before any model is loaded
        what = [f"skipped {len(found.skipped)} file(s): {_names(found.skipped)}"] if found.skipped else []
        raise DfosdError("no input images found" + "".join(f"\n  - {p}" for p in found.problems + what),
                         hint="pass image files, folders or glob patterns")
    for p in found.problems:
        say(f"error: {p}")
    noise = _check_noise_options(export_dir if server is None else None, seed, noise_file, found.pairs)
    # A run that cannot start (an unusable backend, options that do not apply, no export) leaves no
    # output folder and no report; only an earlier run's report there is replaced, so it never
    # outlives this run's options.
    if server is None:
        from dfosd.runtime.backend_choice import check_backend_spec

        check_backend_spec(backend)
    else:
        from dfosd.serving.client import local_only_options

        local_only_options(click.get_current_context(), ("export_dir", "backend", "batch", "seed", "noise_file"))
    # Where outputs go, and that they can be written.
    check_output_folder(inputs, found.pairs, out, fmt)
    report_path = Path(report) if report else out / REPORT_NAME
    new_folders = [p for p in (out, *out.parents, *report_path.parent.parents, report_path.parent) if not p.exists()]
    check_writable_folder(out, "--out")
    check_writable_folder(report_path.parent, "--report folder")
    not_started, export = None, None
    if server is None:  # no export there, or an edited manifest: said before seconds of imports
        from dfosd.core.manifest import ExportDir

        try:
            if noise is None:  # a ResShift export's record was read by _check_noise_options
                export = ExportDir(export_dir, check="none")
        except DfosdError as exc:
            if not report_path.exists():
                _remove_empty(new_folders)
                raise
            not_started = exc
    opts = {"fmt": fmt, "quality": quality, "skip_existing": skip_existing, "color_fix": color_fix,
            "max_pixels": max_pixels}
    with report_lock(report_path), stop_on_signals():
        check_report_path(report_path)  # after the lock: a live run holding it is the reason given first
        rep = RunReport(report_path, {"engines": server or str(Path(export_dir).resolve()), "color_fix": color_fix,
                                      "max_pixels": opts["max_pixels"], "out": str(out.resolve()),
                                      **(noise.header if noise is not None else {})})
        rep.records += [{"input": p, "status": "failed", "error": p} for p in found.problems]
        rep.records += [{"input": str(p), "status": "skipped", "reason": why} for p, why in found.skipped]
        rep.pending = [str(src) for src, _ in found.pairs]
        rep.write("running")  # from here on, the report on disk is this run's
        code = 0
        try:
            if not_started is not None:
                raise not_started
            runner, tcfg, upscale = _make_upscaler(export_dir, backend, batch, tile, overlap, server, color_fix, noise)
            if server is not None:  # the server applies the colour fix (the same function of the pixels)
                rep.header["color_fix"] = color_fix or runner.client.info.color_fix
                opts["color_fix"] = "none"
            elif color_fix is None:
                opts["color_fix"] = rep.header["color_fix"] = "none" if export is None else family_color_fix(export)
            rep.header.update(backend=runner.backend.describe(), precision=runner.precision,
                              backend_plan=getattr(runner, "plan", None) and runner.plan.to_dict(),
                              tiling={"tile": tcfg.tile, "overlap": tcfg.overlap, "batch": tcfg.batch})
            _run_all(found.pairs, upscale, tcfg, opts, out, rep, progress)
            if server is not None:
                runner.client.close()  # an idle keep-alive connection would hold up the server's shutdown
            state = "complete"
        except (KeyboardInterrupt, Interrupted) as exc:  # say what was done, in the report too
            state, code = "interrupted", exit_code_for(exc)
            rep.interrupt()
            say(f"interrupted ({exc if isinstance(exc, Interrupted) else 'SIGINT'})")
        except BaseException as exc:
            rep.write("failed", error=getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            raise
        rep.write(state)
    counts = rep.counts()
    skipped_files = [r for r in rep.records if r["status"] == "skipped" and "output exists" not in r["reason"]]
    say(f"{counts['ok']} upscaled, {counts['skipped']} skipped, {counts['failed']} failed"
        + (f", {counts['interrupted']} interrupted, {counts['not_started']} not started" if state == "interrupted"
           else "")
        + f" -> {out} (report: {report_path})")
    if skipped_files:
        say(f"skipped {len(skipped_files)} file(s) that are not inputs: {_names(skipped_files)} (reasons in the report)")
    if code:
        raise SystemExit(code)
    if counts["failed"]:
        raise SystemExit(1)


class NoiseOptions:
    """A ResShift export's noise source for the run: ``--seed`` (default 0) or one ``--noise`` file."""

    def __init__(self, seed: int | None, noise_file: str | None):
        self.seed, self.noise_file, self.noise = seed, noise_file, None
        if noise_file is not None:  # dtype and rank now, before the report; the image checks its H x W
            from dfosd.runtime.resshift_run import read_noise

            self.noise = read_noise(noise_file)
        self.header = {"backbone": "resshift", "seed": seed,
                       "noise": None if noise_file is None else str(Path(noise_file).resolve())}


def _check_noise_options(export_dir, seed, noise_file, pairs, ray: bool = False) -> NoiseOptions | None:
    """--seed / --noise against the export (cheap, before the report): they mean something only for a
    ResShift-backbone export, --noise only for one image. The NoiseOptions for a ResShift export, else None."""
    from dfosd.core.errors import DfosdError
    from dfosd.export.resshift_export import resshift_record
    from dfosd.core.vocab import DEFAULT_NOISE_SEED  # torch-free: checks come before heavy imports

    record = resshift_record(export_dir) if export_dir is not None else None
    if record is None:
        given = [o for o, v in (("--seed", seed), ("--noise", noise_file)) if v is not None]
        if given and export_dir is not None:
            raise DfosdError(f"{' and '.join(given)}: only a ResShift-backbone export (SinSR, ResShift, TAD-SR) takes "
                             f"a noise field; {export_dir} is not one (the SD families' one step draws no noise)",
                             hint=f"omit {' and '.join(given)}")
        return None
    if ray:
        raise DfosdError("--ray does not run ResShift-backbone exports yet", hint="run without --ray")
    if seed is not None and noise_file is not None:
        raise DfosdError("--seed and --noise both given: the noise field comes from one of them", hint="pass one")
    if noise_file is not None:
        if len(pairs) != 1:
            raise DfosdError(f"--noise gives the noise field of one image; {len(pairs)} input images were found",
                             hint="run one image per --noise file, or use --seed for several")
        if not Path(noise_file).is_file():
            raise DfosdError(f"--noise {noise_file} does not exist", hint="pass a float32 [1, 3, H, W] .npy file")
    return NoiseOptions(DEFAULT_NOISE_SEED if seed is None and noise_file is None else seed, noise_file)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created before it found it cannot start (deepest first; a
    folder that is not empty is left, with its parents)."""
    for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


def _names(items, limit: int = 5) -> str:
    names = [Path(i["input"] if isinstance(i, dict) else i[0]).name for i in items]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _make_upscaler(export_dir, backend, batch, tile, overlap, server, color_fix=None, noise=None):
    """(runner, tiling, upscale(rgb, sink, progress)) for local engines or a server (which also applies
    ``color_fix``, None: its model's default; locally ``process_image`` applies it). ``noise``: a
    ResShift export's ``NoiseOptions``."""
    from dfosd.runtime.batch import check_tile, local_upscaler
    from dfosd.runtime.tiling import TilingConfig

    if server is None:
        if noise is not None:
            return local_upscaler(export_dir, backend, batch, tile, overlap, say, seed=noise.seed,
                                  noise=noise.noise)
        return local_upscaler(export_dir, backend, batch, tile, overlap, say)
    from dfosd.serving.client import remote_runner

    runner = remote_runner(server, say)  # same attributes as OneStepRunner: tile, batch, scale, ...
    check_tile(tile, runner.tile)
    tcfg = TilingConfig(tile=runner.tile, overlap=runner.tile // 4 if overlap is None else overlap,
                        batch=runner.batch, scale=runner.scale)

    def upscale(rgb, sink, progress):
        sr = runner.upscale(rgb, overlap=tcfg.overlap, color_fix=color_fix)  # the server tiles, blends, fixes
        if sink is None:
            return sr
        sink(0, sr)
        return None
    return runner, tcfg, upscale


def _run_all(pairs, upscale, tcfg, opts, out, rep, progress) -> None:
    """Process every input into the report ``rep``: a failed image is a record, the batch goes on."""
    from tqdm import tqdm

    from dfosd.runtime.batch import process_image

    progress = progress_bars(progress)

    def tile_bar(name):
        if not progress:
            return None
        bar = None

        def update(done, total):
            nonlocal bar
            if bar is None:
                if total <= tcfg.batch * TILE_BAR_MIN_CALLS:
                    return
                bar = tqdm(total=total, desc=f"  {name}", unit="tile", leave=False, file=sys.stderr, position=1)
            bar.update(done - bar.n)
            if done == total:
                bar.close()
        return update

    for src, rel in tqdm(pairs, desc="dfosd", unit="img", disable=not progress, file=sys.stderr):
        rep.start(str(src))
        rec = process_image(src, rel, upscale, tcfg.scale, opts, out, tile_bar)
        if rec["status"] == "failed":
            tqdm.write(f"error: {rec['error']}", file=sys.stderr)
        rep.add(rec)


def family_color_fix(export) -> str:
    """The colour fix upstream applies by default for the export's model family, said when it is one."""
    fix = export.color_fix
    if fix != "none":
        say(f"colour fix: {fix} ({export.family.get('name')}'s upstream default; --color-fix none turns it off)")
    return fix


if __name__ == "__main__":  # pragma: no cover
    main()
