"""The ``--ray`` branch of ``dfosd-trt-run``: the local run's checks and report, Ray's workers.

Everything a local run checks before loading a model is checked here too, in the same
order and with the same messages (--out inside an input folder, an unwritable folder, a
report that is not ours, a second run into the same report); then the workers start, and
the listing streams to them (runtime/ray_batch.py).
"""

from __future__ import annotations

from pathlib import Path

from dfosd.core.cli_support import say
from dfosd.core.errors import DfosdError


def check_ray_address(address: str) -> None:
    """``--ray`` takes an optional value: ``dfosd-trt-run --ray photos/`` would make the folder the address."""
    if address not in ("", "local", "auto") and Path(address).exists():
        raise DfosdError(f"--ray took {address!r} as the Ray address, but it is a file or folder",
                         hint="put INPUTS before --ray, or write --ray local (or --ray auto / --ray HOST:PORT)")


PEEK_LIMIT = 10_000  # items read ahead to find a first image before starting Ray


def _first_image_or_why(items):
    """``items`` again, after making sure (within ``PEEK_LIMIT`` items) there is an image to upscale:
    a run with nothing to do says why before a cluster is joined, as the local run does."""
    import itertools

    ahead = []
    for item in items:
        ahead.append(item)
        if item.kind == "image" or len(ahead) >= PEEK_LIMIT:
            return itertools.chain(ahead, items)
    problems = [i.message for i in ahead if i.kind == "problem"]
    skipped = [i for i in ahead if i.kind == "skipped"]
    what = [f"skipped {len(skipped)} file(s), e.g. {Path(skipped[0].src).name}: {skipped[0].message}"] if skipped else []
    raise DfosdError("no input images found" + "".join(f"\n  - {p}" for p in problems + what),
                     hint="pass image files, folders, glob patterns or a list file (*.txt)")


def ray_main(inputs, *, address, actors, cpus_per_actor, export_dir, out_dir, backend, batch, tile, overlap,
             color_fix, fmt, quality, skip_existing, report, max_pixels, progress) -> None:
    from dfosd.core.manifest import ExportDir
    from dfosd.core.vocab import REPORT_NAME
    from dfosd.runtime.batch import (
        Interrupted,
        check_report_path,
        check_tile,
        check_writable_folder,
        exit_code_for,
        report_lock,
        stop_on_signals,
    )
    from dfosd.runtime.inputs import check_output_folder
    from dfosd.runtime.backend_choice import parse_backend_spec
    from dfosd.runtime.listing import check_folders_apart, iter_inputs
    from dfosd.runtime.ray_batch import MAX_RESTARTS, MAX_TASK_RETRIES, connect, require_ray, run_on_ray, start_workers
    from dfosd.runtime.stream_report import StreamingReport

    require_ray()
    check_ray_address(address)
    out = Path(out_dir)
    check_output_folder(inputs, [], out, fmt)
    check_folders_apart(inputs)
    parse_backend_spec(backend)  # a misspelt --backend: said here, not by every worker
    items = _first_image_or_why(iter_inputs(inputs, out))  # then the listing streams while the workers run
    export = ExportDir(export_dir, check="none")  # no export there, or an edited manifest: said first
    check_tile(tile, export.tile)
    if color_fix is None:
        from dfosd.runtime.cli import family_color_fix

        color_fix = family_color_fix(export)
    report_path = Path(report) if report else out / REPORT_NAME
    check_writable_folder(out, "--out")
    check_writable_folder(report_path.parent, "--report folder")
    opts = {"fmt": fmt, "quality": quality, "skip_existing": skip_existing, "color_fix": color_fix,
            "max_pixels": max_pixels}
    code = 0
    with report_lock(report_path), stop_on_signals():
        check_report_path(report_path)
        rep = StreamingReport(report_path, {"engines": str(Path(export_dir).resolve()), "color_fix": color_fix,
                                            "max_pixels": max_pixels, "out": str(out.resolve())})
        rep.write("running")
        ray, seconds = None, rep.seconds()
        try:
            ray = connect(address, say)
            with stop_on_signals():  # again: ray.init put its own SIGTERM handler (sys.exit) in place of ours
                workers, infos = start_workers(
                    ray, actors, cpus_per_actor, backend,
                    {"export_dir": str(Path(export_dir).resolve()), "batch": batch, "tile": tile, "overlap": overlap,
                     "opts": opts, "out_dir": str(out.resolve())}, say)
                first = infos[0]
                rep.header.update(backend=first["backend"], precision=first["precision"], backend_plan=first["plan"],
                                  tiling=first["tiling"],
                                  ray={"address": address or "local", "nodes": len({i["node"] for i in infos}),
                                       "workers": [{"pid": i["pid"], "node": i["node"]} for i in infos],
                                       "max_restarts": MAX_RESTARTS, "max_task_retries": MAX_TASK_RETRIES})
                rep.write("running")
                seconds = run_on_ray(ray, workers, items, rep, progress)
            state = "complete"
        except (KeyboardInterrupt, Interrupted) as exc:
            state, code, seconds = "interrupted", exit_code_for(exc), rep.seconds() - seconds
            say(f"interrupted ({exc if isinstance(exc, Interrupted) else 'SIGINT'})")
        except BaseException as exc:
            rep.write("failed", error=getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            rep.close()
            raise
        finally:
            if ray is not None:
                ray.shutdown()  # ends this job: its workers go with it
        counts = rep.counts()
        rate = counts["ok"] / seconds if seconds > 0 else 0.0
        rep.write(state, images_per_second=round(rate, 3), upscaling_seconds=round(seconds, 3))
        rep.close()
    say(f"{counts['ok']} upscaled, {counts['skipped']} skipped, {counts['failed']} failed"
        + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")
        + f" in {seconds:.1f} s after the workers were ready ({rate:.2f} images/s) -> {out} (report: {report_path})")
    if code:
        raise SystemExit(code)
    if counts["failed"]:
        raise SystemExit(1)
