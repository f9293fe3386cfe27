"""What ``dfosd-trt-run --ray`` costs and holds: Ray vs the local CLI, 1 vs 2 actors, the listing's memory.

* ``--images N`` small images (one tile each) through the real CLI in fresh processes, the
  configurations interleaved round by round (order rotated): local with 1 and 2 threads,
  ``--ray`` (a Ray started on this machine) with 1 and 2 actors of 1 thread. Per run: the
  wall time of the whole command, and the upscaling time (local: the report's per-image seconds
  summed; Ray: from the workers being ready to the last record, ``upscaling_seconds``).
* the driver's peak memory while streaming a listing of ``--listing N`` files (a folder, then a
  list file) through ``listing.iter_inputs`` and the spooled report, each in a fresh process,
  vs the local ``collect_inputs`` + ``RunReport`` over the same folder.

    python3 -m dfosd.bench.ray_batch --engines ENG --work DIR --json ray-batch.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

LISTING_PROBE = r'''
import json, os, resource, sys, time, tracemalloc
from pathlib import Path
mode, arg, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
t = time.perf_counter()
n = 0
if mode == "local":
    from dfosd.runtime.batch import RunReport
    from dfosd.runtime.inputs import collect_inputs
    found = collect_inputs([arg], out_dir=out)
    rep = RunReport(out / "r.json", {})
    rep.pending = [str(s) for s, _ in found.pairs]
    for s, _ in found.pairs:
        rep.records.append({"input": str(s), "status": "ok", "seconds": 0.1})
        rep.pending.pop(0)
        n += 1
    rep.write("complete")
else:
    from dfosd.runtime.listing import iter_inputs
    from dfosd.runtime.stream_report import StreamingReport
    rep = StreamingReport(out / "r.json", {})
    for item in iter_inputs([arg], out):
        rep.add({"input": item.src, "status": "ok", "seconds": 0.1})
        n += 1
    rep.write("complete")
    rep.close()
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"mode": mode, "paths": n, "seconds": time.perf_counter() - t, "python_peak_bytes": peak,
                  "rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base}))
'''


def _make_images(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        p = folder / f"{i:05d}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
    return folder


def _run_cli(images: Path, engines: str, parent: Path, name: str, threads: int, ray_actors: int | None) -> dict:
    import shutil
    import tempfile

    parent.mkdir(parents=True, exist_ok=True)
    # A new folder per run (every run does all images), made here and removed by this run only:
    # nothing that was in --work before is touched.
    out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    try:
        return _timed_run(images, engines, out, threads, ray_actors)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _timed_run(images: Path, engines: str, out: Path, threads: int, ray_actors: int | None) -> dict:
    cmd = [sys.executable, "-m", "dfosd.runtime.cli", str(images), "--engines", engines, "--out", str(out),
           "--backend", "onnxruntime", "--no-progress"]
    if ray_actors:
        cmd += ["--ray", "local", "--ray-actors", str(ray_actors), "--ray-cpus-per-actor", str(threads)]
    t = time.perf_counter()
    # OMP_NUM_THREADS too: Ray sets it to an actor's CPUs (torch's tiling and blending ops then use 1
    # thread); a local run left at torch's default spins 2 threads on a busy 2-core machine.
    env = {**os.environ, "DFOSD_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rep = json.loads((out / "dfosd-report.json").read_text())
    ok = [x for x in rep["images"] if x["status"] == "ok"]
    up = rep["upscaling_seconds"] if ray_actors else sum(x["seconds"] for x in ok)
    return {"wall_s": round(wall, 3), "upscaling_s": round(up, 3), "images": len(ok),
            "images_per_s": round(len(ok) / up, 3)}


def _listing(mode: str, arg: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", LISTING_PROBE, mode, arg, str(out)], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--engines", required=True, type=click.Path(file_okay=False))
@click.option("--work", required=True, type=click.Path(file_okay=False))
@click.option("--images", type=int, default=200, show_default=True)
@click.option("--size", type=int, default=32, show_default=True, help="LR side of each image (one tile at 32).")
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--listing", type=int, default=100_000, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), required=True)
def main(engines, work, images, size, rounds, listing, json_path):
    work = Path(work)
    imgs = _make_images(work / "images", images, size)
    configs = {"local 1 thread": (1, None), "local 2 threads": (2, None), "ray 1 actor x 1 thread": (1, 1),
               "ray 2 actors x 1 thread": (1, 2)}
    runs: dict[str, list] = {k: [] for k in configs}
    names = list(configs)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            threads, actors = configs[name]
            res = _run_cli(imgs, engines, work / "out", name.replace(" ", "-"), threads, actors)
            runs[name].append(res)
            print(f"round {r + 1} {name}: {res}", flush=True)
    summary = {k: {m: statistics.median(x[m] for x in v) for m in ("wall_s", "upscaling_s", "images_per_s")}
               | {"wall_min_max": [min(x["wall_s"] for x in v), max(x["wall_s"] for x in v)],
                  "upscaling_min_max": [min(x["upscaling_s"] for x in v), max(x["upscaling_s"] for x in v)]}
               for k, v in runs.items()}
    folder = work / "listing"
    if not folder.is_dir() or sum(1 for _ in os.scandir(folder)) < listing:
        folder.mkdir(exist_ok=True)
        for i in range(listing):
            (folder / f"{i:06d}.png").touch()
    list_file = work / "listing.txt"
    list_file.write_text("".join(f"{folder / f'{i:06d}.png'}\n" for i in range(listing)))
    mem = [_listing("local", str(folder), work / "lo"), _listing("stream", str(folder), work / "so"),
           _listing("stream", str(list_file), work / "sl")]
    result = {"machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
              "images": images, "size": size, "rounds": rounds, "runs": runs, "summary": summary,
              "listing": {"paths": listing, "probes": mem}}
    Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "listing": mem}, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":  # pragma: no cover
    main()
